"""Samplers: DDPM ancestral (full or respaced), DDIM, and Heun on the probability-flow ODE.

Every sampler runs its whole reverse loop as ONE `lax.scan` inside one jitted function, and calls
the model exactly once per scan iteration (the model is traced once per compilation).

Methods (N = num_steps model timesteps, chosen by `timestep_subsequence`):
  ddpm  Ancestral sampling x_{t-1} ~ p(x_{t-1} | x_t) (Ho et al. 2020, Alg. 2). With N < T the
        process is respaced to the N kept steps (Nichol & Dhariwal 2021, sec. 4): the betas of
        the kept steps are recomputed from alpha_bar, and learned variances interpolate between
        the respaced beta and beta-tilde. N model evaluations.
  ddim  DDIM (Song et al. 2021, eq. 12) on the kept steps, with
          sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')        (eq. 16),
        eta = 0 deterministic, eta = 1 the respaced DDPM posterior. N model evaluations.
  heun  Heun's 2nd-order method (Karras et al. 2022, EDM, Alg. 1) on the probability-flow ODE
        written in sigma = sqrt((1 - abar) / abar) and x_hat = x / sqrt(abar):
          d x_hat / d sigma = eps(x_hat sqrt(abar(sigma)), t(sigma))        (DDIM eq. 14),
        whose Euler step is exactly DDIM with eta = 0. The sigma grid is the trained DISCRETE
        timesteps kept by `timestep_subsequence` (no interpolation between timesteps; EDM sec. 3
        does the same for its discrete-time iDDPM models) followed by sigma = 0. Every step but
        the last takes an Euler predictor and a trapezoidal corrector; the last step (to
        sigma = 0) is Euler, which returns the prediction of x_0. 2 N - 1 model evaluations.

Timestep selection (`spacing`):
  uniform    N indices evenly spaced in [0, T - 1], rounded (improved-diffusion's
             `space_timesteps(T, "N")`); includes both the first and the last step.
  quadratic  tau_i = max(floor(c i^2), i), i = 0..N-1, c = (T - 1) / (N - 1)^2: the DDIM paper's
             quadratic selection (Song et al., appendix D: tau_i = floor(c i^2), c such that the
             last tau is close to T), here with the last kept step exactly T - 1 (the DDIM code
             stops at 0.8 T), and max(., i) keeping the steps distinct where c i^2 grows by less
             than 1 (the DDIM code repeats steps there). Dense near t = 0, where the ODE curves.

Randomness: each example's noise is drawn from its own key, `fold_in(key, global example index)`
(the initial noise from one sub-key, the noise of loop iteration i from `fold_in(other sub-key,
i)`). So devices never share a noise stream, and one global batch gives the same samples on 1
device or sharded over many.

Intermediates (`intermediate_every = k > 0`): the input x_t of model evaluation i for
i = 0, k, 2k, ... < NFE (i = 0 is the initial noise x_T; for 'heun' the inputs of the corrector
evaluations are the Euler-predicted points), then the final x_0: K = ceil(NFE / k) + 1 frames,
stacked as [K, B, H, W, C]. `num_intermediates` gives K.

Classifier-free guidance (Ho & Salimans 2022): with w = guidance_scale > 0 the first C output
channels (eps, x0 or v: all affine in eps with the same offset, so the combination is the same
in every parameterisation) become (1 + w) out(y) - w out(null); learned-variance channels are
taken from the conditional prediction (as GLIDE does). With `null_label` (the class index the
model learned for dropped labels; config.data.num_classes in this codebase) both come from one
call per step on the doubled batch [x, x] with labels [y, null_label]; with null_label None the
unconditional prediction is a second call with y = None. Labels enter as
  `sample(...)`:       model_fn(x_t, t) unconditionally, model_fn(x_t, t, y) when `y` is given;
  `make_sampler(...)`: apply_fn(params, x_t, t, y) with y None for unconditional models.
"""
import functools
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm import diffusion as diffusion_lib
from ddpm import models

METHODS = ("ddpm", "ddim", "heun")
SPACINGS = ("uniform", "quadratic")
DATA_AXIS = "data"

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Arguments and the timestep grid
# ---------------------------------------------------------------------------------------------
def _check_shape(shape) -> Tuple[int, int, int, int]:
  shape = tuple(shape)
  if len(shape) != 4 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
    raise ValueError(f"shape must be NHWC, 4 positive ints (batch, height, width, channels), "
                     f"got {shape!r}")
  b, h, w, c = (int(s) for s in shape)
  if h in (1, 3) and w == c and c > 4:
    raise ValueError(f"shape {shape!r} looks channels-first (NCHW); samplers take NHWC, e.g. "
                     f"{(b, w, c, h)!r}")
  return b, h, w, c


