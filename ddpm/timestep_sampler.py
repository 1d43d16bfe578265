"""Timestep samplers for training: uniform, and Improved DDPM's loss-aware importance sampling.

Everything is functional so the sampler state lives in the train state, is checkpointed with it,
and all three operations jit:

  sampler = timestep_sampler.create("loss_aware", num_timesteps)
  state = sampler.init_state()      # pytree of arrays (init_state(num_timesteps) also accepted)
  t, weights = sampler.sample(state, rng, batch_size)       # t [B] int32, weights [B] float32
  loss = jnp.mean(weights * losses["loss"])                 # unbiased for E_uniform-t[loss]
  state = sampler.update(state, all_t, all_losses)          # any number of (t, loss) pairs

`batch_size` is a static Python int. Under data parallelism, all-gather t and the per-example
losses over devices before `update` so every replica keeps the same state (skip the update when
`sampler.needs_update` is False, as for 'uniform').

Loss-aware sampling (Nichol & Dhariwal 2021, sec. 3.3): keep the last HISTORY_PER_TERM = 10 losses
of every t; until every t has 10, sample uniformly; afterwards sample t with probability
p_t ~ sqrt(E[L_t^2]), mixed with UNIFORM_PROB = 0.001 of the uniform distribution, and return the
importance weights 1 / (T p_t), which make weighted losses unbiased estimates of the uniform mean.
Both samplers share the state layout, so a run can switch between them on resume.
"""
from typing import Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp

HISTORY_PER_TERM = 10
UNIFORM_PROB = 0.001
SAMPLER_NAMES = ("uniform", "loss_aware")

State = Dict[str, jax.Array]


def init_state(num_timesteps: int) -> State:
  """Empty loss history.

  Returns:
    dict(history float32 [T, HISTORY_PER_TERM] (a ring buffer per t), count int32 [T] (number of
    valid entries, at most HISTORY_PER_TERM), position int32 [T] (next slot to write)).
  """
  if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
  return {
      "history": jnp.zeros((num_timesteps, HISTORY_PER_TERM), jnp.float32),
      "count": jnp.zeros((num_timesteps,), jnp.int32),
      "position": jnp.zeros((num_timesteps,), jnp.int32),
  }


def update(state: State, t, losses) -> State:
  """Appends per-example losses to the history of their timesteps.

  Pairs are taken in order, as if appended one by one: when one call brings more than
  HISTORY_PER_TERM losses for the same t, the last ones win.

  Args:
    state: from `init_state` / a previous `update`.
    t: int [N] timesteps (any N, e.g. gathered over all devices).
    losses: [N] the per-example losses at those timesteps (gradients are not taken through).
  Returns:
    the new state.
  """
  t = jnp.asarray(t).reshape(-1).astype(jnp.int32)
  losses = jax.lax.stop_gradient(jnp.asarray(losses, jnp.float32).reshape(-1))
  if t.shape != losses.shape:
    raise ValueError(f"t has {t.shape[0]} entries but losses has {losses.shape[0]}")
  history, count, position = state["history"], state["count"], state["position"]
  num_timesteps, keep = history.shape
  # rank[i] = how many earlier pairs of this call share t[i]; total[i] = all pairs sharing t[i].
  # A stable sort groups equal t in call order: O(N log N) for a gathered global batch.
  order = jnp.argsort(t, stable=True)
  t_sorted = t[order]
  first_of_group = jnp.searchsorted(t_sorted, t_sorted, side="left")
  rank = jnp.zeros_like(t).at[order].set(jnp.arange(t.shape[0], dtype=t.dtype) - first_of_group)
  added = jnp.zeros((num_timesteps,), jnp.int32).at[t].add(1)
  total = added[t]
  slot = (position[t] + rank) % keep
  # Pairs overwritten later in the same call are dropped (scatter order is unspecified), so
  # the remaining (t, slot) targets are distinct.
  row = jnp.where(rank >= total - keep, t, num_timesteps)
  history = history.at[row, slot].set(losses, mode="drop")
  return {
      "history": history,
      "count": jnp.minimum(count + added, keep),
      "position": (position + added) % keep,
  }


