"""normal_kl, the discretised Gaussian decoder and mean_flat against closed forms and numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm import losses


def test_mean_flat():
  x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
  np.testing.assert_allclose(losses.mean_flat(x), x.reshape(2, -1).mean(1), rtol=1e-6)
  np.testing.assert_allclose(losses.mean_flat(x, 2), x.reshape(2, 3, -1).mean(-1), rtol=1e-6)
  np.testing.assert_allclose(losses.mean_flat(x, 0), x.mean(), rtol=1e-6)
  with pytest.raises(ValueError, match="num_batch_dims"):
    losses.mean_flat(x, 5)


def test_normal_kl_self_is_zero_and_positive():
  rng = np.random.RandomState(0)
  m1, m2 = rng.randn(100), rng.randn(100)
  lv1, lv2 = rng.randn(100), rng.randn(100)
  np.testing.assert_allclose(losses.normal_kl(m1, lv1, m1, lv1), 0.0, atol=1e-6)
  assert np.all(np.asarray(losses.normal_kl(m1, lv1, m2, lv2)) >= 0)


def test_normal_kl_closed_form_and_monte_carlo():
  m1, lv1, m2, lv2 = 0.3, np.log(0.5), -0.4, np.log(2.0)
  s1, s2 = np.sqrt(0.5), np.sqrt(2.0)
  closed = np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
  kl = float(losses.normal_kl(m1, lv1, m2, lv2))
  assert kl == pytest.approx(closed, rel=1e-5)
  # Monte Carlo: E_p[log p(x) - log q(x)].
  x = m1 + s1 * np.random.RandomState(1).randn(400_000)
  mc = np.mean(stats.norm.logpdf(x, m1, s1) - stats.norm.logpdf(x, m2, s2))
  assert kl == pytest.approx(mc, abs=5e-3)


# One compile per input shape, shared by the tests (eager evaluation compiles op by op).
_dgll = jax.jit(losses.discretized_gaussian_log_likelihood)


def _levels():
  return jnp.asarray(np.arange(256) / 127.5 - 1.0, jnp.float32)


@pytest.mark.parametrize("mean,log_scale", [(0.0, np.log(0.1)), (0.37, np.log(1e-3)),
                                            (-0.99, np.log(0.02)), (0.5, np.log(3.0)),
                                            (1.7, np.log(0.05)), (-5.0, np.log(0.01))])
def test_discretized_likelihood_sums_to_one(mean, log_scale):
  logp = _dgll(_levels(), jnp.float32(mean), jnp.float32(log_scale))
  assert np.all(np.asarray(logp) <= 1e-6)
  np.testing.assert_allclose(np.sum(np.exp(np.asarray(logp, np.float64))), 1.0, atol=2e-5)


def test_discretized_likelihood_matches_scipy():
  rng = np.random.RandomState(0)
  x = rng.randint(0, 256, size=(4, 8, 8, 3)) / 127.5 - 1.0
  means = x + 0.05 * rng.randn(*x.shape)
  log_scales = np.log(rng.uniform(0.01, 0.3, size=(4, 1, 1, 1)))
  got = np.asarray(_dgll(
      jnp.asarray(x, jnp.float32), jnp.asarray(means, jnp.float32),
      jnp.asarray(log_scales, jnp.float32)), np.float64)
  sd = np.exp(log_scales)
  upper = np.where(x > 0.999, np.inf, x + 1 / 255)
  lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
  want = np.log(stats.norm.cdf(upper, means, sd) - stats.norm.cdf(lower, means, sd))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_discretized_likelihood_far_tail_finite_with_grads():
  x = _levels()

  def total(mean, log_scale):
    return jnp.sum(losses.discretized_gaussian_log_likelihood(x, mean, log_scale))

  value_and_grad = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))
  for mean, log_scale in [(0.9, np.log(1e-4)), (-0.9, np.log(1e-4)), (0.0, np.log(50.0))]:
    value, grads = value_and_grad(jnp.float32(mean), jnp.float32(log_scale))
    assert np.isfinite(value)
    assert all(np.isfinite(g) for g in grads)
  # A bin 30 standard deviations away keeps a finite log-probability (scipy: logsf).
  lp = float(_dgll(jnp.zeros(256), jnp.float32(0.3), jnp.float32(np.log(0.01)))[0])
  want = stats.norm.logcdf((-0.3 + 1 / 255) / 0.01)  # the lower edge term is negligible
  assert lp == pytest.approx(want, rel=1e-3)


def test_broadcasting_and_jit():
  x = jnp.zeros((2, 4, 4, 1))
  out = jax.jit(losses.discretized_gaussian_log_likelihood)(x, x, jnp.zeros((2, 1, 1, 1)))
  assert out.shape == (2, 4, 4, 1)
  kl = jax.jit(losses.normal_kl)(x, jnp.zeros((2, 1, 1, 1)), 0.0, 0.0)
  assert kl.shape == (2, 4, 4, 1)