def _resolve_num_steps(num_timesteps: int, num_steps: Optional[int]) -> int:
  if num_steps is None or num_steps == 0:
    return num_timesteps
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
    raise ValueError(f"num_steps must be an int, got {num_steps!r}")
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, num_timesteps={num_timesteps}] (or None/0 for "
                     f"all steps), got {num_steps}")
  return int(num_steps)


def _check_args(method, eta, spacing, guidance_scale, intermediate_every):
  if method not in METHODS:
    raise ValueError(f"unknown sampling method {method!r}; expected one of {METHODS}")
  if spacing not in SPACINGS:
    raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
  if not eta >= 0:
    raise ValueError(f"eta must be >= 0, got {eta!r}")
  if eta != 0 and method != "ddim":
    raise ValueError(f"eta={eta!r} only applies to method 'ddim', not {method!r}")
  if not guidance_scale >= 0:
    raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
  if isinstance(intermediate_every, bool) or not isinstance(intermediate_every, (int, np.integer)) \
      or intermediate_every < 0:
    raise ValueError(f"intermediate_every must be an int >= 0, got {intermediate_every!r}")


def timestep_subsequence(num_timesteps: int, num_steps: int,
                         spacing: str = "uniform") -> np.ndarray:
  """The kept timesteps, increasing: int64 [num_steps] in [0, num_timesteps - 1].

  See the module docstring for 'uniform' and 'quadratic'. num_steps == num_timesteps keeps all.
  """
  if spacing not in SPACINGS:
    raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
  num_steps = _resolve_num_steps(num_timesteps, num_steps)
  if num_steps == 1:
    return np.asarray([num_timesteps - 1])
  if spacing == "uniform":
    steps = sorted(diffusion_lib.space_timesteps(num_timesteps, str(num_steps)))
    return np.asarray(steps, np.int64)
  i = np.arange(num_steps, dtype=np.float64)
  c = (num_timesteps - 1) / (num_steps - 1) ** 2
  # The 1e-9 guards floor() against c * i^2 landing just below an integer in float64.
  return np.maximum(np.floor(c * i ** 2 + 1e-9).astype(np.int64), np.arange(num_steps))


def num_function_evals(method: str, num_steps: int) -> int:
  """Model evaluations per sample (with guidance each is one call on a doubled batch)."""
  if method not in METHODS:
    raise ValueError(f"unknown sampling method {method!r}; expected one of {METHODS}")
  return 2 * num_steps - 1 if method == "heun" else num_steps


def num_intermediates(method: str, num_steps: int, intermediate_every: int) -> int:
  """K, the number of frames returned when intermediate_every > 0 (noise first, x_0 last)."""
  if intermediate_every <= 0:
    raise ValueError(f"intermediate_every must be > 0, got {intermediate_every}")
  return -(-num_function_evals(method, num_steps) // intermediate_every) + 1


# ---------------------------------------------------------------------------------------------
# Models: labels and classifier-free guidance
# ---------------------------------------------------------------------------------------------
def guided_model_fn(model_fn: Callable, y: Array, guidance_scale: float,
                    null_label: Optional[int], channels: int) -> Callable:
  """model_fn(x, t, y) and labels -> a 2-argument fn(x, t) for the samplers.

  Args:
    model_fn: fn(x_t [B, H, W, C], t [B] int32, y [B] int32) -> output [B, H, W, C or 2C].
    y: int [B] class labels.
    guidance_scale: w >= 0; 0 is plain conditional sampling (one call on B examples).
    null_label: the label the model was trained to read as "no class": the conditional and
      unconditional predictions come from ONE call on the doubled batch. None: the
      unconditional prediction is model_fn(x_t, t, None) (a second call).
    channels: C, the channels of the eps/x0/v part of the output.
  Returns:
    fn(x_t, t) -> output, with the first C channels (1 + w) out(y) - w out(null) when w > 0
    (Ho & Salimans 2022, eq. 6); any further (variance) channels from out(y).
  """
  if guidance_scale == 0:
    return lambda x, t: model_fn(x, t, y)
  w = guidance_scale

  def fn(x, t):
    b = x.shape[0]
    if null_label is None:
      out_c, out_u = model_fn(x, t, y), model_fn(x, t, None)
    else:
      null = jnp.full_like(y, null_label)
      out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                     jnp.concatenate([y, null]))
      out_c, out_u = out[:b], out[b:]
    guided = (1.0 + w) * out_c[..., :channels] - w * out_u[..., :channels]
    return jnp.concatenate([guided, out_c[..., channels:]], axis=-1)

  return fn


