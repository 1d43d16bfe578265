"""Training: the data-parallel train step and the loop (state and optimizer: experiment.py).

One training step (all inside one jitted `shard_map` over the mesh axis 'data'):
  batch (uint8 -> [-1, 1] upstream) -> t from the timestep sampler -> noise -> q_sample -> U-Net
  -> training_losses -> grads -> pmean over 'data' -> Optax update -> EMA update -> metrics.
`training.steps_per_dispatch` such steps run in one `lax.scan` per compiled call.

Randomness is drawn per example from `fold_in(step_key, global_example_index)`, so the same global
batch gives the same trajectory on 1 device or on many (dropout masks excepted: they are drawn per
device), and every device gets distinct noise.
"""
import time
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm import checkpointing
from ddpm import config_validation
from ddpm import evaluation
from ddpm import experiment
from ddpm import input_pipeline
from ddpm import locking
from ddpm import models
from ddpm import prefetch
from ddpm import run_config
from ddpm import workdir as workdir_lib
from ddpm.errors import UserError

NUM_QUARTILES = 4


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss became NaN or Inf; the message names the step and the last good checkpoint."""




# ---------------------------------------------------------------------------------------------
# The train step
# ---------------------------------------------------------------------------------------------
def _per_example_keys(step_key, local_batch: int):
  """Keys for this device's examples, indexed by their position in the global batch."""
  offset = jax.lax.axis_index("data") * local_batch
  index = offset + jnp.arange(local_batch)
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(index)


def _loss_fn(params, state, batch, config, model, diffusion, sampler, step_key):
  """Per-device loss. batch: dict(image [b, H, W, C] in [-1, 1], label [b] int32)."""
  x_start = batch["image"].astype(jnp.float32)
  b = x_start.shape[0]
  examples_key, dropout_key = jax.random.split(step_key)
  keys = _per_example_keys(examples_key, b)
  split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)  # [b, 3] keys
  k_t, k_noise, k_label = split[:, 0], split[:, 1], split[:, 2]
  # One timestep per example, drawn from the (possibly loss-aware) sampler.
  t, weights = jax.vmap(lambda k: sampler.sample(state.sampler_state, k, 1))(k_t)
  t, weights = t[:, 0], weights[:, 0]
  noise = jax.vmap(lambda k: jax.random.normal(k, x_start.shape[1:], jnp.float32))(k_noise)

  y = None
  if config.data.num_classes > 0:
    y = batch["label"].astype(jnp.int32)
    if config.model.class_dropout > 0:  # classifier-free guidance: learn the null label too
      drop = jax.vmap(lambda k: jax.random.bernoulli(k, config.model.class_dropout))(k_label)
      y = jnp.where(drop, config.data.num_classes, y)
  dropout_rng = jax.random.fold_in(dropout_key, jax.lax.axis_index("data"))

  def model_fn(x_t, t_model):
    return model.apply({"params": params}, x_t, t_model, y=y, train=True,
                       rngs={"dropout": dropout_rng})

  terms = diffusion.training_losses(model_fn, x_start, t, k_noise[0], noise=noise)
  loss = jnp.mean(terms["loss"] * weights)
  return loss, (terms, t)


def make_train_step(config, model, diffusion, sampler, mesh):
  """Returns jitted `train_step(state, batch) -> (state, metrics)`.

  batch: dict(image [k, B, H, W, C] float32 in [-1, 1], label [k, B] int32), B the global batch,
  sharded over the mesh axis 'data' on axis 1; k = training.steps_per_dispatch.
  metrics: dict of [k] arrays (one entry per optimizer step), identical on every device.
  """
  optimizer = experiment.make_optimizer(config)
  lr_schedule = experiment.learning_rate_schedule(config)
  T = diffusion.num_timesteps

  def one_step(state: experiment.TrainState, batch):
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)
    (loss, (terms, t)), grads = grad_fn(state.params, state, batch, config, model, diffusion,
                                        sampler, step_key)
    # Local batches are equal-sized, so the mean of per-device means is the global mean.
    grads = jax.lax.pmean(grads, "data")
    loss = jax.lax.pmean(loss, "data")
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = experiment.ema_decay_at(config, state.step)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)

    per_example = jax.lax.stop_gradient(terms["loss"])
    all_t = jax.lax.all_gather(t, "data", tiled=True)
    all_losses = jax.lax.all_gather(per_example, "data", tiled=True)
    sampler_state = sampler.update(state.sampler_state, all_t, all_losses)

    quartile = (t * NUM_QUARTILES) // T
    onehot = jax.nn.one_hot(quartile, NUM_QUARTILES, dtype=jnp.float32)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "lr": lr_schedule(state.step),
        "loss_q_sum": jax.lax.psum(onehot.T @ per_example, "data"),
        "loss_q_count": jax.lax.psum(onehot.sum(0), "data"),
    }
    for name in ("mse", "vb"):
      if name in terms:
        metrics[name] = jax.lax.pmean(jnp.mean(terms[name]), "data")
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                              opt_state=opt_state, sampler_state=sampler_state)
    return new_state, metrics

  def multi_step(state, batches):
    return jax.lax.scan(one_step, state, batches)

  sharded = jax.shard_map(multi_step, mesh=mesh, in_specs=(P(), P(None, "data")),
                          out_specs=(P(), P()), check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,),
                 compiler_options=models.compiler_options(mesh, config))


