"""Gaussian diffusion: forward process, model parameterisations, training losses, exact bits/dim.

Follows Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (Improved DDPM) and improved-diffusion's
naming. Conventions:
  * images x are NHWC in [-1, 1]; `t` is an int array [B] of indices 0..T-1 (index t is the
    paper's step t + 1, so t = 0 is the decoder step);
  * `model_fn(x_t, t)` returns the network output [B, H, W, C] (or [B, H, W, 2C] for learned
    variances: mean part first, variance part second on the last axis). It is always called with
    `self.timestep_map[t]`, so after respacing the network still sees its training indices;
  * per-example coefficients come back shaped [B, 1, 1, 1] and broadcast against x.

`GaussianDiffusion(betas, ...)` (the same as `GaussianDiffusion.create(betas, ...)`) builds one.
It is an immutable `flax.struct.dataclass`: a JAX pytree whose leaves are the coefficient
arrays, with the configuration and the float64 schedule as static fields, so it can be closed
over by jitted code or passed to it as an argument. All coefficients are computed in float64 numpy and stored as float32 jnp arrays.
"""
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm import losses
from ddpm import schedules

MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixed_large", "fixed_small", "learned", "learned_range")
LOSS_TYPES = ("mse", "l1", "huber", "kl", "hybrid")
LEARNED_VAR_TYPES = ("learned", "learned_range")  # the network outputs a variance too

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_choice(value, choices, what):
  if value not in choices:
    raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(choices)}")


_STATIC = dict(pytree_node=False)


class _BuildOnCall(type):
  """Keeps `GaussianDiffusion(betas, ...)` (the public constructor) meaning
  `GaussianDiffusion.create(betas, ...)`. The dataclass's field-by-field constructor, which JAX
  uses to rebuild the pytree and `.replace` uses, is taken when every field comes by name."""

  def __call__(cls, *args, **kwargs):
    if args or "alphas_cumprod" not in kwargs:
      return cls.create(*args, **kwargs)
    return super().__call__(**kwargs)


