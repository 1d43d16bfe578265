"""What training, sampling and evaluation share: the train state, the optimizer and the setup.

`setup(config)` builds the mesh, the model (`models.build_model`), the diffusion process
(`diffusion.from_config`), the timestep sampler and a jitted `init_fn(rng) -> TrainState`;
`train.py` trains that state, `evaluation.py` samples from and evaluates its EMA parameters, and
`benchmark.py` times both on exactly the same pieces.
"""
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm import diffusion as diffusion_lib
from ddpm import distributed
from ddpm import models
from ddpm import timestep_sampler as timestep_sampler_lib

OPTIMIZERS = ("adam", "adamw")        # config.optim.optimizer
LR_SCHEDULES = ("constant", "cosine")  # config.optim.schedule (after the warm-up)


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 []: optimizer steps taken
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array             # uint32 [2]: raw PRNG key data (checkpointable as a plain array)
  sampler_state: Any         # timestep-sampler state (loss history for 'loss_aware')


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------
def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warm-up to `optim.lr` over `optim.warmup` steps (DDPM), then constant or cosine to 0."""
  o, total = config.optim, config.training.num_train_steps
  warmup = optax.linear_schedule(0.0, o.lr, max(o.warmup, 1)) if o.warmup > 0 else (
      optax.constant_schedule(o.lr))
  if o.schedule == "constant":
    after = optax.constant_schedule(o.lr)
  else:
    after = optax.cosine_decay_schedule(o.lr, max(total - o.warmup, 1))
  return optax.join_schedules([warmup, after], [o.warmup])


def make_optimizer(config) -> optax.GradientTransformation:
  """Adam/AdamW with warm-up, optional global-norm clipping and gradient accumulation."""
  o = config.optim
  lr = learning_rate_schedule(config)
  if o.optimizer == "adam":
    opt = optax.adam(lr, b1=o.beta1, b2=o.beta2, eps=o.eps)
  else:
    opt = optax.adamw(lr, b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay)
  if o.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
  if o.grad_accum_steps > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=o.grad_accum_steps)
  return opt


def ema_decay_at(config, step):
  """EMA decay at `step`; with `training.ema_warmup`, min(decay, (1 + n) / (10 + n))."""
  decay = config.training.ema_decay
  if config.training.ema_warmup:
    n = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  return jnp.asarray(decay, jnp.float32)


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------
def create_train_state(config, model, sampler, rng, params=None) -> TrainState:
  """Initial train state. rng: uint32 [2] raw key data. Pure: jit it with replicated outputs.

  `params` (e.g. imported weights, `ddpm.pretrained`) replaces the random initialisation; the
  EMA params start equal to them.
  """
  key = jax.random.wrap_key_data(rng)
  init_key, dropout_key, state_key = jax.random.split(key, 3)
  if params is None:
    size, channels = config.data.image_size, config.data.channels
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    params = model.init({"params": init_key, "dropout": dropout_key}, x, t)["params"]
  opt_state = make_optimizer(config).init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=opt_state,
                    rng=jax.random.key_data(state_key), sampler_state=sampler.init_state())


def setup(config):
  """Builds what training, sampling and evaluation share: mesh, model, diffusion, sampler, init."""
  mesh = distributed.make_data_mesh()
  model = models.build_model(config)
  diffusion = diffusion_lib.from_config(config)
  sampler = timestep_sampler_lib.create(config.diffusion.timestep_sampler,
                                        config.diffusion.num_timesteps)
  replicated = NamedSharding(mesh, P())
  init_fn = jax.jit(functools.partial(create_train_state, config, model, sampler),
                    out_shardings=replicated)
  return mesh, model, diffusion, sampler, init_fn


def initial_rng(config) -> jax.Array:
  """uint32 [2] raw key data of config.seed: the `rng` argument of `init_fn`."""
  return jax.random.key_data(jax.random.key(config.seed))
