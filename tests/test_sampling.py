"""Tests of ddpm/sampling.py without training.

For Gaussian data x0 ~ N(mu, s^2) per pixel the optimal denoiser is known in closed form:
  E[x0 | x_t] = mu + sqrt(ab) s^2 / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu),
so every sampler step is an affine map of x_t plus Gaussian noise, and the exact mean and
variance of the samples follow from a float64 numpy recursion written here from the papers'
equations (DDPM Alg. 2 / eq. 7, DDIM eq. 12 / 16, EDM Alg. 1 in its own x_hat, sigma variables).
Samples must match that recursion to Monte-Carlo tolerance, and the accurate samplers must
reproduce the data's mean and variance.
"""
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm import diffusion as diffusion_lib
from ddpm import distributed
from ddpm import sampling
from ddpm import schedules

T = 100
MU, S = 0.3, 0.5
SHAPE = (256, 8, 8, 1)            # 16384 i.i.d. pixels per sample call
N_PIX = int(np.prod(SHAPE))


def _betas():
  return schedules.get_beta_schedule("linear", T)


def _abar64():
  return np.cumprod(1.0 - _betas())


@functools.lru_cache(maxsize=None)
def make_diffusion(model_var_type="fixed_large", model_mean_type="eps"):
  return diffusion_lib.GaussianDiffusion.create(_betas(), model_mean_type=model_mean_type,
                                                model_var_type=model_var_type)


@pytest.fixture(scope="module")
def diff():
  return make_diffusion()


def _posterior_x0(x, a, mu, s):
  """E[x0 | x_t] for x0 ~ N(mu, s^2): x [B, ...], a = alpha_bar [B, 1, 1, 1]."""
  return mu + jnp.sqrt(a) * s ** 2 / (a * s ** 2 + 1 - a) * (x - jnp.sqrt(a) * mu)


# Parameters of the closed-form "network": data mean and std, the learned-variance output v
# (learned_range: -1 selects beta tilde, +1 beta), and a label shift for class conditioning.
PARAMS = {"mu": MU, "s": S, "v": 0.0, "label_shift": 0.1}


def params(**kw):
  return {k: jnp.float32(v) for k, v in dict(PARAMS, **kw).items()}


