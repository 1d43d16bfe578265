"""Beta schedules against their defining formulas (float64 numpy, written out independently)."""
import math

import numpy as np
import pytest

from ddpm import schedules


@pytest.mark.parametrize("name", schedules.SCHEDULE_NAMES)
@pytest.mark.parametrize("num_timesteps", [20, 100, 1000, 4000])
def test_shape_dtype_range(name, num_timesteps):
  betas = schedules.get_beta_schedule(name, num_timesteps)
  assert betas.dtype == np.float64
  assert betas.shape == (num_timesteps,)
  assert np.all(betas > 0) and np.all(betas <= 1)


def test_linear_matches_ddpm_and_rescales():
  betas = schedules.get_beta_schedule("linear", 1000)
  np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-15)
  # improved-diffusion: endpoints scaled by 1000 / T.
  betas = schedules.get_beta_schedule("linear", 250)
  np.testing.assert_allclose(betas, np.linspace(4e-4, 0.08, 250), rtol=0, atol=1e-15)


def test_cosine_alphas_cumprod_matches_formula():
  num_timesteps, s = 1000, 0.008
  betas = schedules.get_beta_schedule("cosine", num_timesteps)
  f = lambda t: np.cos((t / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2
  t = np.arange(1, num_timesteps + 1)
  expected = f(t) / f(0)
  alphas_cumprod = np.cumprod(1 - betas)
  capped = np.flatnonzero(betas >= 0.999)
  assert capped.size == 1 and capped[0] == num_timesteps - 1  # only the final step is capped
  np.testing.assert_allclose(alphas_cumprod[:-1], expected[:-1], rtol=1e-10, atol=1e-14)
  assert np.max(betas) == pytest.approx(0.999)


def test_quadratic_sigmoid_geometric_jsd():
  num_timesteps = 200
  start, end = 1e-4 * 1000 / num_timesteps, 0.02 * 1000 / num_timesteps
  quad = schedules.get_beta_schedule("quadratic", num_timesteps)
  np.testing.assert_allclose(np.diff(np.sqrt(quad), 2), 0, atol=1e-14)
  np.testing.assert_allclose(quad[[0, -1]], [start, end], rtol=1e-12)

  geo = schedules.get_beta_schedule("geometric", num_timesteps)
  ratios = geo[1:] / geo[:-1]
  np.testing.assert_allclose(ratios, (end / start) ** (1 / (num_timesteps - 1)), rtol=1e-12)
  np.testing.assert_allclose(geo[[0, -1]], [start, end], rtol=1e-12)

  sig = schedules.get_beta_schedule("sigmoid", num_timesteps)
  x = -6 + 12 * np.arange(num_timesteps) / (num_timesteps - 1)
  np.testing.assert_allclose(sig, start + (end - start) / (1 + np.exp(-x)), rtol=1e-12)
  assert np.all(np.diff(sig) > 0)

  jsd = schedules.get_beta_schedule("jsd", num_timesteps)
  paper_t = np.arange(1, num_timesteps + 1)
  np.testing.assert_allclose(jsd, 1.0 / (num_timesteps - paper_t + 1), rtol=1e-14)
  assert jsd[-1] == 1.0


def test_unknown_name_lists_valid_ones():
  with pytest.raises(ValueError, match="cosinus") as info:
    schedules.get_beta_schedule("cosinus", 10)
  for name in schedules.SCHEDULE_NAMES:
    assert name in str(info.value)


@pytest.mark.parametrize("num_timesteps", [0, -3, 2.5, True])
def test_bad_num_timesteps(num_timesteps):
  with pytest.raises(ValueError, match="num_timesteps"):
    schedules.get_beta_schedule("cosine", num_timesteps)


def test_linear_too_few_steps_raises_clearly():
  # 0.02 * 1000 / 10 = 2 is not a variance fraction.
  with pytest.raises(ValueError, match="linear.*num_timesteps=10"):
    schedules.get_beta_schedule("linear", 10)


@pytest.mark.parametrize("bad", [[0.1, 0.0], [0.1, 1.5], [0.1, math.nan], [], [[0.1]]])
def test_validate_betas_rejects(bad):
  with pytest.raises(ValueError, match="betas"):
    schedules.validate_betas(bad)


def test_betas_for_alpha_bar_caps():
  betas = schedules.betas_for_alpha_bar(4, lambda u: 1 - u, max_beta=0.5)
  # 1 - alpha_bar(t+1)/alpha_bar(t) for alpha_bar = 1 - u, capped at 0.5.
  np.testing.assert_allclose(betas, [0.25, 1 / 3, 0.5, 0.5])