@flax.struct.dataclass(eq=False)  # compared by identity, as the arrays have no single truth value
class GaussianDiffusion(metaclass=_BuildOnCall):
  """Coefficients and maths of one Gaussian diffusion process (immutable; a pytree).

  Build it with `GaussianDiffusion(betas, ...)`, the same as `GaussianDiffusion.create(betas,
  ...)` (or with `from_config`). The coefficient
  arrays are the pytree's leaves; the configuration and the float64 schedule are static (as
  tuples, so that jit can hash them), so it can be closed over by jitted code or passed to it.

  Attributes (float32 [T] unless noted), named as in improved-diffusion:
    betas, alphas_cumprod (alpha_bar_t), alphas_cumprod_prev (alpha_bar_{t-1}, 1 at t=0),
    alphas_cumprod_next (0 at t=T-1), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
    log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
    posterior_variance (beta tilde, Ho eq. 7), posterior_log_variance_clipped (log beta tilde
    with the t=0 entry, which is 0, replaced by t=1's), posterior_mean_coef1/2 (Ho eq. 7),
    log_betas, fixed_large_variance / fixed_large_log_variance (betas with the t=0 entry
    replaced by the posterior variance at t=1, as DDPM does, so the decoder is not
    degenerate), snr (alpha_bar / (1 - alpha_bar)), loss_weight (min-SNR weights, ones when
    off), timestep_map (int32 [T], original timestep of each step; identity unless respaced),
    num_timesteps (int), model_mean_type, model_var_type, loss_type, hybrid_lambda,
    min_snr_gamma.
  """
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  alphas_cumprod_next: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  log_betas: jax.Array
  fixed_large_variance: jax.Array
  fixed_large_log_variance: jax.Array
  snr: jax.Array
  loss_weight: jax.Array
  timestep_map: jax.Array  # int32 [T]
  model_mean_type: str = flax.struct.field(**_STATIC)
  model_var_type: str = flax.struct.field(**_STATIC)
  loss_type: str = flax.struct.field(**_STATIC)
  hybrid_lambda: float = flax.struct.field(**_STATIC)
  min_snr_gamma: float = flax.struct.field(**_STATIC)
  num_timesteps: int = flax.struct.field(**_STATIC)
  betas64: Tuple[float, ...] = flax.struct.field(**_STATIC)      # the schedule, exact float64
  timestep_map64: Tuple[int, ...] = flax.struct.field(**_STATIC)  # timestep_map on the host

  @classmethod
  def create(cls, betas, model_mean_type: str = "eps", model_var_type: str = "fixed_large",
             loss_type: str = "mse", hybrid_lambda: float = 0.001, min_snr_gamma: float = 0.0,
             timestep_map: Optional[Sequence[int]] = None) -> "GaussianDiffusion":
    """Builds the coefficients (in float64 numpy, stored as float32 arrays).

    Args:
      betas: the schedule, [T] in (0, 1] (e.g. from `schedules.get_beta_schedule`).
      model_mean_type: what the network predicts: 'eps' (the noise, Ho eq. 11), 'x0', or 'v'
        (Salimans & Ho 2022: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0).
      model_var_type: 'fixed_small' (posterior variance beta tilde), 'fixed_large' (beta),
        'learned' (the network outputs log variance), 'learned_range' (the network outputs
        v in [-1, 1] interpolating log beta tilde .. log beta, Improved DDPM eq. 15).
      loss_type: 'mse' (L_simple, Ho eq. 14), 'l1', 'huber', 'kl' (one term of the variational
        bound, Ho eq. 5, in bits/dim) or 'hybrid' (L_simple + lambda L_vlb, Improved DDPM
        eq. 16). The regression target follows model_mean_type.
      hybrid_lambda: lambda of the hybrid loss.
      min_snr_gamma: > 0 weights the regression loss per timestep by min-SNR-gamma
        (Hang et al. 2023).
      timestep_map: original index of each step (set by `respace`); default identity.
    Raises:
      ValueError: naming any bad argument.
    """
    betas64 = schedules.validate_betas(betas)
    _check_choice(model_mean_type, MEAN_TYPES, "model_mean_type")
    _check_choice(model_var_type, VAR_TYPES, "model_var_type")
    _check_choice(loss_type, LOSS_TYPES, "loss_type")
    if loss_type == "hybrid" and model_var_type not in LEARNED_VAR_TYPES:
      raise ValueError("loss_type 'hybrid' trains the variance through L_vlb: it needs "
                       f"model_var_type 'learned' or 'learned_range', got {model_var_type!r}")
    hybrid_lambda = float(hybrid_lambda)
    min_snr_gamma = float(min_snr_gamma)
    if not (math.isfinite(hybrid_lambda) and hybrid_lambda >= 0):
      raise ValueError(f"hybrid_lambda must be a finite number >= 0, got {hybrid_lambda!r}")
    if not (math.isfinite(min_snr_gamma) and min_snr_gamma >= 0):
      raise ValueError(f"min_snr_gamma must be a finite number >= 0, got {min_snr_gamma!r}")
    if min_snr_gamma > 0 and loss_type == "kl":
      raise ValueError(f"min_snr_gamma={min_snr_gamma} weights the regression loss; "
                       "loss_type 'kl' has none (use mse, l1, huber or hybrid)")
    num_timesteps = int(betas64.shape[0])
    if (model_mean_type == "eps" and _x0_unrecoverable(betas64)
        and (loss_type == "kl" or model_var_type in LEARNED_VAR_TYPES)):
      raise ValueError(_x0_unrecoverable_message(betas64, f"loss_type {loss_type!r} with "
                                                 f"model_var_type {model_var_type!r}"))
    if timestep_map is None:
      tmap = np.arange(num_timesteps, dtype=np.int64)
    else:
      tmap = np.asarray(timestep_map)
      if tmap.shape != (num_timesteps,) or not np.issubdtype(tmap.dtype, np.integer):
        raise ValueError(f"timestep_map must be {num_timesteps} ints (one per beta), got "
                         f"shape {tmap.shape} dtype {tmap.dtype}")

    coefs = _coefficients(betas64, model_mean_type, min_snr_gamma)
    arrays = {name: jnp.asarray(value, dtype=jnp.float32) for name, value in coefs.items()}
    return cls(**arrays, timestep_map=jnp.asarray(tmap, dtype=jnp.int32),
               model_mean_type=model_mean_type, model_var_type=model_var_type,
               loss_type=loss_type, hybrid_lambda=hybrid_lambda, min_snr_gamma=min_snr_gamma,
               num_timesteps=num_timesteps, betas64=tuple(float(b) for b in betas64),
               timestep_map64=tuple(int(i) for i in tmap))

  def __repr__(self):
    return (f"GaussianDiffusion(num_timesteps={self.num_timesteps}, model_mean_type="
            f"{self.model_mean_type!r}, model_var_type={self.model_var_type!r}, loss_type="
            f"{self.loss_type!r}, hybrid_lambda={self.hybrid_lambda}, "
            f"min_snr_gamma={self.min_snr_gamma})")

  @property
  def betas_float64(self) -> np.ndarray:
    """The schedule in float64 (read-only numpy [T]), e.g. for exact host-side maths."""
    out = np.asarray(self.betas64, dtype=np.float64)
    out.setflags(write=False)
    return out

  @property
  def learns_sigma(self) -> bool:
    """Whether the network outputs a variance too (twice the image channels)."""
    return self.model_var_type in LEARNED_VAR_TYPES

  # ---- helpers ----------------------------------------------------------------------------

  def _extract(self, arr, t, x):
    """arr[t] shaped to broadcast against x: t [B] (leading dims of x) -> [B, 1, 1, 1]."""
    t = self._check_t(t, x)
    out = jnp.asarray(arr)[t]
    return out.reshape(t.shape + (1,) * (jnp.ndim(x) - t.ndim))

  def _check_t(self, t, x):
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
      raise ValueError(f"t must be an integer array of timestep indices, got dtype {t.dtype}")
    x_shape = jnp.shape(x)
    if t.ndim > len(x_shape) or tuple(x_shape[:t.ndim]) != t.shape:
      raise ValueError(f"t of shape {t.shape} must match the leading (batch) dims of x of "
                       f"shape {tuple(x_shape)}")
    # Range check when t is a concrete, host-readable array (not under jit / vmap / grad).
    if not isinstance(t, jax.core.Tracer) and getattr(t, "is_fully_addressable", True):
      t_host = np.asarray(t)
      if t_host.size and (t_host.min() < 0 or t_host.max() >= self.num_timesteps):
        raise ValueError(f"t must be in [0, {self.num_timesteps - 1}], got values in "
                         f"[{t_host.min()}, {t_host.max()}]")
    return t

  def _split_output(self, model_output, x):
    """Splits the network output into (mean part, variance part or None)."""
    c = jnp.shape(x)[-1]
    want = 2 * c if self.learns_sigma else c
    if jnp.shape(model_output) != tuple(jnp.shape(x)[:-1]) + (want,):
      raise ValueError(
          f"model output of shape {jnp.shape(model_output)} does not fit x of shape "
          f"{jnp.shape(x)} with model_var_type={self.model_var_type!r}: expected "
          f"{want} channels ({'mean and variance parts' if self.learns_sigma else 'mean only'})")
    model_output = model_output.astype(jnp.result_type(x, jnp.float32))
    if self.learns_sigma:
      return model_output[..., :c], model_output[..., c:]
    return model_output, None

  # ---- forward process --------------------------------------------------------------------

  def q_mean_variance(self, x_start, t):
    """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho eq. 4).

    Args:
      x_start: x_0 [B, H, W, C]; t: [B].
    Returns:
      (mean [B, H, W, C], variance [B, 1, 1, 1], log_variance [B, 1, 1, 1]).
    """
    mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
    variance = 1.0 - self._extract(self.alphas_cumprod, t, x_start)
    log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start)
    return mean, variance, log_variance

  def q_sample(self, x_start, t, noise):
    """Samples x_t ~ q(x_t | x_0) by reparameterisation: sqrt(ab) x_0 + sqrt(1 - ab) noise.

    Args:
      x_start: x_0 [B, H, W, C]; t: [B]; noise: standard normal, x_start's shape.
    Returns:
      x_t [B, H, W, C].
    """
    if jnp.shape(noise) != jnp.shape(x_start):
      raise ValueError(f"noise of shape {jnp.shape(noise)} must match x_start of shape "
                       f"{jnp.shape(x_start)}")
    return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

  def q_posterior_mean_variance(self, x_start, x_t, t):
    """q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta tilde_t) (Ho eqs. 6-7).

    Returns:
      (mean [B, H, W, C], variance [B, 1, 1, 1], log_variance_clipped [B, 1, 1, 1]).
    """
    mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
    variance = self._extract(self.posterior_variance, t, x_t)
    log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance

  # ---- parameterisations ------------------------------------------------------------------

  def predict_xstart_from_eps(self, x_t, t, eps):
    """x_0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) (inverting Ho eq. 4)."""
    return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

  def predict_eps_from_xstart(self, x_t, t, pred_xstart):
    """eps = (x_t / sqrt(ab) - x_0) / sqrt(1 / ab - 1)."""
    return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
            / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

  def get_v(self, x_start, noise, t):
    """The v target (Salimans & Ho 2022): v = sqrt(ab) eps - sqrt(1 - ab) x_0."""
    return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * noise
            - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start)

  def predict_xstart_from_v(self, x_t, t, v):
    """x_0 = sqrt(ab) x_t - sqrt(1 - ab) v (since ab + (1 - ab) = 1)."""
    return (self._extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v)

  def predict_eps_from_v(self, x_t, t, v):
    """eps = sqrt(1 - ab) x_t + sqrt(ab) v."""
    return (self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
            + self._extract(self.sqrt_alphas_cumprod, t, x_t) * v)

  # ---- reverse process --------------------------------------------------------------------

  def p_mean_variance(self, model_fn: ModelFn, x_t, t, clip_denoised: bool = False,
                      denoised_fn: Optional[Callable[[jax.Array], jax.Array]] = None):
    """p(x_{t-1} | x_t): calls the network and turns its output into a Gaussian.

    Args:
      model_fn: `model_fn(x_t, timestep_map[t])` -> network output.
      x_t: [B, H, W, C]; t: [B].
      clip_denoised: clip the predicted x_0 to [-1, 1] before forming the mean.
      denoised_fn: optional map applied to the predicted x_0 before clipping.
    Returns:
      dict(mean, variance, log_variance, pred_xstart), each [B, H, W, C].
    """
    model_output = model_fn(x_t, self.timestep_map[self._check_t(t, x_t)])
    return self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised, denoised_fn)

  def p_mean_variance_from_output(self, model_output, x_t, t, clip_denoised: bool = False,
                                  denoised_fn=None):
    """`p_mean_variance` for an already computed network output (e.g. a guided mixture)."""
    mean_part, var_part = self._split_output(model_output, x_t)
    full = jnp.shape(x_t)
    if self.model_var_type == "learned":
      log_variance = var_part
      variance = jnp.exp(log_variance)
    elif self.model_var_type == "learned_range":
      # Improved DDPM eq. 15: interpolate in log space between beta tilde_t and beta_t.
      min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
      max_log = self._extract(self.log_betas, t, x_t)
      frac = (var_part + 1.0) / 2.0
      log_variance = frac * max_log + (1.0 - frac) * min_log
      variance = jnp.exp(log_variance)
    elif self.model_var_type == "fixed_large":
      variance = jnp.broadcast_to(self._extract(self.fixed_large_variance, t, x_t), full)
      log_variance = jnp.broadcast_to(self._extract(self.fixed_large_log_variance, t, x_t), full)
    else:  # fixed_small
      variance = jnp.broadcast_to(self._extract(self.posterior_variance, t, x_t), full)
      log_variance = jnp.broadcast_to(
          self._extract(self.posterior_log_variance_clipped, t, x_t), full)

    if self.model_mean_type == "eps":
      pred_xstart = self.predict_xstart_from_eps(x_t, t, mean_part)
    elif self.model_mean_type == "x0":
      pred_xstart = mean_part
    else:  # v
      pred_xstart = self.predict_xstart_from_v(x_t, t, mean_part)
    if denoised_fn is not None:
      pred_xstart = denoised_fn(pred_xstart)
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
    return {"mean": mean, "variance": variance, "log_variance": log_variance,
            "pred_xstart": pred_xstart}

  # ---- variational bound ------------------------------------------------------------------

  def _vb_terms_bpd_from_output(self, model_output, x_start, x_t, t, clip_denoised):
    batch_dims = jnp.ndim(t)
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
    # L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t >= 1 (Ho eq. 5).
    kl = losses.normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
    kl = losses.mean_flat(kl, batch_dims) / math.log(2.0)
    # L_0 = -log p(x_0 | x_1) with the discretised decoder (Ho eq. 13).
    nll = -losses.discretized_gaussian_log_likelihood(x_start, out["mean"],
                                                      0.5 * out["log_variance"])
    nll = losses.mean_flat(nll, batch_dims) / math.log(2.0)
    return {"output": jnp.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

  def vb_terms_bpd(self, model_fn: ModelFn, x_start, x_t, t, clip_denoised: bool = False):
    """One term of the variational bound in bits/dim: L_{t-1} for t >= 1, L_0 at t = 0.

    Args:
      x_start: [B, H, W, C] on the 8-bit grid; x_t: [B, H, W, C]; t: [B].
    Returns:
      dict(output [B], pred_xstart [B, H, W, C]).
    """
    model_output = model_fn(x_t, self.timestep_map[self._check_t(t, x_t)])
    return self._vb_terms_bpd_from_output(model_output, x_start, x_t, t, clip_denoised)

  def prior_bpd(self, x_start):
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim: x_start [B, H, W, C] -> [B].

    Not trained (no parameters), but part of the bound reported as bits/dim.
    """
    t = jnp.full(jnp.shape(x_start)[:1], self.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = self.q_mean_variance(x_start, t)
    kl = losses.normal_kl(mean, log_variance, 0.0, 0.0)
    return losses.mean_flat(kl) / math.log(2.0)

  def calc_bpd_loop(self, model_fn: ModelFn, x_start, rng, clip_denoised: bool = False):
    """The full variational bound in bits/dim, all T terms (one `lax.scan` over t).

    Args:
      model_fn: the network.
      x_start: [B, H, W, C] on the 8-bit grid in [-1, 1].
      rng: PRNG key; one fresh noise draw per timestep.
      clip_denoised: clip predicted x_0 to [-1, 1].
    Returns:
      dict(total_bpd [B] = sum(vb) + prior_bpd, prior_bpd [B], vb [B, T], xstart_mse [B, T],
      mse [B, T]). Column t of vb / xstart_mse / mse belongs to timestep index t (vb[:, 0] is
      the decoder term L_0). mse is the squared error of the implied noise prediction.
    """
    if self.model_mean_type == "eps" and _x0_unrecoverable(self.betas_float64):
      raise ValueError(_x0_unrecoverable_message(self.betas_float64, "calc_bpd_loop"))
    batch = jnp.shape(x_start)[0]

    def term(_, inputs):
      t_index, key = inputs
      t = jnp.full((batch,), t_index, dtype=jnp.int32)
      noise = jax.random.normal(key, jnp.shape(x_start), dtype=jnp.result_type(x_start))
      x_t = self.q_sample(x_start, t, noise)
      model_output = model_fn(x_t, self.timestep_map[t])
      out = self._vb_terms_bpd_from_output(model_output, x_start, x_t, t, clip_denoised)
      xstart_mse = losses.mean_flat(jnp.square(out["pred_xstart"] - x_start))
      eps = self.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
      mse = losses.mean_flat(jnp.square(eps - noise))
      return None, (out["output"], xstart_mse, mse)

    keys = jax.random.split(rng, self.num_timesteps)
    _, (vb, xstart_mse, mse) = jax.lax.scan(
        term, None, (jnp.arange(self.num_timesteps, dtype=jnp.int32), keys))
    prior = self.prior_bpd(x_start)
    vb, xstart_mse, mse = vb.T, xstart_mse.T, mse.T   # [T, B] -> [B, T]
    return {"total_bpd": jnp.sum(vb, axis=1) + prior, "prior_bpd": prior, "vb": vb,
            "xstart_mse": xstart_mse, "mse": mse}

  # ---- training ---------------------------------------------------------------------------

  def training_losses(self, model_fn: ModelFn, x_start, t, rng, noise=None) -> Dict[str, Any]:
    """Per-example training loss at timesteps t.

    loss_type 'mse' / 'l1' / 'huber': regression of the network's mean part onto its target
    (noise for eps, x_0 for x0, v for v; Ho eq. 14), times the min-SNR weight when enabled.
    With a learned variance the variance is trained by the bound term L_t on a stop-gradient
    copy of the mean part (Improved DDPM sec. 3.1), added with weight 1 (improved-diffusion's
    plain-MSE behaviour), or with weight hybrid_lambda * T for 'hybrid': lambda L_vlb with
    L_vlb ~ T L_t, i.e. improved-diffusion's rescale by T / 1000 for lambda = 0.001.
    'kl' is the bound term L_t itself (bits/dim) training mean and variance; averaged over
    uniform t and multiplied by T it estimates the bound without the constant prior term.

    Args:
      model_fn: the network, called as model_fn(x_t, timestep_map[t]).
      x_start: [B, H, W, C]; t: [B] (any leading batch dims, e.g. none under vmap).
      rng: PRNG key for the noise (unused when `noise` is given).
      noise: optional standard-normal noise of x_start's shape.
    Returns:
      dict with 'loss' [B]; 'mse' [B] (unweighted squared error of the mean part) for the
      regression losses; 'l1' / 'huber' [B] for those; 'vb' [B] (as added to the loss) when a
      bound term is part of the loss.
    """
    t = self._check_t(t, x_start)
    batch_dims = t.ndim
    if noise is None:
      noise = jax.random.normal(rng, jnp.shape(x_start), dtype=jnp.result_type(x_start))
    x_t = self.q_sample(x_start, t, noise)
    model_output = model_fn(x_t, self.timestep_map[t])
    terms = {}
    if self.loss_type == "kl":
      vb = self._vb_terms_bpd_from_output(model_output, x_start, x_t, t, False)["output"]
      terms["vb"] = vb
      terms["loss"] = vb
      return terms

    mean_part, var_part = self._split_output(model_output, x_t)
    if self.model_mean_type == "eps":
      target = noise
    elif self.model_mean_type == "x0":
      target = x_start
    else:
      target = self.get_v(x_start, noise, t)
    err = mean_part - target
    terms["mse"] = losses.mean_flat(jnp.square(err), batch_dims)
    if self.loss_type in ("mse", "hybrid"):
      regression = terms["mse"]
    elif self.loss_type == "l1":
      regression = terms["l1"] = losses.mean_flat(jnp.abs(err), batch_dims)
    else:  # huber (delta 1, the smooth-L1 of the DDPM-era PyTorch ports)
      regression = terms["huber"] = losses.mean_flat(
          optax.huber_loss(mean_part, target, delta=1.0), batch_dims)
    if self.min_snr_gamma > 0:
      regression = regression * self.loss_weight[t]
    loss = regression

    if var_part is not None:
      # Only the variance learns from L_vlb; the mean is trained by the regression loss alone.
      frozen = jnp.concatenate([jax.lax.stop_gradient(mean_part), var_part], axis=-1)
      vb = self._vb_terms_bpd_from_output(frozen, x_start, x_t, t, False)["output"]
      if self.loss_type == "hybrid":
        vb = vb * (self.hybrid_lambda * self.num_timesteps)
      terms["vb"] = vb
      loss = loss + vb
    terms["loss"] = loss
    return terms

  # ---- respacing --------------------------------------------------------------------------

  def respace(self, use_timesteps) -> "GaussianDiffusion":
    """A diffusion over a subset of this one's steps (Improved DDPM sec. 4, appendix).

    The kept steps keep their alpha_bar; betas are recomputed as
    beta_i = 1 - alpha_bar_{k_i} / alpha_bar_{k_{i-1}}. `timestep_map` holds the original
    indices so the network is called with the timesteps it was trained on.

    Args:
      use_timesteps: iterable of indices in [0, T) to keep (e.g. from `space_timesteps`).
    """
    kept = sorted({int(i) for i in use_timesteps})
    if not kept:
      raise ValueError("respace needs at least one timestep to keep, got none")
    if kept[0] < 0 or kept[-1] >= self.num_timesteps:
      raise ValueError(f"timesteps to keep must be in [0, {self.num_timesteps - 1}], got "
                       f"{kept[0]}..{kept[-1]}")
    alphas_cumprod = np.cumprod(1.0 - self.betas_float64)[kept]
    prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    new_betas = 1.0 - alphas_cumprod / prev
    return GaussianDiffusion.create(new_betas, self.model_mean_type, self.model_var_type,
                                    self.loss_type, self.hybrid_lambda, self.min_snr_gamma,
                                    timestep_map=np.asarray(self.timestep_map64)[kept])


def _x0_unrecoverable(betas: np.ndarray) -> bool:
  """Whether alpha_bar_T = 0 (a beta of 1): x_T carries nothing of x_0."""
  return bool(np.prod(1.0 - betas) == 0.0)


def _x0_unrecoverable_message(betas, what: str) -> str:
  where = int(np.flatnonzero(np.cumprod(1.0 - betas) == 0.0)[0])
  return (f"{what} needs p(x_{{t-1}} | x_t) at every t, but beta = {betas[where]!r} at t = "
          f"{where} makes alpha_bar = 0 from there on, where an 'eps' model cannot predict x_0 "
          "(x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) is 0/0): use an 'x0' or "
          "'v' model, the 'cosine' schedule, or more timesteps")


def _coefficients(betas: np.ndarray, model_mean_type: str, min_snr_gamma: float):
  """All per-timestep coefficients in float64 numpy (see GaussianDiffusion's docstring)."""
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
  c = {"betas": betas, "alphas_cumprod": alphas_cumprod,
       "alphas_cumprod_prev": alphas_cumprod_prev, "alphas_cumprod_next": alphas_cumprod_next}
  with np.errstate(divide="ignore", invalid="ignore"):
    # Division by zero only for a final beta of 1 (jsd): alpha_bar_T = 0 and x_0 cannot be
    # recovered from x_T, so the reciprocals are +inf there.
    c["sqrt_alphas_cumprod"] = np.sqrt(alphas_cumprod)
    c["sqrt_one_minus_alphas_cumprod"] = np.sqrt(1.0 - alphas_cumprod)
    c["log_one_minus_alphas_cumprod"] = np.log(1.0 - alphas_cumprod)
    c["sqrt_recip_alphas_cumprod"] = np.sqrt(1.0 / alphas_cumprod)
    c["sqrt_recipm1_alphas_cumprod"] = np.sqrt(1.0 / alphas_cumprod - 1.0)
    # Ho eq. 7: beta tilde_t = (1 - ab_{t-1}) / (1 - ab_t) beta_t; 0 at t = 0.
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    c["posterior_variance"] = posterior_variance
    # log(0) at t = 0 replaced by the t = 1 value (as DDPM does) so the decoder has a width.
    pv_clipped = np.append(posterior_variance[1], posterior_variance[1:]) if betas.size > 1 \
        else posterior_variance
    c["posterior_log_variance_clipped"] = np.log(pv_clipped)
    c["posterior_mean_coef1"] = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    c["posterior_mean_coef2"] = ((1.0 - alphas_cumprod_prev) * np.sqrt(alphas)
                                 / (1.0 - alphas_cumprod))
    c["log_betas"] = np.log(betas)
    large = np.append(posterior_variance[1], betas[1:]) if betas.size > 1 else betas
    c["fixed_large_variance"] = large
    c["fixed_large_log_variance"] = np.log(large)
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    c["snr"] = snr
    if min_snr_gamma > 0:
      # Hang et al. 2023: weight the x0-space loss by min(SNR, gamma); in eps space that is
      # min(SNR, gamma) / SNR = min(1, gamma / SNR), in v space min(SNR, gamma) / (SNR + 1).
      if model_mean_type == "eps":
        weight = np.minimum(1.0, min_snr_gamma / snr)
      elif model_mean_type == "x0":
        weight = np.minimum(snr, min_snr_gamma)
      else:
        weight = np.minimum(snr, min_snr_gamma) / (snr + 1.0)
    else:
      weight = np.ones_like(betas)
    c["loss_weight"] = weight
  return c


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]):
  """Which of the original steps to keep when respacing (improved-diffusion's scheme).

  Args:
    num_timesteps: T of the original process.
    section_counts: "ddimN": the N steps range(0, T, stride) for the stride giving exactly N
      (as in DDIM); otherwise a count or comma-separated counts ("250", "10,15,20", or ints):
      T is cut into that many equal sections (the first T % n one step longer) and each
      section keeps its count of evenly spaced steps, first and last included.
  Returns:
    sorted list of kept indices in [0, T).
  Raises:
    ValueError: malformed counts, or a count larger than its section.
  """
  if isinstance(section_counts, str):
    spec = section_counts.strip()
    if spec.startswith("ddim"):
      try:
        wanted = int(spec[len("ddim"):])
      except ValueError:
        raise ValueError(f"section_counts {section_counts!r}: expected 'ddim<N>'") from None
      if wanted < 1:
        raise ValueError(f"section_counts {section_counts!r}: N must be >= 1")
      for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == wanted:
          return list(range(0, num_timesteps, stride))
      raise ValueError(f"cannot keep exactly {wanted} of {num_timesteps} steps with a fixed "
                       f"stride ({section_counts!r}); use a plain count like '{wanted}'")
    try:
      counts = [int(part) for part in spec.split(",")]
    except ValueError:
      raise ValueError(f"section_counts {section_counts!r}: expected 'ddimN' or comma-separated "
                       "integers") from None
  elif isinstance(section_counts, (int, np.integer)):
    counts = [int(section_counts)]
  else:
    counts = [int(c) for c in section_counts]
  if not counts:
    raise ValueError("section_counts is empty")
  size_per, extra = divmod(num_timesteps, len(counts))
  if size_per < 1:
    raise ValueError(f"{len(counts)} sections do not fit in {num_timesteps} steps")
  kept = []
  start = 0
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if not 1 <= count <= size:
      raise ValueError(f"section {i} has {size} steps: cannot keep {count} of them "
                       f"(section_counts={section_counts!r})")
    stride = (size - 1) / (count - 1) if count > 1 else 1.0
    kept.extend(start + round(j * stride) for j in range(count))
    start += size
  return sorted(set(kept))


def respace(diffusion: GaussianDiffusion, use_timesteps) -> GaussianDiffusion:
  """Function form of `GaussianDiffusion.respace`."""
  return diffusion.respace(use_timesteps)


def from_config(config) -> GaussianDiffusion:
  """Builds the diffusion of `config.diffusion` (or of a diffusion group passed directly)."""
  cfg = config.diffusion if hasattr(config, "diffusion") else config
  betas = schedules.get_beta_schedule(cfg.beta_schedule, cfg.num_timesteps)
  return GaussianDiffusion.create(betas, model_mean_type=cfg.model_mean_type,
                                  model_var_type=cfg.model_var_type, loss_type=cfg.loss_type,
                                  hybrid_lambda=cfg.hybrid_lambda, min_snr_gamma=cfg.min_snr_gamma)