def is_warm(state: State):
  """Whether every timestep has a full history (scalar bool)."""
  return jnp.all(state["count"] >= state["history"].shape[1])


def loss_aware_probs(state: State):
  """p_t of loss-aware sampling: float32 [T], uniform before warm-up.

  p_t = (1 - UNIFORM_PROB) sqrt(mean(L_t^2)) / sum_s sqrt(mean(L_s^2)) + UNIFORM_PROB / T.
  """
  num_timesteps = state["history"].shape[0]
  uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps, jnp.float32)
  rms = jnp.sqrt(jnp.mean(jnp.square(state["history"]), axis=1))
  total = jnp.sum(rms)
  # All-zero losses carry no information about where the loss is; rms / total would be 0/0.
  safe_total = jnp.where(total > 0, total, 1.0)
  probs = (1.0 - UNIFORM_PROB) * rms / safe_total + UNIFORM_PROB / num_timesteps
  return jnp.where(is_warm(state) & (total > 0), probs, uniform)


def uniform_probs(state: State):
  """p_t = 1 / T: float32 [T]."""
  num_timesteps = state["history"].shape[0]
  return jnp.full((num_timesteps,), 1.0 / num_timesteps, jnp.float32)


def _sample_from(probs, rng, batch_size: int):
  num_timesteps = probs.shape[0]
  t = jax.random.choice(rng, num_timesteps, shape=(batch_size,), p=probs).astype(jnp.int32)
  weights = 1.0 / (num_timesteps * probs[t])
  return t, weights.astype(jnp.float32)


def uniform_sample(state: State, rng, batch_size: int):
  """t ~ U{0..T-1}: (t int32 [B], weights float32 [B] of ones)."""
  num_timesteps = state["history"].shape[0]
  t = jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
  return t, jnp.ones((batch_size,), jnp.float32)


def loss_aware_sample(state: State, rng, batch_size: int):
  """t ~ loss_aware_probs(state): (t int32 [B], weights 1 / (T p_t) float32 [B])."""
  return _sample_from(loss_aware_probs(state), rng, batch_size)


class TimestepSampler(NamedTuple):
  """The pure functions of one sampler, bound to its number of timesteps."""
  name: str
  num_timesteps: int
  init_state: Callable[..., State]      # ([num_timesteps]) -> state
  sample: Callable[..., tuple]          # (state, rng, batch_size) -> (t, weights)
  update: Callable[..., State]          # (state, t, losses) -> state
  probs: Callable[[State], jax.Array]   # state -> p [T]
  needs_update: bool


def create(name: str, num_timesteps: int) -> TimestepSampler:
  """The sampler called `name` ('uniform' or 'loss_aware') over `num_timesteps` steps."""
  if name not in SAMPLER_NAMES:
    raise ValueError(f"unknown timestep sampler {name!r}; valid: {', '.join(SAMPLER_NAMES)}")
  init_state(num_timesteps)  # validates num_timesteps

  def bound_init_state(n: Optional[int] = None) -> State:
    if n is not None and n != num_timesteps:
      raise ValueError(f"this {name!r} sampler was created for {num_timesteps} timesteps, "
                       f"got init_state({n})")
    return init_state(num_timesteps)

  if name == "uniform":
    return TimestepSampler(name, num_timesteps, bound_init_state, uniform_sample, update,
                           uniform_probs, needs_update=False)
  return TimestepSampler(name, num_timesteps, bound_init_state, loss_aware_sample, update,
                         loss_aware_probs, needs_update=True)


def from_config(config) -> TimestepSampler:
  """`create(config.diffusion.timestep_sampler, config.diffusion.num_timesteps)`."""
  cfg = config.diffusion if hasattr(config, "diffusion") else config
  return create(cfg.timestep_sampler, cfg.num_timesteps)
