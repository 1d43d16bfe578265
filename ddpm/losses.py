"""Elementwise log-likelihood pieces of the diffusion variational bound (natural log units).

`normal_kl` gives the closed-form KL between diagonal Gaussians used by the L_{t-1} terms of the
bound (Ho et al. 2020 eq. 5); `discretized_gaussian_log_likelihood` is the t = 0 decoder for 8-bit
data (Ho et al. eq. 13). Both work elementwise with broadcasting, so per-example scalars
([B, 1, 1, 1]) mix freely with images ([B, H, W, C]).
"""
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

# Half the width of one 8-bit bin once [0, 255] is mapped to [-1, 1].
_HALF_BIN = 1.0 / 255.0
# Bins whose centre is beyond these are the edge bins, open to -inf / +inf (Ho et al. eq. 13).
_EDGE = 0.999


def mean_flat(x, num_batch_dims: int = 1):
  """Mean over every axis but the leading `num_batch_dims` ones: x [B, ...] -> [B]."""
  x = jnp.asarray(x)
  if not 0 <= num_batch_dims <= x.ndim:
    raise ValueError(f"num_batch_dims={num_batch_dims} does not fit an array of shape {x.shape}")
  return jnp.mean(x, axis=tuple(range(num_batch_dims, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

  0.5 * (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2)).
  Arguments broadcast against each other.
  """
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log P(x) of 8-bit data under a Gaussian discretised into 256 bins (Ho et al. eq. 13).

  The interior bins are [x - 1/255, x + 1/255]; the first bin extends to -inf and the last to
  +inf, so the 256 probabilities sum to one.

  Args:
    x: data in [-1, 1] on the 8-bit grid (2k/255 - 1), e.g. [B, H, W, C].
    means: Gaussian means, broadcastable to x.
    log_scales: log standard deviations, broadcastable to x.
  Returns:
    log-probabilities in nats, the broadcast shape of the inputs.
  """
  x, means, log_scales = jnp.broadcast_arrays(jnp.asarray(x), jnp.asarray(means),
                                              jnp.asarray(log_scales))
  inv_stdv = jnp.exp(-log_scales)
  centered = x - means
  lo = inv_stdv * (centered - _HALF_BIN)
  hi = inv_stdv * (centered + _HALF_BIN)
  first, last = x < -_EDGE, x > _EDGE
  # P = Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi). Evaluate it on the side of the origin where the
  # CDF values are small, and in log space, so that a bin many standard deviations from the mean
  # keeps its tiny probability instead of rounding to 0. The edge bins are one-sided:
  # P(X < hi) = Phi(hi) for the first, P(X > lo) = Phi(-lo) for the last.
  mirror = jnp.where(first, False, jnp.where(last, True, (lo + hi) > 0))
  log_a = log_ndtr(jnp.where(mirror, -lo, hi))   # the larger CDF value
  log_b = log_ndtr(jnp.where(mirror, -hi, lo))
  # log(Phi(a) - Phi(b)) = log Phi(a) + log(1 - exp(log Phi(b) - log Phi(a))). The floor only
  # bites when the bin is so narrow against the scale that lo and hi round to the same float;
  # it keeps the log and its gradient finite there.
  gap = -jnp.expm1(log_b - log_a)
  log_gap = jnp.log(jnp.maximum(gap, jnp.finfo(gap.dtype).tiny))
  return log_a + jnp.where(first | last, 0.0, log_gap)
