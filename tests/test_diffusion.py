"""GaussianDiffusion against closed forms and independent float64 numpy computations."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from ddpm import diffusion, schedules
from ddpm.diffusion import GaussianDiffusion

T_SMALL = 20
SHAPE = (4, 8, 8, 2)   # [B, H, W, C]


def _cosine(num_timesteps=T_SMALL, **kwargs):
  return GaussianDiffusion.create(schedules.get_beta_schedule("cosine", num_timesteps), **kwargs)


def _images(seed=0, shape=SHAPE):
  """Random 8-bit images in [-1, 1]: float32 [B, H, W, C]."""
  levels = np.random.RandomState(seed).randint(0, 256, size=shape)
  return jnp.asarray(levels / 127.5 - 1.0, jnp.float32)


def _np_coefs(betas):
  """The DDPM quantities written out directly from the paper (float64)."""
  alphas = 1 - betas
  abar = np.array([np.prod(alphas[:i + 1]) for i in range(len(betas))])
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  return alphas, abar, abar_prev


# ---- coefficients and published values ------------------------------------------------------

def test_published_linear_posterior_variance():
  d = GaussianDiffusion.create(schedules.get_beta_schedule("linear", 1000))
  assert float(d.posterior_variance[487]) == pytest.approx(0.00979, abs=5e-6)
  assert float(d.posterior_variance[999]) == pytest.approx(0.02, abs=5e-6)


@pytest.mark.parametrize("name", schedules.SCHEDULE_NAMES)
def test_coefficients_match_numpy(name):
  betas = schedules.get_beta_schedule(name, 50)
  d = GaussianDiffusion.create(betas)
  alphas, abar, abar_prev = _np_coefs(betas)
  with np.errstate(divide="ignore"):
    want = {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - abar),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt((1 - abar) / abar),
        "posterior_variance": (1 - abar_prev) / (1 - abar) * betas,
        "posterior_mean_coef1": np.sqrt(abar_prev) * betas / (1 - abar),
        "posterior_mean_coef2": np.sqrt(alphas) * (1 - abar_prev) / (1 - abar),
    }
  for key, value in want.items():
    got = getattr(d, key)
    assert got.dtype == jnp.float32 and got.shape == (50,), key
    np.testing.assert_allclose(np.asarray(got, np.float64), value, rtol=2e-6, atol=1e-12,
                               err_msg=key)
  pv = want["posterior_variance"]
  np.testing.assert_allclose(d.posterior_log_variance_clipped,
                             np.log(np.concatenate([[pv[1]], pv[1:]])), rtol=1e-5)
  np.testing.assert_array_equal(d.timestep_map, np.arange(50))
  assert d.num_timesteps == 50


def test_immutable_and_validates():
  d = _cosine()
  with pytest.raises(AttributeError):
    d.betas = None
  with pytest.raises(ValueError, match="betas\\[1\\]"):
    GaussianDiffusion.create([0.1, 0.0, 0.2])
  with pytest.raises(ValueError, match="'epsilon'"):
    _cosine(model_mean_type="epsilon")
  with pytest.raises(ValueError, match="'fixed'"):
    _cosine(model_var_type="fixed")
  with pytest.raises(ValueError, match="'l2'"):
    _cosine(loss_type="l2")
  with pytest.raises(ValueError, match="hybrid"):
    _cosine(loss_type="hybrid", model_var_type="fixed_small")
  with pytest.raises(ValueError, match="min_snr_gamma"):
    _cosine(min_snr_gamma=-1.0)
  with pytest.raises(ValueError, match="t must be in"):
    d.q_sample(_images(), jnp.array([0, 1, 2, T_SMALL]), _images(1))
  with pytest.raises(ValueError, match="integer"):
    d.q_sample(_images(), jnp.zeros(4), _images(1))
  with pytest.raises(ValueError, match="batch"):
    d.q_sample(_images(), jnp.zeros(3, jnp.int32), _images(1))


# ---- forward process ------------------------------------------------------------------------

def test_q_sample_moments_monte_carlo():
  d = _cosine()
  n = 20_000
  x0 = jnp.full((n, 1, 1, 1), 0.6)
  t = jnp.full((n,), 7, jnp.int32)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  xt = np.asarray(jax.jit(d.q_sample)(x0, t, noise), np.float64)
  _, abar, _ = _np_coefs(schedules.get_beta_schedule("cosine", T_SMALL))
  se = np.sqrt((1 - abar[7]) / n)
  assert abs(xt.mean() - np.sqrt(abar[7]) * 0.6) < 5 * se
  assert xt.var() == pytest.approx(1 - abar[7], rel=0.05)
  mean, var, log_var = d.q_mean_variance(x0[:2], t[:2])
  np.testing.assert_allclose(mean, np.sqrt(abar[7]) * 0.6, rtol=1e-6)
  np.testing.assert_allclose(var, 1 - abar[7], rtol=1e-6)
  np.testing.assert_allclose(log_var, np.log(1 - abar[7]), rtol=1e-5)


def test_posterior_is_bayes_rule():
  """q(x_{t-1}|x_t,x_0) ~ q(x_t|x_{t-1}) q(x_{t-1}|x_0): product of Gaussians in x_{t-1}."""
  betas = schedules.get_beta_schedule("linear", 100)
  d = GaussianDiffusion.create(betas)
  alphas, abar, abar_prev = _np_coefs(betas)
  x0, xt = _images(0), _images(1)
  t = np.array([1, 17, 50, 99])
  mean, var, _ = d.q_posterior_mean_variance(x0, xt, jnp.asarray(t))
  a, b, ap = alphas[t], betas[t], abar_prev[t]
  precision = a / b + 1 / (1 - ap)          # likelihood N(x_t; sqrt(a) x, b), prior N(sqrt(ap) x0, 1-ap)
  post_var = (1 / precision)[:, None, None, None]
  post_mean = post_var * ((np.sqrt(a) / b)[:, None, None, None] * np.asarray(xt, np.float64)
                          + (np.sqrt(ap) / (1 - ap))[:, None, None, None]
                          * np.asarray(x0, np.float64))
  np.testing.assert_allclose(var, post_var, rtol=1e-5)
  np.testing.assert_allclose(mean, post_mean, rtol=1e-4, atol=1e-5)


def test_parameterisation_round_trips():
  d = _cosine()
  x0, noise = _images(0), jax.random.normal(jax.random.key(1), SHAPE)
  t = jnp.array([0, 5, 12, T_SMALL - 2])
  xt = d.q_sample(x0, t, noise)
  np.testing.assert_allclose(d.predict_xstart_from_eps(xt, t, noise), x0, atol=2e-4)
  np.testing.assert_allclose(d.predict_eps_from_xstart(xt, t, x0), noise, atol=2e-3)
  v = d.get_v(x0, noise, t)
  np.testing.assert_allclose(d.predict_xstart_from_v(xt, t, v), x0, atol=1e-5)
  np.testing.assert_allclose(d.predict_eps_from_v(xt, t, v), noise, atol=1e-5)
  _, abar, _ = _np_coefs(schedules.get_beta_schedule("cosine", T_SMALL))
  ab = abar[np.asarray(t)][:, None, None, None]
  np.testing.assert_allclose(v, np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0, atol=1e-5)


# ---- reverse process ------------------------------------------------------------------------

def _oracle(d, x0, noise, mean_type):
  """A 'network' that knows x_0 and the noise: outputs the exact target of each mean type."""
  def model_fn(x_t, t):
    del x_t
    assert t.dtype == jnp.int32
    if mean_type == "eps":
      return noise
    if mean_type == "x0":
      return x0
    return d.get_v(x0, noise, t)
  return model_fn


@pytest.mark.parametrize("mean_type", diffusion.MEAN_TYPES)
def test_p_mean_variance_with_oracle_is_true_posterior(mean_type):
  d = _cosine(model_mean_type=mean_type, model_var_type="fixed_small")
  x0, noise = _images(0), jax.random.normal(jax.random.key(1), SHAPE)
  t = jnp.array([0, 3, 10, 18])
  xt = d.q_sample(x0, t, noise)
  out = d.p_mean_variance(_oracle(d, x0, noise, mean_type), xt, t)
  assert set(out) == {"mean", "variance", "log_variance", "pred_xstart"}
  true_mean, true_var, _ = d.q_posterior_mean_variance(x0, xt, t)
  np.testing.assert_allclose(out["pred_xstart"], x0, atol=2e-4)
  np.testing.assert_allclose(out["mean"], true_mean, atol=2e-4)
  np.testing.assert_allclose(out["variance"], jnp.broadcast_to(true_var, SHAPE), rtol=1e-6)


def test_variance_types():
  betas = schedules.get_beta_schedule("cosine", T_SMALL)
  _, abar, abar_prev = _np_coefs(betas)
  pv = (1 - abar_prev) / (1 - abar) * betas
  x = _images()
  t = jnp.array([0, 1, 9, 19])
  tn = np.asarray(t)
  zeros = jnp.zeros(SHAPE)
  large = GaussianDiffusion.create(betas, model_var_type="fixed_large").p_mean_variance(
      lambda x_t, t: zeros, x, t)
  want_large = np.where(tn == 0, pv[1], betas[tn])
  np.testing.assert_allclose(large["variance"][:, 0, 0, 0], want_large, rtol=1e-5)
  np.testing.assert_allclose(large["log_variance"][:, 0, 0, 0], np.log(want_large), rtol=1e-5)
  small = GaussianDiffusion.create(betas, model_var_type="fixed_small").p_mean_variance(
      lambda x_t, t: zeros, x, t)
  np.testing.assert_allclose(small["variance"][:, 0, 0, 0], pv[tn], rtol=1e-5, atol=1e-12)
  clipped = np.log(np.where(tn == 0, pv[1], pv[tn]))
  np.testing.assert_allclose(small["log_variance"][:, 0, 0, 0], clipped, rtol=1e-5)
  # learned_range: -1 -> log beta tilde (clipped), +1 -> log beta, 0 -> geometric mean.
  d = GaussianDiffusion.create(betas, model_var_type="learned_range")
  for v, want in [(-1.0, clipped), (1.0, np.log(betas[tn])),
                  (0.0, 0.5 * (clipped + np.log(betas[tn])))]:
    out = d.p_mean_variance(lambda x_t, t: jnp.concatenate([zeros, jnp.full(SHAPE, v)], -1), x, t)
    np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0], want, rtol=1e-5)
  # learned: the output is the log variance.
  d = GaussianDiffusion.create(betas, model_var_type="learned")
  out = d.p_mean_variance(lambda x_t, t: jnp.concatenate([zeros, jnp.full(SHAPE, -3.0)], -1), x, t)
  np.testing.assert_allclose(out["variance"], np.exp(-3.0), rtol=1e-6)
  with pytest.raises(ValueError, match="channels"):
    d.p_mean_variance(lambda x_t, t: zeros, x, t)


def test_clip_denoised():
  d = _cosine(model_mean_type="x0")
  out = d.p_mean_variance(lambda x_t, t: 3.0 * jnp.ones(SHAPE), _images(), jnp.arange(4),
                          clip_denoised=True)
  np.testing.assert_allclose(out["pred_xstart"], 1.0)


# ---- training losses ------------------------------------------------------------------------

@pytest.mark.parametrize("mean_type", diffusion.MEAN_TYPES)
def test_regression_loss_zero_for_oracle_and_matches_numpy(mean_type):
  d = _cosine(model_mean_type=mean_type)
  x0, noise = _images(0), jax.random.normal(jax.random.key(1), SHAPE)
  t = jnp.array([0, 4, 11, 19])
  out = d.training_losses(_oracle(d, x0, noise, mean_type), x0, t, None, noise=noise)
  np.testing.assert_allclose(out["loss"], 0.0, atol=1e-10)
  # A network that predicts zeros: the loss is the mean square of the target.
  out = d.training_losses(lambda x_t, tt: jnp.zeros(SHAPE), x0, t, None, noise=noise)
  _, abar, _ = _np_coefs(schedules.get_beta_schedule("cosine", T_SMALL))
  ab = abar[np.asarray(t)][:, None, None, None]
  x0n, nn = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
  target = {"eps": nn, "x0": x0n, "v": np.sqrt(ab) * nn - np.sqrt(1 - ab) * x0n}[mean_type]
  np.testing.assert_allclose(out["loss"], (target ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("mean_type", diffusion.MEAN_TYPES)
def test_min_snr_weights(mean_type):
  gamma = 5.0
  betas = schedules.get_beta_schedule("cosine", T_SMALL)
  d = GaussianDiffusion.create(betas, model_mean_type=mean_type, min_snr_gamma=gamma)
  plain = GaussianDiffusion.create(betas, model_mean_type=mean_type)
  x0, noise = _images(0), jax.random.normal(jax.random.key(1), SHAPE)
  t = jnp.array([0, 4, 11, 18])
  fn = lambda x_t, tt: 0.5 * x_t
  weighted = d.training_losses(fn, x0, t, None, noise=noise)["loss"]
  unweighted = plain.training_losses(fn, x0, t, None, noise=noise)["loss"]
  _, abar, _ = _np_coefs(betas)
  snr = abar[np.asarray(t)] / (1 - abar[np.asarray(t)])
  want = {"eps": np.minimum(snr, gamma) / snr, "x0": np.minimum(snr, gamma),
          "v": np.minimum(snr, gamma) / (snr + 1)}[mean_type]
  np.testing.assert_allclose(weighted, want * np.asarray(unweighted), rtol=1e-4)


def _linear_model(num_out_channels):
  """A tiny per-pixel linear 'network' with a timestep embedding: (params, x_t, t) -> out."""
  def init(key):
    k1, k2 = jax.random.split(key)
    c = SHAPE[-1]
    return {"w": 0.3 * jax.random.normal(k1, (c, num_out_channels)),
            "emb": 0.1 * jax.random.normal(k2, (T_SMALL, num_out_channels))}

  def apply(params, x_t, t):
    return x_t @ params["w"] + params["emb"][t][:, None, None, :]
  return init, apply


# Every loss type (with learned_range, the most involved variance) and every variance type (with
# 'kl', the loss that reaches the variance); each combination is its own ~1 s compile.
_LOSS_VAR_COMBOS = ([(loss, "learned_range") for loss in diffusion.LOSS_TYPES]
                    + [("kl", var) for var in diffusion.VAR_TYPES if var != "learned_range"]
                    + [("mse", "fixed_large")])


@pytest.mark.parametrize("loss_type,var_type", _LOSS_VAR_COMBOS)
def test_gradients_finite_for_every_loss_and_var_type(loss_type, var_type):
  d = _cosine(model_var_type=var_type, loss_type=loss_type)
  c = SHAPE[-1]
  init, apply = _linear_model(2 * c if d.learns_sigma else c)
  params = init(jax.random.key(0))
  x0 = _images()
  t = jnp.array([0, 1, 10, 19])  # includes the decoder step
  # Explicit noise: compiling jax.random.normal costs ~1 s on this CPU, per combination.
  noise = jax.random.normal(jax.random.key(3), SHAPE)

  def objective(p):
    out = d.training_losses(lambda x_t, tt: apply(p, x_t, tt), x0, t, None, noise=noise)
    assert out["loss"].shape == (4,)
    return jnp.mean(out["loss"])

  value, grads = jax.jit(jax.value_and_grad(objective))(params)
  assert np.isfinite(value)
  for g in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_hybrid_mean_gets_gradient_only_from_mse():
  betas = schedules.get_beta_schedule("cosine", T_SMALL)
  c = SHAPE[-1]
  init, apply = _linear_model(2 * c)
  params = init(jax.random.key(0))
  x0 = _images()
  t = jnp.array([0, 3, 10, 19])
  noise = jax.random.normal(jax.random.key(5), SHAPE)

  def grads(loss_type, lam):
    d = GaussianDiffusion.create(betas, model_var_type="learned_range", loss_type=loss_type,
                                 hybrid_lambda=lam)
    fn = lambda p: jnp.mean(d.training_losses(lambda x, tt: apply(p, x, tt), x0, t, None,
                                              noise=noise)["loss"])
    return jax.jit(jax.grad(fn))(params)

  hybrid, mse_only = grads("hybrid", 0.5), grads("hybrid", 0.0)
  # Mean-part columns: identical gradients (stop-gradient); variance part: only from L_vlb.
  np.testing.assert_allclose(hybrid["w"][:, :c], mse_only["w"][:, :c], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(mse_only["w"][:, c:], 0.0)
  assert np.all(np.abs(hybrid["w"][:, c:]) > 0)


def test_hybrid_scale_is_lambda_times_T():
  betas = schedules.get_beta_schedule("cosine", T_SMALL)
  x0, noise = _images(), jax.random.normal(jax.random.key(5), SHAPE)
  t = jnp.array([0, 3, 10, 19])
  fn = lambda x, tt: jnp.concatenate([0.5 * x, jnp.zeros(SHAPE)], -1)
  kl = GaussianDiffusion.create(betas, model_var_type="learned_range", loss_type="kl")
  hybrid = GaussianDiffusion.create(betas, model_var_type="learned_range", loss_type="hybrid",
                                    hybrid_lambda=0.25)
  vb = kl.training_losses(fn, x0, t, None, noise=noise)["loss"]
  out = hybrid.training_losses(fn, x0, t, None, noise=noise)
  np.testing.assert_allclose(out["vb"], 0.25 * T_SMALL * vb, rtol=1e-5)
  np.testing.assert_allclose(out["loss"], out["mse"] + out["vb"], rtol=1e-6)


def test_l1_and_huber_match_numpy():
  x0, noise = _images(), jax.random.normal(jax.random.key(5), SHAPE)
  t = jnp.array([0, 3, 10, 19])
  fn = lambda x, tt: 0.2 * x
  for loss_type in ("l1", "huber"):
    d = _cosine(loss_type=loss_type)
    xt = np.asarray(d.q_sample(x0, t, noise), np.float64)
    err = np.abs(0.2 * xt - np.asarray(noise, np.float64))
    want = err if loss_type == "l1" else np.where(err <= 1, 0.5 * err ** 2, err - 0.5)
    got = d.training_losses(fn, x0, t, None, noise=noise)["loss"]
    np.testing.assert_allclose(got, want.mean(axis=(1, 2, 3)), rtol=1e-5)


# ---- exact likelihood -----------------------------------------------------------------------

def test_prior_bpd_matches_numpy():
  betas = schedules.get_beta_schedule("linear", 1000)
  d = GaussianDiffusion.create(betas)
  x0 = _images()
  abar_T = np.prod(1 - betas)
  m, v = np.sqrt(abar_T) * np.asarray(x0, np.float64), 1 - abar_T
  kl = 0.5 * (-1 - np.log(v) + v + m ** 2) / np.log(2)
  np.testing.assert_allclose(d.prior_bpd(x0), kl.mean(axis=(1, 2, 3)), rtol=1e-4, atol=1e-9)


def _np_bound_for_xstart_model(betas, x0, x0_hat, var_type):
  """Independent float64 bound (bits/dim) for a network that outputs x0_hat whatever x_t is.

  Then p's mean minus q's posterior mean is coef1 (x0_hat - x0), free of the noise, so every
  term of the bound is deterministic. Returns (vb [B, T], prior [B]).
  """
  alphas, abar, abar_prev = _np_coefs(betas)
  num_timesteps = len(betas)
  with np.errstate(divide="ignore"):
    pv = (1 - abar_prev) / (1 - abar) * betas
  coef1 = np.sqrt(abar_prev) * betas / (1 - abar)
  pv_clip = np.concatenate([[pv[1]], pv[1:]])
  p_var = pv_clip if var_type == "fixed_small" else np.concatenate([[pv[1]], betas[1:]])
  x0, x0_hat = np.asarray(x0, np.float64), np.asarray(x0_hat, np.float64)
  vb = np.zeros((x0.shape[0], num_timesteps))
  for t in range(1, num_timesteps):
    diff = coef1[t] * (x0_hat - x0)
    q_var = pv_clip[t]
    kl = 0.5 * (np.log(p_var[t] / q_var) + q_var / p_var[t] - 1 + diff ** 2 / p_var[t])
    vb[:, t] = kl.mean(axis=(1, 2, 3)) / np.log(2)
  # t = 0: the decoder's mean is exactly x0_hat (coef1 = 1, coef2 = 0).
  sd = np.sqrt(p_var[0])
  upper = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
  lower = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
  prob = stats.norm.cdf(upper, x0_hat, sd) - stats.norm.cdf(lower, x0_hat, sd)
  vb[:, 0] = -np.log(prob).mean(axis=(1, 2, 3)) / np.log(2)
  m, v = np.sqrt(abar[-1]) * x0, 1 - abar[-1]
  prior = (0.5 * (-1 - np.log(v) + v + m ** 2)).mean(axis=(1, 2, 3)) / np.log(2)
  return vb, prior


@pytest.fixture(scope="module")
def bpd_fns():
  """One compiled calc_bpd_loop per variance type, shared by the likelihood tests."""
  betas = schedules.get_beta_schedule("cosine", T_SMALL)
  fns = {}
  for var_type in ("fixed_small", "fixed_large"):
    d = GaussianDiffusion.create(betas, model_mean_type="x0", model_var_type=var_type)
    fns[var_type] = jax.jit(lambda x0, x0_hat, key, d=d: d.calc_bpd_loop(
        lambda x_t, t: jnp.broadcast_to(x0_hat, x_t.shape), x0, key))
  return betas, fns


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_calc_bpd_loop_matches_numpy_bound(bpd_fns, var_type):
  betas, fns = bpd_fns
  x0 = _images(0)
  x0_hat = jnp.clip(0.9 * x0 + 0.02, -1, 1)
  out = fns[var_type](x0, x0_hat, jax.random.key(0))
  vb, prior = _np_bound_for_xstart_model(betas, x0, x0_hat, var_type)
  assert out["vb"].shape == (SHAPE[0], T_SMALL)
  assert out["mse"].shape == out["xstart_mse"].shape == (SHAPE[0], T_SMALL)
  np.testing.assert_allclose(out["vb"], vb, rtol=2e-3, atol=1e-5)
  np.testing.assert_allclose(out["prior_bpd"], prior, rtol=1e-3, atol=1e-7)
  np.testing.assert_allclose(out["total_bpd"], vb.sum(1) + prior, rtol=1e-3)
  np.testing.assert_allclose(out["xstart_mse"],
                             np.broadcast_to(((np.asarray(x0_hat) - np.asarray(x0)) ** 2)
                                             .mean(axis=(1, 2, 3))[:, None], vb.shape),
                             rtol=1e-5)


def test_calc_bpd_loop_true_noise_reduces_to_prior_plus_decoder():
  """With the exact noise prediction and fixed_small, every L_{t-1} (t >= 1) vanishes."""
  betas = schedules.get_beta_schedule("cosine", T_SMALL)
  d = GaussianDiffusion.create(betas, model_var_type="fixed_small")
  x0 = _images(2, (2, 4, 4, 1))
  model_fn = lambda x_t, t: d.predict_eps_from_xstart(x_t, t, x0)  # knows x_0
  out = jax.jit(lambda key: d.calc_bpd_loop(model_fn, x0, key))(jax.random.key(0))
  np.testing.assert_allclose(out["vb"][:, 1:], 0.0, atol=2e-5)
  _, abar, abar_prev = _np_coefs(betas)
  sd = np.sqrt((1 - abar_prev[1]) / (1 - abar[1]) * betas[1])
  x0n = np.asarray(x0, np.float64)
  upper = np.where(x0n > 0.999, np.inf, x0n + 1 / 255)
  lower = np.where(x0n < -0.999, -np.inf, x0n - 1 / 255)
  decoder = -np.log(stats.norm.cdf(upper, x0n, sd) - stats.norm.cdf(lower, x0n, sd))
  decoder = decoder.mean(axis=(1, 2, 3)) / np.log(2)
  np.testing.assert_allclose(out["vb"][:, 0], decoder, rtol=1e-3)
  np.testing.assert_allclose(out["total_bpd"], out["prior_bpd"] + decoder, rtol=1e-3)


# ---- jit, vmap, pytree ----------------------------------------------------------------------

def test_diffusion_is_a_pytree_through_jit():
  d = _cosine(model_mean_type="v", model_var_type="learned_range", loss_type="hybrid")
  leaves, treedef = jax.tree_util.tree_flatten(d)
  assert all(isinstance(leaf, jax.Array) for leaf in leaves)
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert rebuilt.model_mean_type == "v" and rebuilt.num_timesteps == T_SMALL

  fn = lambda x, t: jnp.concatenate([x, jnp.zeros_like(x)], -1)
  t = jnp.array([0, 1, 2, 3])

  @jax.jit
  def f(diff, x0, noise):
    return diff.training_losses(fn, x0, t, None, noise=noise)["loss"]

  x0, noise = _images(), jax.random.normal(jax.random.key(0), SHAPE)
  np.testing.assert_allclose(f(d, x0, noise),
                             d.training_losses(fn, x0, t, None, noise=noise)["loss"], rtol=1e-5)
  # Respacing works on an unflattened copy too (the float64 schedule is static aux data).
  np.testing.assert_allclose(rebuilt.respace([0, 5]).alphas_cumprod, d.alphas_cumprod[jnp.array([0, 5])],
                             rtol=1e-6)


def test_vmap_per_example_and_over_keys():
  d = _cosine()
  x0 = _images()
  t = jnp.array([0, 5, 9, 19])
  noise = jax.random.normal(jax.random.key(1), SHAPE)
  fn = lambda x, tt: 0.5 * x
  batched = d.training_losses(fn, x0, t, None, noise=noise)["loss"]
  per_example = jax.vmap(lambda x, tt, n: d.training_losses(fn, x, tt, None, noise=n)["loss"])(
      x0, t, noise)
  np.testing.assert_allclose(per_example, batched, rtol=1e-6)
  xt = jax.vmap(d.q_sample)(x0, t, noise)
  np.testing.assert_allclose(xt, d.q_sample(x0, t, noise), rtol=1e-6)
  keys = jax.random.split(jax.random.key(2), 3)
  stacked = jax.jit(jax.vmap(lambda k: d.training_losses(fn, x0, t, k)["loss"]))(keys)
  assert stacked.shape == (3, 4) and np.all(np.isfinite(stacked))


# ---- respacing ------------------------------------------------------------------------------

def test_space_timesteps():
  assert diffusion.space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
  assert diffusion.space_timesteps(100, "ddim100") == list(range(100))
  assert diffusion.space_timesteps(100, "100") == list(range(100))
  assert diffusion.space_timesteps(1000, 1) == [0]
  kept = diffusion.space_timesteps(300, "10,15,20")
  assert len(kept) == 45 and kept == sorted(kept)
  sections = [[k for k in kept if lo <= k < lo + 100] for lo in (0, 100, 200)]
  assert [len(s) for s in sections] == [10, 15, 20]
  assert [(s[0], s[-1]) for s in sections] == [(0, 99), (100, 199), (200, 299)]
  # Uneven split: the first T % n sections get one extra step.
  kept = diffusion.space_timesteps(10, "2,2,2")
  assert kept == [0, 3, 4, 6, 7, 9]
  for bad in ("ddim7x", "5,a", "101", "0"):
    with pytest.raises(ValueError):
      diffusion.space_timesteps(100, bad)
  with pytest.raises(ValueError, match="ddim600"):
    diffusion.space_timesteps(1000, "ddim600")


def test_respace_all_steps_reproduces_original():
  d = GaussianDiffusion.create(schedules.get_beta_schedule("linear", 1000),
                               model_var_type="fixed_small")
  r = d.respace(range(1000))
  for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1",
               "posterior_mean_coef2", "sqrt_recipm1_alphas_cumprod"):
    np.testing.assert_allclose(getattr(r, name), getattr(d, name), rtol=1e-6, err_msg=name)
  np.testing.assert_array_equal(r.timestep_map, np.arange(1000))


def test_respace_ddim10_and_model_sees_original_timesteps():
  betas = schedules.get_beta_schedule("linear", 1000)
  d = GaussianDiffusion.create(betas, model_var_type="fixed_small")
  kept = diffusion.space_timesteps(1000, "ddim10")
  r = diffusion.respace(d, kept)
  assert r.num_timesteps == 10 and r.model_var_type == "fixed_small"
  _, abar, _ = _np_coefs(betas)
  np.testing.assert_allclose(r.alphas_cumprod, abar[kept], rtol=1e-5)
  np.testing.assert_array_equal(r.timestep_map, kept)
  seen = []

  def model_fn(x_t, t):
    seen.append(np.asarray(t))
    return jnp.zeros_like(x_t)

  r.p_mean_variance(model_fn, _images(), jnp.array([0, 3, 7, 9]))
  np.testing.assert_array_equal(seen[-1], [0, 300, 700, 900])
  # Respacing a respaced diffusion composes the maps.
  rr = r.respace([1, 9])
  np.testing.assert_array_equal(rr.timestep_map, [100, 900])
  np.testing.assert_allclose(rr.alphas_cumprod, abar[[100, 900]], rtol=1e-5)
  with pytest.raises(ValueError, match="timesteps to keep"):
    d.respace([5, 1000])


def test_from_config():
  config = ml_collections.ConfigDict({"diffusion": {
      "num_timesteps": 50, "beta_schedule": "cosine", "model_mean_type": "v",
      "model_var_type": "learned_range", "loss_type": "hybrid", "hybrid_lambda": 0.01,
      "min_snr_gamma": 5.0, "timestep_sampler": "uniform"}})
  d = diffusion.from_config(config)
  assert (d.num_timesteps, d.model_mean_type, d.model_var_type, d.loss_type) == (
      50, "v", "learned_range", "hybrid")
  assert d.hybrid_lambda == 0.01 and d.min_snr_gamma == 5.0
  np.testing.assert_allclose(d.betas, schedules.get_beta_schedule("cosine", 50), rtol=1e-6)
  assert diffusion.from_config(config.diffusion).num_timesteps == 50


def test_eps_model_with_zero_alpha_bar_refuses_the_bound():
  # 'jsd' ends with beta = 1: x_T is pure noise and an eps-model cannot give x_0 there.
  betas = schedules.get_beta_schedule("jsd", T_SMALL)
  with pytest.raises(ValueError, match="alpha_bar = 0"):
    GaussianDiffusion.create(betas, model_var_type="learned_range", loss_type="hybrid")
  with pytest.raises(ValueError, match="alpha_bar = 0"):
    GaussianDiffusion.create(betas, loss_type="kl")
  with pytest.raises(ValueError, match="calc_bpd_loop"):
    GaussianDiffusion.create(betas).calc_bpd_loop(lambda x, t: x, _images(), jax.random.key(0))
  # The x0 and v parameterisations are fine there.
  d = GaussianDiffusion.create(betas, model_mean_type="v", model_var_type="learned_range",
                               loss_type="hybrid")
  noise = jax.random.normal(jax.random.key(1), SHAPE)
  out = d.training_losses(lambda x, t: jnp.concatenate([x, x], -1), _images(),
                          jnp.full((4,), T_SMALL - 1), None, noise=noise)
  assert np.all(np.isfinite(out["loss"]))


def test_kl_training_loss_is_the_bound_term(bpd_fns):
  """loss_type 'kl' at each t equals column t of calc_bpd_loop's vb (deterministic model)."""
  betas, fns = bpd_fns
  x0 = _images(0)
  x0_hat = jnp.clip(0.9 * x0 + 0.02, -1, 1)
  vb = fns["fixed_large"](x0, x0_hat, jax.random.key(0))["vb"]
  d = GaussianDiffusion.create(betas, model_mean_type="x0", model_var_type="fixed_large",
                               loss_type="kl")
  b = SHAPE[0]
  # Every (example, t) pair in one batch: row i * T + t.
  x_rep = jnp.repeat(x0, T_SMALL, axis=0)
  hat_rep = jnp.repeat(x0_hat, T_SMALL, axis=0)
  t_rep = jnp.tile(jnp.arange(T_SMALL, dtype=jnp.int32), b)
  loss = jax.jit(lambda key: d.training_losses(lambda x_t, t: hat_rep, x_rep, t_rep, key)["loss"])(
      jax.random.key(1))
  np.testing.assert_allclose(np.asarray(loss).reshape(b, T_SMALL), vb, rtol=1e-4, atol=1e-6)


def test_public_constructor_builds_like_create_and_survives_pytree_round_trips():
  """`GaussianDiffusion(betas, ...)` is the public constructor (README quickstart); JAX's
  unflatten and `.replace` use the field-by-field one: all three give equal processes."""
  betas = schedules.get_beta_schedule("linear", 50)
  d = GaussianDiffusion(betas, model_mean_type="v", loss_type="l1")
  ref = GaussianDiffusion.create(betas, model_mean_type="v", loss_type="l1")
  leaves, treedef = jax.tree.flatten(d)
  rebuilt = jax.tree.unflatten(treedef, leaves)
  replaced = d.replace(loss_type="mse")
  for other in (ref, rebuilt, replaced):
    assert type(other) is GaussianDiffusion and other.model_mean_type == "v"
    np.testing.assert_array_equal(other.alphas_cumprod, ref.alphas_cumprod)
  assert (d.loss_type, rebuilt.loss_type, replaced.loss_type) == ("l1", "l1", "mse")
  with pytest.raises(ValueError, match="model_mean_type"):
    GaussianDiffusion(betas, model_mean_type="epsilon")