# ---------------------------------------------------------------------------------------------
# Metrics output (the writer is workdir.MetricsWriter)
# ---------------------------------------------------------------------------------------------
class _Window:
  """Accumulates per-step metrics on the host between two log lines."""

  def __init__(self):
    self.sums, self.steps, self.q_sum, self.q_count = {}, 0, 0.0, 0.0
    self.start = time.perf_counter()
    self.lr = float("nan")

  def add(self, m: Dict[str, np.ndarray]):
    for k, v in m.items():
      if k in ("loss_q_sum", "loss_q_count"):
        continue
      self.sums[k] = self.sums.get(k, 0.0) + float(np.sum(v))
    self.q_sum = self.q_sum + np.sum(m["loss_q_sum"], axis=0)
    self.q_count = self.q_count + np.sum(m["loss_q_count"], axis=0)
    self.steps += int(np.size(m["loss"]))
    self.lr = float(np.asarray(m["lr"]).reshape(-1)[-1])

  def summary(self, batch_size: int) -> Dict[str, float]:
    elapsed = time.perf_counter() - self.start
    out = {k: v / self.steps for k, v in self.sums.items() if k != "lr"}
    out["lr"] = self.lr
    for q in range(NUM_QUARTILES):
      if self.q_count[q] > 0:
        out[f"loss_q{q}"] = float(self.q_sum[q] / self.q_count[q])
    out["steps_per_s"] = self.steps / elapsed
    out["images_per_s"] = self.steps * batch_size / elapsed
    return out


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def restore_or_init(config, workdir: str, init_fn, mngr):
  """Newest complete checkpoint of workdir (state, data_state, step), else a fresh state."""
  state = init_fn(experiment.initial_rng(config))
  restored = checkpointing.restore_latest(mngr, state, set_aside_unreadable=True)
  if restored is None:
    logging.info("No checkpoint in %s: starting from scratch.", mngr.directory)
    return state, None, 0
  state, data_state, step = restored
  logging.info("Resumed from checkpoint at step %d in %s.", step, mngr.directory)
  return state, data_state, int(step)


def train_and_evaluate(config, workdir: str,
                       allow_config_change: bool = False) -> experiment.TrainState:
  """Trains `config` in `workdir`, resuming from its newest complete checkpoint.

  Holds the workdir's lock (`ddpm.locking`) throughout: a second training of the same workdir
  stops at once. Records the config in workdir/config.json; resuming with a different model,
  diffusion or data config is refused unless `allow_config_change` (`ddpm.run_config`).
  Writes workdir/checkpoints (Orbax), workdir/metrics.jsonl, workdir/tensorboard and, when
  training.sample_every > 0, EMA sample grids to workdir/samples/. Returns the final train state.
  """
  config_validation.validate_config(config, num_devices=jax.device_count())
  with locking.workdir_lock(workdir):
    run_config.check_and_record(config, workdir, allow_change=allow_config_change)
    return _train(config, workdir)