def optimal_apply(mean_type="eps", learned_var=False):
  """apply_fn(params, x_t, t, y): the Bayes-optimal output for Gaussian data in `mean_type`
  parameterisation (+ label_shift * y when labels are given; + C channels of v if learned)."""
  abar = jnp.asarray(_abar64(), jnp.float32)

  def apply_fn(p, x, t, y):
    a = abar[t][:, None, None, None]
    x0 = _posterior_x0(x, a, p["mu"], p["s"])
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    out = {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[mean_type]
    if y is not None:
      out = out + p["label_shift"] * y[:, None, None, None].astype(jnp.float32)
    if learned_var:
      out = jnp.concatenate([out, jnp.full_like(out, p["v"])], axis=-1)
    return out

  return apply_fn


def optimal_model(mean_type="eps", **kw):
  """The same as a sample() closure model_fn(x_t, t) (or (x_t, t, y))."""
  apply_fn, p = optimal_apply(mean_type, "v" in kw), params(**kw)
  return lambda x, t, y=None: apply_fn(p, x, t, y)


@functools.lru_cache(maxsize=None)
def cached_sampler(model_var_type="fixed_large", model_mean_type="eps", shape=SHAPE, **kw):
  """Compiled samplers shared by the tests (each compilation costs about a second)."""
  learned = model_var_type in ("learned", "learned_range")
  return sampling.make_sampler(make_diffusion(model_var_type, model_mean_type),
                               optimal_apply(model_mean_type, learned), shape, **kw)


# ---- float64 reference: exact moments of the samples ----------------------------------------
def _affine_x0(a):
  """E[x0 | x_t] = k x_t + c for ab = a."""
  k = np.sqrt(a) * S ** 2 / (a * S ** 2 + 1 - a)
  return k, MU * (1 - k * np.sqrt(a))


def _affine_eps(a):
  k, c = _affine_x0(a)
  return (1 - np.sqrt(a) * k) / np.sqrt(1 - a), -np.sqrt(a) * c / np.sqrt(1 - a)


def reference_ddpm_moments():
  """Full-T ancestral sampling with beta (fixed_large) variances, Ho et al. Alg. 2."""
  betas = _betas()
  ab = _abar64()
  ab_prev = np.append(1.0, ab[:-1])
  m, v = 0.0, 1.0
  for t in range(T - 1, -1, -1):
    k, c = _affine_x0(ab[t])
    coef1 = betas[t] * np.sqrt(ab_prev[t]) / (1 - ab[t])             # Ho eq. 7
    coef2 = (1 - ab_prev[t]) * np.sqrt(1 - betas[t]) / (1 - ab[t])
    A, B = coef1 * k + coef2, coef1 * c
    m, v = A * m + B, A * A * v + (betas[t] if t > 0 else 0.0)
  return m, v


def reference_ddim_moments(kept, eta):
  """DDIM eq. 12 over the kept steps (increasing), sigma from eq. 16."""
  ab = _abar64()[np.asarray(kept)]
  m, v = 0.0, 1.0
  for i in range(len(kept) - 1, -1, -1):
    a, a_prev = ab[i], (ab[i - 1] if i > 0 else 1.0)
    sigma2 = eta ** 2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    k, c = _affine_x0(a)
    p, q = _affine_eps(a)
    d = np.sqrt(1 - a_prev - sigma2)
    A, B = np.sqrt(a_prev) * k + d * p, np.sqrt(a_prev) * c + d * q
    m, v = A * m + B, A * A * v + sigma2
  return m, v


def reference_heun_moments(kept):
  """Karras et al. 2022 Alg. 1 in x_hat = x / sqrt(ab), sigma^2 = (1 - ab) / ab, where the
  optimal denoiser is D(x_hat; sigma) = mu + s^2 / (s^2 + sigma^2) (x_hat - mu)."""
  ab = _abar64()[np.asarray(kept)][::-1]
  sig = list(np.sqrt((1 - ab) / ab)) + [0.0]
  slope = lambda sg: (sg / (S ** 2 + sg ** 2), -MU * sg / (S ** 2 + sg ** 2))  # d = a x + b
  m, v = 0.0, 1.0 / ab[0]                       # x_T ~ N(0, I)  =>  x_hat = x_T / sqrt(ab_T)
  for i in range(len(ab)):
    h = sig[i + 1] - sig[i]
    a1, b1 = slope(sig[i])
    A, B = 1 + h * a1, h * b1                       # Euler: x' = x + h d(x)
    if sig[i + 1] > 0:                              # trapezoidal correction
      a2, b2 = slope(sig[i + 1])
      A, B = 1 + h / 2 * (a1 + a2 * (1 + h * a1)), h / 2 * (b1 + a2 * h * b1 + b2)
    m, v = A * m + B, A * A * v
  return m, v


def assert_moments(x, m, v, what):
  """Sample mean/variance of i.i.d. pixels against (m, v): 5 standard errors."""
  x = np.asarray(x, np.float64).ravel()
  assert abs(x.mean() - m) < 5 * np.sqrt(v / x.size), (what, x.mean(), m)
  assert abs(x.var() - v) < 5 * v * np.sqrt(2.0 / x.size), (what, x.var(), v)


# rel_tol: how close the sampler's exact variance (the reference) is to the data's s^2. These
# are the samplers' own discretisation biases at T = 100, known exactly from the reference:
# full-T DDPM +3%; DDIM is first order and under-disperses narrow data (-11% at 50 uniform
# steps, -6% at 50 quadratic ones; eta = 1 is worst at few steps, as in DDIM's Table 1); Heun
# is second order (+4% at 20 uniform steps, -0.1% at 50) and beats full-T DDPM in 20 steps.
CASES = [
    # (id, kwargs, reference, rel_tol or None)
    ("ddpm", dict(method="ddpm"), "ddpm", 0.04),
    ("ddim20", dict(method="ddim", num_steps=20), ("ddim", 20, "uniform", 0.0), None),
    ("ddim50_quad", dict(method="ddim", num_steps=50, spacing="quadratic"),
     ("ddim", 50, "quadratic", 0.0), 0.07),
    ("ddim50_eta1", dict(method="ddim", num_steps=50, eta=1.0), ("ddim", 50, "uniform", 1.0),
     0.22),
    ("ddim20_quad_eta05", dict(method="ddim", num_steps=20, eta=0.5, spacing="quadratic"),
     ("ddim", 20, "quadratic", 0.5), None),
    ("heun10", dict(method="heun", num_steps=10), ("heun", 10, "uniform"), None),
    ("heun20_quad", dict(method="heun", num_steps=20, spacing="quadratic"),
     ("heun", 20, "quadratic"), 0.03),
]


def _reference(spec):
  if spec == "ddpm":
    return reference_ddpm_moments()
  kept = sampling.timestep_subsequence(T, spec[1], spec[2])
  if spec[0] == "ddim":
    return reference_ddim_moments(kept, spec[3])
  return reference_heun_moments(kept)


@pytest.mark.parametrize("name,kwargs,spec,rel_tol", CASES, ids=[c[0] for c in CASES])
def test_gaussian_data_moments(name, kwargs, spec, rel_tol):
  x = cached_sampler(clip_denoised=False, **kwargs)(params(), jax.random.key(0))
  assert x.shape == SHAPE and x.dtype == jnp.float32
  m, v = _reference(spec)
  assert_moments(x, m, v, name)
  if rel_tol is not None:  # the sampler itself is accurate: its exact moments are the data's
    assert abs(m - MU) < 0.01 and abs(v / S ** 2 - 1) < rel_tol, (name, m, v)


@pytest.mark.parametrize("mean_type", ["x0", "v"])
def test_other_parameterisations(mean_type):
  x = cached_sampler(model_mean_type=mean_type, method="heun", num_steps=10,
                     clip_denoised=False)(params(), jax.random.key(1))
  assert_moments(x, *reference_heun_moments(sampling.timestep_subsequence(T, 10)), mean_type)


def test_sample_function(diff):
  """sample() (closure model, traced on each call) agrees with the compiled make_sampler."""
  traces = []

  def model_fn(x, t):
    traces.append(1)
    return optimal_model()(x, t)

  kw = dict(method="ddim", num_steps=50, eta=1.0, clip_denoised=False)
  x = sampling.sample(diff, model_fn, SHAPE, jax.random.key(0), **kw)
  assert len(traces) == 1
  np.testing.assert_allclose(x, cached_sampler(**kw)(params(), jax.random.key(0)), atol=1e-5)


def test_respaced_ddpm_fixed_small_and_learned_range_equal_ddim_eta1():
  """Respaced ancestral sampling with beta-tilde variances is DDIM with eta = 1 (eq. 16), and a
  learned_range model answering v = -1 selects beta-tilde (Improved DDPM eq. 15)."""
  rng = jax.random.key(2)
  kw = dict(method="ddpm", num_steps=50, clip_denoised=False)
  x_ddim = cached_sampler(method="ddim", num_steps=50, eta=1.0,
                          clip_denoised=False)(params(), rng)
  x_small = cached_sampler("fixed_small", **kw)(params(), rng)
  x_learned = cached_sampler("learned_range", **kw)(params(v=-1.0), rng)
  np.testing.assert_allclose(x_small, x_ddim, atol=2e-5)
  np.testing.assert_allclose(x_learned, x_small, atol=2e-5)
  x_large = cached_sampler("learned_range", **kw)(params(v=1.0), rng)
  assert np.abs(np.asarray(x_large) - np.asarray(x_small)).max() > 1e-2


def _find_eqns(jaxpr, name):
  """All equations of primitive `name` in a jaxpr and its sub-jaxprs (jit, scan bodies, ...)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      found.append(eqn)
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else [value]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _find_eqns(sub.jaxpr, name)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _find_eqns(sub, name)
  return found


def test_loop_is_one_scan_with_one_model_trace(diff):
  for method in sampling.METHODS:
    traces = []

    def apply_fn(p, x, t, y):
      traces.append(1)
      return optimal_apply()(p, x, t, y)

    sampler = sampling.make_sampler(diff, apply_fn, (2, 4, 4, 1), method=method, num_steps=10)
    jaxpr = jax.make_jaxpr(sampler)(params(), jax.random.key(0))
    assert len(traces) == 1, (method, len(traces))
    scans = _find_eqns(jaxpr.jaxpr, "scan")
    assert len(scans) == 1 and scans[0].params["length"] == sampling.num_function_evals(
        method, 10) == sampler.num_function_evals, method
    np.testing.assert_array_equal(sampler.timesteps, sampling.timestep_subsequence(T, 10))


def test_make_sampler_compiles_once_and_rng_matters(diff):
  traces = []

  def apply_fn(p, x, t, y):
    traces.append(1)
    return optimal_apply()(p, x, t, y)

  sampler = sampling.make_sampler(diff, apply_fn, (4, 4, 4, 1), method="ddpm", num_steps=10)
  a = sampler(params(), jax.random.key(0))
  b = sampler(params(s=0.4), jax.random.key(1))
  a2 = sampler(params(), jax.random.key_data(jax.random.key(0)))  # raw key data works too
  assert len(traces) == 1
  assert np.abs(np.asarray(a) - np.asarray(b)).min() > 0
  np.testing.assert_array_equal(a, a2)


NOISE = jax.random.normal(jax.random.key(5), SHAPE)


@pytest.mark.parametrize("method,num_steps", [("ddim", 20), ("heun", 10)])
def test_deterministic_samplers_depend_only_on_noise(method, num_steps):
  sampler = cached_sampler(method=method, num_steps=num_steps, clip_denoised=False)
  a = sampler(params(), jax.random.key(0), noise=NOISE)
  b = sampler(params(), jax.random.key(1), noise=NOISE)
  np.testing.assert_array_equal(a, b)
  c = sampler(params(), jax.random.key(1))
  assert not np.allclose(a, c)


@pytest.mark.parametrize("method,num_steps", [("ddim", 20), ("heun", 10)])
def test_clip_denoised_bounds_the_final_prediction(method, num_steps):
  wide = params(mu=0.0, s=2.0)  # their last step returns the (clipped) predicted x_0
  x = cached_sampler(method=method, num_steps=num_steps, clip_denoised=True)(
      wide, jax.random.key(0))
  assert np.abs(np.asarray(x)).max() <= 1.0
  x = cached_sampler(method=method, num_steps=num_steps, clip_denoised=False)(
      wide, jax.random.key(0))
  assert np.abs(np.asarray(x)).max() > 1.0


@pytest.mark.parametrize("method,num_steps,every", [("ddim", 20, 3), ("heun", 10, 4),
                                                     ("ddpm", None, 25)])
def test_intermediates(method, num_steps, every):
  kw = dict(method=method, num_steps=num_steps, clip_denoised=False)
  x, frames = cached_sampler(intermediate_every=every, **kw)(params(), jax.random.key(0),
                                                              noise=NOISE)
  nfe = sampling.num_function_evals(method, num_steps or T)
  k = sampling.num_intermediates(method, num_steps or T, every)
  assert k == len(range(0, nfe, every)) + 1
  assert frames.shape == (k,) + SHAPE
  np.testing.assert_array_equal(frames[0], NOISE)   # noise first
  np.testing.assert_array_equal(frames[-1], x)      # the sample last
  plain = cached_sampler(**kw)(params(), jax.random.key(0), noise=NOISE)
  np.testing.assert_allclose(plain, x, atol=1e-6)
  if method == "ddim":  # frame j is x after j * every DDIM steps: rerun from frame 1
    kept = sampling.timestep_subsequence(T, num_steps)
    d_rest = make_diffusion().respace(kept[:num_steps - every])
    rest = sampling.sample(d_rest, optimal_model(), SHAPE, jax.random.key(0), method="ddim",
                           clip_denoised=False, noise=frames[1])
    np.testing.assert_allclose(rest, x, atol=1e-4)


def test_sharded_sampling_is_the_global_batch(diff):
  mesh = distributed.make_data_mesh()
  assert mesh.shape["data"] == 8
  kw = dict(method="ddpm", num_steps=10, intermediate_every=5)
  sharded = sampling.make_sampler(diff, optimal_apply(), SHAPE, mesh=mesh, **kw)
  x, frames = sharded(params(), jax.random.key(7))
  assert x.shape == SHAPE and frames.shape == (3,) + SHAPE
  assert x.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4)
  noise = np.asarray(frames[0]).reshape(8, -1)      # each device's x_T
  diffs = np.abs(noise[:, None] - noise[None]).max(-1)
  assert (diffs + np.eye(8) > 0).all()              # 8 distinct noise streams
  x1, _ = cached_sampler(**kw)(params(), jax.random.key(7))
  np.testing.assert_allclose(x, x1, atol=1e-5)      # same examples, whatever the device count
  x2, _ = sampling.sample_sharded(diff, optimal_model(), SHAPE, jax.random.key(7), mesh=mesh,
                                  **kw)
  np.testing.assert_allclose(x2, x1, atol=1e-5)


def test_guidance(diff):
  shape = (4, 4, 4, 1)
  y = jnp.asarray([0, 1, 2, 1], jnp.int32)
  null, w = 3, 2.0
  rng = jax.random.key(0)
  model = optimal_model()
  kw = dict(method="ddim", num_steps=10, clip_denoised=False)
  conditional = sampling.make_sampler(diff, optimal_apply(), shape, **kw)
  cond = conditional(params(), rng, y)
  w0 = sampling.sample(diff, model, shape, rng, guidance_scale=0.0, y=y, null_label=null, **kw)
  np.testing.assert_allclose(w0, cond, atol=1e-6)
  # null_label None: the unconditional prediction is apply_fn(params, x, t, None), here the
  # optimal model, so (1 + w) eps(y) - w eps(None) = optimal + shift (1 + w) y.
  guided = sampling.make_sampler(diff, optimal_apply(), shape, guidance_scale=w, **kw)(
      params(), rng, y)
  np.testing.assert_allclose(
      guided, conditional(params(label_shift=(1 + w) * PARAMS["label_shift"]), rng, y),
      atol=1e-4)
  # w > 0 (compiled path): (1 + w) eps(y) - w eps(null) = optimal + shift ((1 + w) y - w null).
  # Variance channels must come from the conditional half: v = -1 (beta tilde) there, the null
  # half answers v = +1, so the result is ancestral sampling with fixed_small variances.
  def apply_fn(p, x, t, yy):
    out = optimal_apply()(p, x, t, yy)
    v = jnp.where(yy == null, 1.0, -1.0)[:, None, None, None] * jnp.ones_like(out)
    return jnp.concatenate([out, v], -1)

  sampler = sampling.make_sampler(make_diffusion("learned_range"), apply_fn, shape,
                                  method="ddpm", num_steps=10, clip_denoised=False,
                                  guidance_scale=w, null_label=null)
  guided = sampler(params(), rng, y)
  mixed = sampling.sample(make_diffusion("fixed_small"),
                          lambda x, t: model(x, t, (1 + w) * y - w * null), shape, rng,
                          method="ddpm", num_steps=10, clip_denoised=False)
  np.testing.assert_allclose(guided, mixed, atol=1e-4)
  assert np.abs(np.asarray(guided) - np.asarray(cond)).max() > 0.1


def test_timestep_subsequence():
  for n in (1, 2, 7, 10, 33, 100):
    for spacing in sampling.SPACINGS:
      kept = sampling.timestep_subsequence(T, n, spacing)
      assert len(kept) == n and kept[-1] == T - 1 and (np.diff(kept) > 0).all()
      assert n == 1 or kept[0] == 0
  np.testing.assert_array_equal(sampling.timestep_subsequence(T, 20),
                                diffusion_lib.space_timesteps(T, "20"))
  kept = sampling.timestep_subsequence(1000, 10, "quadratic")  # c = 999 / 81: floor(c i^2)
  np.testing.assert_array_equal(kept, [int(np.floor(999 / 81 * i * i + 1e-9)) for i in range(10)])


def test_config_sampler():
  from ddpm import config_validation
  config = config_validation.default_config()
  config.data.image_size, config.sampling.batch_size = 4, 8
  config.sampling.method, config.sampling.num_steps = "ddim", 5
  d = diffusion_lib.from_config(config)
  sampler = sampling.make_sampler_from_config(config, d, lambda p, x, t, y: jnp.zeros_like(x),
                                              mesh=distributed.make_data_mesh())
  assert sampler({}, jax.random.key(0)).shape == (8, 4, 4, 1)


def test_bad_arguments(diff):
  model = optimal_model()
  rng = jax.random.key(0)
  shape = (2, 4, 4, 1)
  with pytest.raises(ValueError, match="unknown sampling method 'euler'"):
    sampling.sample(diff, model, shape, rng, method="euler")
  with pytest.raises(ValueError, match="num_steps.*101"):
    sampling.sample(diff, model, shape, rng, method="ddim", num_steps=T + 1)
  with pytest.raises(ValueError, match="num_steps"):
    sampling.sample(diff, model, shape, rng, method="ddim", num_steps=-3)
  with pytest.raises(ValueError, match="NHWC"):
    sampling.sample(diff, model, (2, 4, 4), rng)
  with pytest.raises(ValueError, match="NCHW"):
    sampling.sample(diff, model, (2, 3, 16, 16), rng)
  with pytest.raises(ValueError, match="spacing 'log'"):
    sampling.sample(diff, model, shape, rng, method="ddim", spacing="log")
  with pytest.raises(ValueError, match="eta"):
    sampling.sample(diff, model, shape, rng, method="ddpm", eta=0.5)
  with pytest.raises(ValueError, match="eta"):
    sampling.sample(diff, model, shape, rng, method="ddim", eta=-1.0)
  with pytest.raises(ValueError, match="needs class labels"):
    sampling.sample(diff, model, shape, rng, guidance_scale=1.0)
  with pytest.raises(ValueError, match=r"y has shape \(3,\), expected \(2,\)"):
    sampling.sample(diff, optimal_model(), shape, rng, guidance_scale=1.0,
                    y=jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="intermediate_every"):
    sampling.sample(diff, model, shape, rng, intermediate_every=-1)
  with pytest.raises(ValueError, match="noise has shape"):
    sampling.sample(diff, model, shape, rng, noise=jnp.zeros((2, 4, 4, 3)))
  with pytest.raises(ValueError, match="divisible"):
    sampling.make_sampler(diff, lambda p, x, t, y: x, (6, 4, 4, 1),
                          mesh=distributed.make_data_mesh())
  jsd = diffusion_lib.GaussianDiffusion.create(schedules.get_beta_schedule("jsd", 10))
  for method in sampling.METHODS:  # alpha_bar_T = 0: no x_0 from an eps-model, sigma = inf
    with pytest.raises(ValueError, match=r"alpha_bar > 0 .* at \[9\] of 10"):
      sampling.sample(jsd, model, shape, rng, method=method)
  with pytest.raises(ValueError, match="alpha_bar > 0"):
    sampling.sample(diffusion_lib.GaussianDiffusion.create(jsd.betas_float64, model_mean_type="x0"),
                    model, shape, rng, method="ddim")


@pytest.mark.slow
def test_unet_guided_heun_on_the_mesh():
  """The real U-Net (bfloat16, learned_range, class-conditional) through the config path."""
  from ddpm import config_validation, models
  c = config_validation.default_config()
  c.data.image_size, c.model.ch, c.model.attn_resolutions = 8, 8, (4,)
  c.data.num_classes, c.model.class_dropout, c.sampling.guidance_scale = 3, 0.1, 1.0
  c.diffusion.num_timesteps, c.diffusion.model_var_type = 40, "learned_range"
  c.sampling.batch_size, c.sampling.method, c.sampling.num_steps = 8, "heun", 5
  c.training.compute_dtype = "bfloat16"
  config_validation.validate_config(c, jax.device_count())
  model = models.build_model(c)
  p = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32),
                 y=jnp.zeros((1,), jnp.int32))["params"]
  sampler = sampling.make_sampler_from_config(c, diffusion_lib.from_config(c),
                                              sampling.apply_fn_from_model(model),
                                              mesh=distributed.make_data_mesh())
  x = sampler(p, jax.random.key(1), jnp.arange(8) % 3)
  assert x.shape == (8, 8, 8, 1) and x.dtype == jnp.float32
  assert np.isfinite(np.asarray(x)).all() and np.abs(np.asarray(x)).max() <= 1.0