def _conditioned_model_fn(model_fn, y, guidance_scale, null_label, channels):
  """The 2-argument model the loop calls, from sample()'s model_fn and optional labels."""
  if y is None:
    if guidance_scale > 0:
      raise ValueError("guidance_scale > 0 needs class labels y")
    return model_fn
  return guided_model_fn(model_fn, y, guidance_scale, null_label, channels)


# ---------------------------------------------------------------------------------------------
# The reverse loop
# ---------------------------------------------------------------------------------------------
def _example_normal(key, offset, shape):
  """N(0, I) of `shape` [b, ...], example j drawn from fold_in(key, offset + j)."""
  index = offset + jnp.arange(shape[0])
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys)


def _f32(a) -> Array:
  return jnp.asarray(np.asarray(a, np.float64), jnp.float32)


def _alphas_cumprod64(diffusion) -> np.ndarray:
  """alpha_bar [T] in float64, from the float64 betas (the stored arrays are float32)."""
  return np.cumprod(1.0 - np.asarray(diffusion.betas_float64, np.float64))


def _build_plan(diffusion, method, num_steps, eta, spacing):
  """Static schedule of the loop: (diffusion to call, per-iteration arrays, NFE).

  ddim and heun call the model through `diffusion` at the ORIGINAL kept timesteps (they only
  need pred_xstart and eps there); ddpm with num_steps < T runs on the respaced process.
  """
  T = diffusion.num_timesteps
  n = _resolve_num_steps(T, num_steps)
  kept = timestep_subsequence(T, n, spacing)
  abar = _alphas_cumprod64(diffusion)
  dead = kept[abar[kept] <= 0]
  # alpha_bar = 0 (a beta of 1: the last step of 'jsd', or of 'linear' with T = 20) makes x_t
  # independent of x_0: an eps-model cannot predict x_0 there (0 / 0 in Ho eq. 11's inverse),
  # and DDIM / the ODE need the finite sigma = sqrt((1 - abar) / abar). Refuse, not NaN.
  if dead.size and (method != "ddpm" or diffusion.model_mean_type == "eps"):
    raise ValueError(
        f"method {method!r} with model_mean_type {diffusion.model_mean_type!r} needs "
        f"alpha_bar > 0 at every sampled timestep, but alpha_bar = 0 (beta = 1) at "
        f"{dead.tolist()} of {T}: use more timesteps or the 'cosine' schedule"
        + ("" if method != "ddpm" else ", or an 'x0'/'v' model"))
  if method == "ddpm":
    d = diffusion if n == T else diffusion_lib.respace(diffusion, [int(k) for k in kept])
    xs = dict(t=np.arange(n)[::-1].astype(np.int32))
    return d, xs, n
  if method == "ddim":
    a = abar[kept][::-1]                              # abar_t, t running down
    a_prev = np.concatenate([abar[kept][:-1][::-1], [1.0]])  # abar of the next (smaller) step
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
    xs = dict(t=kept[::-1].astype(np.int32), sqrt_a_prev=_f32(np.sqrt(a_prev)),
              dir_coef=_f32(np.sqrt(np.maximum(1 - a_prev - sigma ** 2, 0.0))),
              sigma=_f32(sigma))
    return diffusion, xs, n
  # heun: sigma grid from the kept steps (down) then 0.
  down = kept[::-1]
  a = abar[down]
  a_to = np.concatenate([a[1:], [1.0]])
  # Step j (from down[j] to the next level): x_next = sqrt(a_to / a) x + sqrt(a_to) dsigma d,
  # the update x_hat_next = x_hat + (sigma_to - sigma) d written for x = sqrt(abar) x_hat, so
  # the large x_hat (~ 1 / sqrt(abar_T)) never appears in float32.
  sig = np.sqrt((1 - a) / a)
  sig_to = np.sqrt((1 - a_to) / a_to)
  c_x = np.sqrt(a_to / a)
  c_d = np.sqrt(a_to) * (sig_to - sig)
  t_eval, corr, cx, cd = [], [], [], []
  for j in range(n):
    t_eval.append(down[j]); corr.append(False); cx.append(c_x[j]); cd.append(c_d[j])
    if j < n - 1:  # corrector at the predicted point; none for the final Euler step to 0
      t_eval.append(down[j + 1]); corr.append(True); cx.append(c_x[j]); cd.append(c_d[j])
  final = np.zeros(len(t_eval), bool)
  final[-1] = True
  xs = dict(t=np.asarray(t_eval, np.int32), corrector=np.asarray(corr), final=final,
            c_x=_f32(cx), c_d=_f32(cd))
  return diffusion, xs, len(t_eval)