def _train(config, workdir: str) -> experiment.TrainState:
  t_cfg = config.training
  k = t_cfg.steps_per_dispatch
  is_main = jax.process_index() == 0
  workdir_lib.makedirs(workdir)
  # Data first: a dataset that is not prepared is reported before anything compiles.
  ds = input_pipeline.create_datasets(config, seed=config.seed)
  mesh, model, diffusion, sampler, init_fn = experiment.setup(config)
  abstract_state = jax.eval_shape(init_fn, experiment.initial_rng(config))
  n_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  logging.info("Model: %s parameters; diffusion T=%d %s/%s/%s/%s.", f"{n_params:,}",
               diffusion.num_timesteps, config.diffusion.beta_schedule,
               config.diffusion.model_mean_type, config.diffusion.model_var_type,
               config.diffusion.loss_type)

  mngr = checkpointing.create_manager(workdir_lib.path(workdir, "checkpoints"),
                                      max_to_keep=t_cfg.keep_checkpoints, async_save=True)
  state, data_state, step = restore_or_init(config, workdir, init_fn, mngr)
  if step >= t_cfg.num_train_steps:
    logging.info("Already trained to step %d (training.num_train_steps=%d): nothing to do.",
                 step, t_cfg.num_train_steps)
    checkpointing.wait(mngr)
    return state
  if step % k:
    raise UserError(f"checkpoint step {step} is not a multiple of training.steps_per_dispatch="
                     f"{k}; resume with the steps_per_dispatch it was written with")

  if data_state is not None:
    ds.train_iter.set_state(data_state)
  batches = prefetch.prefetch_to_mesh(ds.train_iter, NamedSharding(mesh, P(None, "data")),
                                      size=config.data.prefetch, stack=k)
  train_step = make_train_step(config, model, diffusion, sampler, mesh)
  writer = workdir_lib.MetricsWriter(workdir, enabled=is_main, start_step=step)
  sample_hook = evaluation.make_training_sample_hook(config, workdir, model, diffusion, mesh) if (
      t_cfg.sample_every > 0) else None

  last_good = step if step > 0 else None
  recorded_config = run_config.as_dict(config)
  window = _Window()
  pending = None  # (end_step, metrics) of the last dispatch, read one dispatch later (keeps async)
  first_step, t_start = step, time.perf_counter()

  def drain():
    nonlocal pending
    if pending is None:
      return
    end, metrics = pending
    pending = None
    metrics = jax.device_get(metrics)
    losses = np.asarray(metrics["loss"]).reshape(-1)
    if not np.all(np.isfinite(losses)):
      # losses[i] is the loss of the update from step end - k + i to the next one, which
      # metrics.jsonl counts (like every metric) under the step reached: end - k + i + 1.
      bad = end - k + int(np.argmin(np.isfinite(losses))) + 1
      raise NonFiniteLossError(f"non-finite loss {losses[~np.isfinite(losses)][0]} at step {bad}; "
                               f"stopped without saving. {last_good_text()}")
    window.add(metrics)

  def last_good_text():
    where = (f"step {last_good} in {mngr.directory}" if last_good is not None else
             "none (no checkpoint was written yet)")
    return f"Last good checkpoint: {where}."

  def save(at_step):
    nonlocal last_good
    drain()
    try:
      checkpointing.save(mngr, at_step, state, data_state=batches.get_state(), force=True,
                         config=recorded_config)
    except checkpointing.NonFiniteStateError as e:
      raise NonFiniteLossError(f"non-finite parameters after step {at_step} (its update "
                               f"diverged: {', '.join(e.leaves[:3])}); stopped without saving. "
                               f"{last_good_text()}") from None
    last_good = at_step

  try:
    with checkpointing.PreemptionHandler() as preemption:
      while step < t_cfg.num_train_steps:
        batch = next(batches)
        state, metrics = train_step(state, batch)
        drain()
        pending = (step + k, metrics)
        step += k
        if step % t_cfg.log_every == 0 or step >= t_cfg.num_train_steps:
          drain()
          summary = window.summary(t_cfg.batch_size)
          window = _Window()
          done = step - first_step
          eta = (t_cfg.num_train_steps - step) * (time.perf_counter() - t_start) / max(done, 1)
          if is_main:
            logging.info("step %d/%d  loss %.5f  grad_norm %.3f  lr %.2e  %.1f steps/s  "
                         "%.0f img/s  ETA %s", step, t_cfg.num_train_steps, summary["loss"],
                         summary["grad_norm"], summary["lr"], summary["steps_per_s"],
                         summary["images_per_s"], _format_eta(eta))
          writer.write(step, summary)
        if step % t_cfg.checkpoint_every == 0 or step >= t_cfg.num_train_steps:
          save(step)
        if sample_hook is not None and step % t_cfg.sample_every == 0:
          drain()
          sample_hook(state, step)
        if preemption.requested(step):
          logging.warning("Preemption signal received: saving at step %d and exiting.", step)
          if last_good != step:
            save(step)
          break
      drain()
  finally:
    try:
      checkpointing.wait(mngr)  # raises CheckpointWriteError if the disk filled up
    finally:
      writer.close()
      if hasattr(batches, "close"):
        batches.close()
  return state



# Names this module had before experiment.py held them; kept so existing code that imports them
# from `ddpm.train` still runs (new code: `ddpm.experiment`).
TrainState = experiment.TrainState
learning_rate_schedule = experiment.learning_rate_schedule
make_optimizer = experiment.make_optimizer
ema_decay_at = experiment.ema_decay_at
create_train_state = experiment.create_train_state
initial_rng = experiment.initial_rng


def setup(config, workdir=None):
  """`experiment.setup(config)` under its former name and signature (`workdir` is unused)."""
  del workdir
  return experiment.setup(config)
