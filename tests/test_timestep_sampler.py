"""Uniform and loss-aware timestep samplers against their definitions (Improved DDPM sec. 3.3)."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm import timestep_sampler as ts

T = 6
K = ts.HISTORY_PER_TERM


@pytest.fixture(scope="module")
def fns():
  """Jitted sample / update shared by the tests (batch_size is static)."""
  return {
      "uniform": jax.jit(ts.uniform_sample, static_argnums=2),
      "loss_aware": jax.jit(ts.loss_aware_sample, static_argnums=2),
      "update": jax.jit(ts.update),
      "probs": jax.jit(ts.loss_aware_probs),
      "is_warm": jax.jit(ts.is_warm),
  }


def _warm_state(fns, rms_per_t):
  """State whose every t holds K losses with the given root-mean-square (+/- pattern)."""
  state = ts.init_state(T)
  t = np.repeat(np.arange(T), K)
  signs = np.tile([1.0, -1.0], T * K // 2)
  return fns["update"](state, jnp.asarray(t), jnp.asarray(signs * np.repeat(rms_per_t, K)))


def test_uniform(fns):
  state = ts.init_state(T)
  t, w = fns["uniform"](state, jax.random.key(0), 6000)
  assert t.dtype == jnp.int32 and w.dtype == jnp.float32 and t.shape == w.shape == (6000,)
  np.testing.assert_array_equal(w, 1.0)
  counts = np.bincount(np.asarray(t), minlength=T)
  assert counts.shape == (T,)
  assert stats.chisquare(counts).pvalue > 1e-4


def test_loss_aware_is_uniform_before_warmup(fns):
  state = ts.init_state(T)
  # Every t but the last gets a full history of large losses.
  t = np.repeat(np.arange(T - 1), K)
  state = fns["update"](state, jnp.asarray(t), jnp.full(t.shape, 7.0))
  assert not bool(fns["is_warm"](state))
  np.testing.assert_allclose(fns["probs"](state), 1.0 / T, rtol=1e-6)
  t, w = fns["loss_aware"](state, jax.random.key(1), 64)
  np.testing.assert_allclose(w, 1.0, rtol=1e-6)


def test_loss_aware_probs_after_warmup(fns):
  rms = np.array([1.0, 2.0, 0.5, 4.0, 0.25, 3.0])
  state = _warm_state(fns, rms)
  assert bool(fns["is_warm"](state))
  want = (1 - ts.UNIFORM_PROB) * rms / rms.sum() + ts.UNIFORM_PROB / T
  np.testing.assert_allclose(fns["probs"](state), want, rtol=1e-5)
  t, w = fns["loss_aware"](state, jax.random.key(2), 20_000)
  counts = np.bincount(np.asarray(t), minlength=T)
  assert stats.chisquare(counts, 20_000 * want).pvalue > 1e-4
  np.testing.assert_allclose(w, 1.0 / (T * want[np.asarray(t)]), rtol=1e-5)


def test_importance_weights_make_estimator_unbiased(fns):
  rms = np.array([1.0, 2.0, 0.5, 4.0, 0.25, 3.0])
  state = _warm_state(fns, rms)
  probs = np.asarray(fns["probs"](state), np.float64)
  per_t_loss = np.array([3.0, -1.0, 2.0, 0.5, 8.0, 1.0])
  # Exactly: sum_t p_t * (1 / (T p_t)) * L_t = mean_t L_t.
  assert np.sum(probs * per_t_loss / (T * probs)) == pytest.approx(per_t_loss.mean(), rel=1e-6)
  # And by Monte Carlo over the sampler's own draws.
  t, w = fns["loss_aware"](state, jax.random.key(3), 200_000)
  estimate = np.asarray(w, np.float64) * per_t_loss[np.asarray(t)]
  se = estimate.std() / np.sqrt(estimate.size)
  assert abs(estimate.mean() - per_t_loss.mean()) < 5 * se


def test_history_keeps_last_k_in_order(fns):
  state = ts.init_state(T)
  # 2K + 3 losses for t = 1 in one call (in order 0, 1, ...), with two for t = 4 in between.
  n1 = 2 * K + 3
  t_in = np.concatenate([np.ones(5), [4], np.ones(n1 - 5), [4]]).astype(np.int32)
  l_in = np.concatenate([np.arange(5), [100.0], np.arange(5, n1), [200.0]]).astype(np.float32)
  state = fns["update"](state, jnp.asarray(t_in), jnp.asarray(l_in))
  assert sorted(np.asarray(state["history"][1]).tolist()) == list(range(K + 3, 2 * K + 3))
  assert int(state["count"][1]) == K and int(state["count"][4]) == 2
  assert sorted(np.asarray(state["history"][4][:2]).tolist()) == [100.0, 200.0]
  state = fns["update"](state, jnp.asarray([1, 1, 1]), jnp.asarray([-1.0, -2.0, -3.0]))
  want = list(range(K + 6, 2 * K + 3)) + [-1, -2, -3]
  assert sorted(np.asarray(state["history"][1]).tolist()) == sorted(want)
  # Any number of pairs, including none.
  same = fns["update"](state, jnp.zeros((0,), jnp.int32), jnp.zeros((0,)))
  for key in state:
    np.testing.assert_array_equal(same[key], state[key])


def test_update_matches_sequential_reference(fns):
  """Random calls with many repeated t against appending one by one to deques of length K."""
  rng = np.random.RandomState(0)
  reference = [collections.deque(maxlen=K) for _ in range(T)]
  state = ts.init_state(T)
  for n in (1, 7, 40, 3, 64):
    t = rng.randint(0, T, size=n)
    l = rng.randn(n).astype(np.float32)
    for ti, li in zip(t, l):
      reference[ti].append(float(li))
    state = fns["update"](state, jnp.asarray(t, jnp.int32), jnp.asarray(l))
    for ti in range(T):
      count = int(state["count"][ti])
      assert count == len(reference[ti])
      got = np.asarray(state["history"][ti])
      if count == K:
        np.testing.assert_allclose(np.sort(got), np.sort(reference[ti]))
      else:  # not yet wrapped around: the first `count` slots in order
        np.testing.assert_allclose(got[:count], list(reference[ti]))


def test_create_and_state_is_checkpointable_pytree():
  for name in ts.SAMPLER_NAMES:
    sampler = ts.create(name, T)
    state = sampler.init_state()
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, sampler.init_state(T))
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(state))
    t, w = sampler.sample(state, jax.random.key(0), 8)
    state = sampler.update(state, t, jnp.ones((8,)))
    assert sampler.name == name and sampler.num_timesteps == T
    assert np.asarray(sampler.probs(state)).shape == (T,)
  assert ts.create("uniform", T).needs_update is False
  assert ts.create("loss_aware", T).needs_update is True
  with pytest.raises(ValueError, match="importance"):
    ts.create("importance", T)
  with pytest.raises(ValueError, match="num_timesteps"):
    ts.create("uniform", 0)
  with pytest.raises(ValueError, match="created for 6"):
    ts.create("uniform", T).init_state(T + 1)
  with pytest.raises(ValueError, match="losses"):
    ts.update(ts.init_state(T), jnp.zeros((3,), jnp.int32), jnp.zeros((4,)))
