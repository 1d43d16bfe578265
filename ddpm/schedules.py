"""Noise schedules: the variances beta_1..beta_T of the forward process q(x_t | x_{t-1}).

Every schedule is computed in float64 numpy (the products of a thousand alphas lose digits in
float32); `GaussianDiffusion` derives its coefficients from these in float64 before casting.

Schedules (index t = 0..T-1 below is the paper's t = 1..T):
  linear     DDPM (Ho et al. 2020, sec. 4): beta from 1e-4 to 0.02 for T = 1000. For other T
             both endpoints are multiplied by 1000 / T, as improved-diffusion does, so that the
             total noise added (and alpha_bar_T ~ 4e-5) stays about the same.
  quadratic  DDPM repo: sqrt(beta) linear between the square roots of the linear endpoints.
  sigmoid    DDIM repo: sigmoid(linspace(-6, 6, T)) rescaled to the linear endpoints.
  geometric  betas in geometric progression between the linear endpoints.
  cosine     Improved DDPM (Nichol & Dhariwal 2021) eq. 17: alpha_bar(t) = f(t) / f(0),
             f(t) = cos((t / T + s) / (1 + s) * pi / 2)^2 with s = 0.008, and
             beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1) capped at 0.999 (their sec. 3.2).
  jsd        DDPM repo's 'jsd': beta_t = 1 / (T - t + 1) for t = 1..T, i.e. 1/T, 1/(T-1), ..., 1.
"""
import math
from typing import Callable

import numpy as np

# DDPM's linear endpoints for T = 1000 (Ho et al. 2020, sec. 4).
_LINEAR_START = 1e-4
_LINEAR_END = 0.02
# Improved DDPM, sec. 3.2: offset s and the cap that avoids singularities near t = T.
_COSINE_S = 0.008
_COSINE_MAX_BETA = 0.999


def _linear_endpoints(num_timesteps: int):
  scale = 1000.0 / num_timesteps
  return scale * _LINEAR_START, scale * _LINEAR_END


def _linear(num_timesteps: int) -> np.ndarray:
  start, end = _linear_endpoints(num_timesteps)
  return np.linspace(start, end, num_timesteps, dtype=np.float64)


def _quadratic(num_timesteps: int) -> np.ndarray:
  start, end = _linear_endpoints(num_timesteps)
  return np.linspace(start ** 0.5, end ** 0.5, num_timesteps, dtype=np.float64) ** 2


def _sigmoid(num_timesteps: int) -> np.ndarray:
  start, end = _linear_endpoints(num_timesteps)
  x = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
  return 1.0 / (1.0 + np.exp(-x)) * (end - start) + start


def _geometric(num_timesteps: int) -> np.ndarray:
  start, end = _linear_endpoints(num_timesteps)
  return np.geomspace(start, end, num_timesteps, dtype=np.float64)


def _cosine(num_timesteps: int) -> np.ndarray:
  return betas_for_alpha_bar(
      num_timesteps,
      lambda u: math.cos((u + _COSINE_S) / (1.0 + _COSINE_S) * math.pi / 2) ** 2,
      max_beta=_COSINE_MAX_BETA)


def _jsd(num_timesteps: int) -> np.ndarray:
  return 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)


_SCHEDULES = {
    "linear": _linear,
    "cosine": _cosine,
    "quadratic": _quadratic,
    "sigmoid": _sigmoid,
    "geometric": _geometric,
    "jsd": _jsd,
}
SCHEDULE_NAMES = tuple(_SCHEDULES)


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
  """Discretises a continuous alpha_bar(u), u in [0, 1], into T betas (Improved DDPM eq. 17).

  beta_t = min(1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), max_beta), t = 0..T-1.

  Returns:
    betas: float64 [T].
  """
  _check_num_timesteps(num_timesteps)
  betas = [min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
           for i in range(num_timesteps)]
  return np.asarray(betas, dtype=np.float64)


def _check_num_timesteps(num_timesteps):
  if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
    raise ValueError(f"num_timesteps must be an int, got {num_timesteps!r}")
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")


def validate_betas(betas) -> np.ndarray:
  """Checks that `betas` is a non-empty 1-D array of finite values in (0, 1].

  Returns:
    betas as float64 [T].
  Raises:
    ValueError: naming the first bad value and its index.
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
  bad = np.flatnonzero(~(np.isfinite(betas) & (betas > 0) & (betas <= 1)))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"betas must lie in (0, 1]; betas[{i}] = {betas[i]!r} "
                     f"({bad.size} bad value(s) of {betas.shape[0]})")
  return betas


def get_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """The betas of the named schedule.

  Args:
    name: one of SCHEDULE_NAMES (see the module docstring).
    num_timesteps: T >= 1.
  Returns:
    betas: float64 [T], each in (0, 1].
  Raises:
    ValueError: unknown name, bad T, or a schedule whose betas leave (0, 1] for this T (the
      endpoint-based schedules scale 0.02 by 1000 / T, which exceeds 1 for T < 20).
  """
  if name not in _SCHEDULES:
    raise ValueError(f"unknown beta schedule {name!r}; valid names: {', '.join(SCHEDULE_NAMES)}")
  _check_num_timesteps(num_timesteps)
  betas = _SCHEDULES[name](int(num_timesteps))
  try:
    return validate_betas(betas)
  except ValueError as e:
    raise ValueError(f"beta schedule {name!r} with num_timesteps={num_timesteps}: {e} "
                     "(the linear-endpoint schedules need num_timesteps >= 20; "
                     "use 'cosine' for fewer steps)") from e