def _reverse_loop(diffusion, model_fn, x_T, key, offset, *, method, xs, nfe, clip_denoised,
                  intermediate_every):
  """Runs the sampler from x_T [b, H, W, C]; one lax.scan, one model trace."""
  b = x_T.shape[0]
  add_noise = method == "ddpm" or (method == "ddim" and bool(np.any(np.asarray(xs["sigma"]) > 0)))
  k = intermediate_every
  # Initialised from x_T (every slot is overwritten) so that under shard_map the buffer is
  # device-varying like the loop's output.
  frames0 = jnp.broadcast_to(x_T, ((-(-nfe // k) if k else 0),) + x_T.shape)
  xs = dict(xs, i=np.arange(nfe, dtype=np.int32))

  def prediction(x, t):
    tt = jnp.full((b,), t, jnp.int32)
    out = diffusion.p_mean_variance(model_fn, x, tt, clip_denoised=clip_denoised)
    return tt, out

  def body(carry, s):
    x, aux, frames = carry
    if k:
      slot = s["i"] // k
      frames = frames.at[slot].set(jnp.where(s["i"] % k == 0, x, frames[slot]))
    tt, out = prediction(x, s["t"])
    noise = _example_normal(jax.random.fold_in(key, s["i"]), offset, x.shape) if add_noise \
        else None
    if method == "ddpm":
      nonzero = (s["t"] > 0).astype(x.dtype)  # no noise on the last step (Ho et al. Alg. 2)
      x = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
    elif method == "ddim":
      eps = diffusion.predict_eps_from_xstart(x, tt, out["pred_xstart"])
      x = s["sqrt_a_prev"] * out["pred_xstart"] + s["dir_coef"] * eps
      if add_noise:
        x = x + s["sigma"] * noise
    else:  # heun; aux = (x at the start of the step, eps there)
      eps = diffusion.predict_eps_from_xstart(x, tt, out["pred_xstart"])
      base = jnp.where(s["corrector"], aux[0], x)
      slope = jnp.where(s["corrector"], 0.5 * (aux[1] + eps), eps)
      aux = (base, eps)
      # The Euler step to sigma = 0 lands on pred_xstart; take it exactly (so clipping holds).
      x = jnp.where(s["final"], out["pred_xstart"], s["c_x"] * base + s["c_d"] * slope)
    return (x, aux, frames), None

  aux0 = (x_T, x_T) if method == "heun" else ()  # placeholders: the first predictor sets them
  (x, _, frames), _ = jax.lax.scan(body, (x_T, aux0, frames0), xs)
  if k:
    return x, jnp.concatenate([frames, x[None]])
  return x


def _sample_local(diffusion, model_fn, shape, key, noise, offset, *, method, plan, clip_denoised,
                  intermediate_every):
  """Draws x_T (unless given) and runs the loop for this device's `shape[0]` examples."""
  noise_key, loop_key = jax.random.split(key)
  x_T = _example_normal(noise_key, offset, shape) if noise is None else noise.astype(jnp.float32)
  d, xs, nfe = plan
  return _reverse_loop(d, model_fn, x_T, loop_key, offset, method=method, xs=xs, nfe=nfe,
                       clip_denoised=clip_denoised, intermediate_every=intermediate_every)


def _as_key(rng) -> Array:
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  if rng.shape != (2,) or rng.dtype != jnp.uint32:
    raise ValueError(f"rng must be a jax.random.key or raw uint32 [2] key data, got "
                     f"{rng.dtype} {rng.shape}")
  return jax.random.wrap_key_data(rng)


def _check_labels(y, batch, guidance_scale):
  if guidance_scale > 0 and y is None:
    raise ValueError("guidance_scale > 0 needs class labels y")
  if y is not None and tuple(jnp.shape(y)) != (batch,):
    raise ValueError(f"y has shape {tuple(jnp.shape(y))}, expected ({batch},)")


def _check_noise(noise, shape):
  if noise is not None and tuple(noise.shape) != tuple(shape):
    raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------
def sample(diffusion, model_fn: Callable, shape: Sequence[int], rng, method: str = "ddpm",
           num_steps: Optional[int] = None, eta: float = 0.0, clip_denoised: bool = True,
           spacing: str = "uniform", guidance_scale: float = 0.0, intermediate_every: int = 0,
           *, y: Optional[Array] = None, null_label: Optional[int] = None,
           noise: Optional[Array] = None):
  """Draws samples x_0 ~ p(x_0) with one jitted reverse loop (traced again on every call:
  use `make_sampler` to compile once and sample repeatedly).

  Args:
    diffusion: a `diffusion.GaussianDiffusion`.
    model_fn: fn(x_t [B, H, W, C], t [B] int32) -> model output [B, H, W, C or 2C]; when `y` is
      given, fn(x_t, t, y [B] int32) instead. A closure over the parameters.
    shape: (B, H, W, C) of the samples.
    rng: a jax.random.key (or raw uint32 [2] key data).
    method: 'ddpm', 'ddim' or 'heun' (module docstring).
    num_steps: model timesteps N (None or 0: all T). 'ddpm' with N < T samples the respaced
      process; 'heun' makes 2 N - 1 model evaluations.
    eta: DDIM's eta (method 'ddim' only).
    clip_denoised: clip the predicted x_0 to [-1, 1] at every step.
    spacing: 'uniform' or 'quadratic' selection of the N timesteps.
    guidance_scale: classifier-free guidance weight w (needs `y`).
    intermediate_every: k > 0 also returns the frames described in the module docstring.
    y: int [B] class labels for class-conditional models.
    null_label: the label meaning "no class" for guidance (one doubled-batch call per step);
      None: the unconditional prediction is model_fn(x_t, t, None) (a second call).
    noise: optional x_T [B, H, W, C] to start from (else drawn from rng).
  Returns:
    x_0 float32 [B, H, W, C], or (x_0, intermediates [K, B, H, W, C]) when intermediate_every > 0.
  """
  shape = _check_shape(shape)
  _check_args(method, eta, spacing, guidance_scale, intermediate_every)
  _check_noise(noise, shape)
  _check_labels(y, shape[0], guidance_scale)
  plan = _build_plan(diffusion, method, num_steps, eta, spacing)
  key = _as_key(rng)

  @jax.jit
  def run(key, y, noise):
    fn = _conditioned_model_fn(model_fn, y, guidance_scale, null_label, shape[-1])
    return _sample_local(diffusion, fn, shape, key, noise, 0, method=method, plan=plan,
                         clip_denoised=clip_denoised, intermediate_every=intermediate_every)

  return run(key, y, noise)


def make_sampler(diffusion, apply_fn: Callable, shape: Sequence[int], *, method: str = "ddpm",
                 num_steps: Optional[int] = None, eta: float = 0.0, clip_denoised: bool = True,
                 spacing: str = "uniform", guidance_scale: float = 0.0,
                 intermediate_every: int = 0, null_label: Optional[int] = None,
                 mesh: Optional[jax.sharding.Mesh] = None,
                 compiler_options: Optional[dict] = None) -> Callable:
  """Compiles a sampler once: returns fn(params, rng, y=None, noise=None) -> like `sample`.

  Args:
    apply_fn: fn(params, x_t [b, H, W, C], t [b] int32, y [b] int32 or None) -> output.
    shape: (B, H, W, C), B the GLOBAL batch.
    mesh: None runs on the default device; a Mesh with axis 'data' runs the loop under
      `jax.jit(jax.shard_map(...))`, each device sampling B / mesh size examples (with their
      own noise, see the module docstring) and returns the global batch sharded over 'data'.
      Single process: inputs are placed on the mesh here. Several processes: pass params
      replicated and y as a global array (`jax.make_array_from_process_local_data`).
    compiler_options: XLA options for the compilation (`jax.jit(compiler_options=...)`), e.g.
      `ddpm.models.compiler_options(mesh, config)`.
    Other arguments: as for `sample`.
  The returned fn jits once per (params structure, y given or not, noise given or not). It
  carries `.timesteps` (the kept timesteps, increasing) and `.num_function_evals` (model calls
  per sample; each a doubled batch under guidance).
  """
  shape = _check_shape(shape)
  _check_args(method, eta, spacing, guidance_scale, intermediate_every)
  plan = _build_plan(diffusion, method, num_steps, eta, spacing)
  n_dev = 1 if mesh is None else mesh.shape[DATA_AXIS]
  if shape[0] % n_dev:
    raise ValueError(f"batch {shape[0]} is not divisible by the {n_dev} devices of the mesh")
  local_shape = (shape[0] // n_dev,) + shape[1:]

  def local(params, key, y, noise):
    offset = 0 if mesh is None else jax.lax.axis_index(DATA_AXIS) * local_shape[0]
    if y is None:
      fn = lambda x, t: apply_fn(params, x, t, None)
    else:
      fn = guided_model_fn(functools.partial(apply_fn, params), y, guidance_scale, null_label,
                           shape[-1])
    return _sample_local(diffusion, fn, local_shape, key, noise, offset, method=method,
                         plan=plan, clip_denoised=clip_denoised,
                         intermediate_every=intermediate_every)

  if mesh is None:
    compiled = jax.jit(local, compiler_options=compiler_options)
  else:
    out_specs = (P(DATA_AXIS), P(None, DATA_AXIS)) if intermediate_every else P(DATA_AXIS)
    compiled = jax.jit(jax.shard_map(local, mesh=mesh,
                                     in_specs=(P(), P(), P(DATA_AXIS), P(DATA_AXIS)),
                                     out_specs=out_specs), compiler_options=compiler_options)

  def sampler(params, rng, y=None, noise=None):
    _check_labels(y, shape[0], guidance_scale)
    _check_noise(noise, shape)
    key = _as_key(rng)
    if mesh is not None and jax.process_count() == 1:
      params, key = jax.device_put((params, key), NamedSharding(mesh, P()))
      y, noise = jax.device_put((y, noise), NamedSharding(mesh, P(DATA_AXIS)))
    return compiled(params, key, y, noise)

  # For logs and benchmarks: the kept timesteps (increasing) and model calls per sample.
  sampler.timesteps = timestep_subsequence(diffusion.num_timesteps, num_steps, spacing)
  sampler.num_function_evals = plan[2]
  return sampler


def sample_sharded(diffusion, model_fn: Callable, shape: Sequence[int], rng,
                   mesh: Optional[jax.sharding.Mesh] = None, **kwargs):
  """`sample` with the batch split over the 'data' axis of `mesh` (default: all devices).

  model_fn and keyword arguments as for `sample` (y and noise, if given, are global [B, ...]
  and split over the devices). Returns the global batch; equal to `sample(...)` with the same
  rng, since every example's noise depends only on its global index.
  """
  from ddpm import distributed
  mesh = distributed.make_data_mesh() if mesh is None else mesh
  y = kwargs.pop("y", None)
  noise = kwargs.pop("noise", None)
  sampler = make_sampler(diffusion, lambda params, x, t, y: (
      model_fn(x, t) if y is None else model_fn(x, t, y)), shape, mesh=mesh, **kwargs)
  return sampler({}, rng, y=y, noise=noise)


def apply_fn_from_model(model) -> Callable:
  """apply_fn(params, x_t, t, y) for a Flax model called as model.apply(v, x, t, y=y, train=)."""
  def apply_fn(params, x, t, y):
    return model.apply({"params": params}, x, t, y=y, train=False)
  return apply_fn


def make_sampler_from_config(config, diffusion, apply_fn: Callable,
                             mesh: Optional[jax.sharding.Mesh] = None,
                             batch_size: Optional[int] = None,
                             intermediate_every: Optional[int] = None) -> Callable:
  """`make_sampler` with the settings of config.sampling (batch: config.sampling.batch_size).

  The null label of classifier-free guidance is config.data.num_classes (the extra class the
  model learns with model.class_dropout > 0). Compiles with the model's XLA options for `mesh`
  (default: the default backend), see `ddpm.models.compiler_options`.
  """
  s = config.sampling
  size, channels = config.data.image_size, config.data.channels
  batch = s.batch_size if batch_size is None else batch_size
  return make_sampler(
      diffusion, apply_fn, (batch, size, size, channels), method=s.method,
      num_steps=s.num_steps or None, eta=s.eta, clip_denoised=s.clip_denoised,
      spacing=s.spacing, guidance_scale=s.guidance_scale,
      intermediate_every=s.intermediate_every if intermediate_every is None
      else intermediate_every,
      null_label=config.data.num_classes if s.guidance_scale > 0 else None, mesh=mesh,
      compiler_options=models.compiler_options(mesh, config))
