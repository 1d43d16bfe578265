"""Training: device-count invariance, exact resume, NaN handling, outputs."""
import json
import os
import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny
from ddpm import checkpointing, distributed, experiment, train
from ddpm import workdir as workdir_lib


def _tiny(**overrides):
  config = tiny.get_config()
  config.training.batch_size = 8
  config.training.num_train_steps = 4
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  for dotted, value in overrides.items():
    group, key = dotted.split(".")
    config[group][key] = value
  return config


def _synthetic_batches(config, num_dispatches, seed=0):
  rng = np.random.default_rng(seed)
  k, b, s, c = (config.training.steps_per_dispatch, config.training.batch_size,
                config.data.image_size, config.data.channels)
  return [dict(image=rng.uniform(-1, 1, (k, b, s, s, c)).astype(np.float32),
               label=rng.integers(0, 10, (k, b)).astype(np.int32)) for _ in range(num_dispatches)]


def _run_steps(config, devices, batches):
  mesh = distributed.make_data_mesh(devices)
  from ddpm import diffusion as diffusion_lib, models, timestep_sampler
  model = models.build_model(config)
  diff = diffusion_lib.from_config(config)
  sampler = timestep_sampler.create(config.diffusion.timestep_sampler,
                                    config.diffusion.num_timesteps)
  init = jax.jit(lambda r: experiment.create_train_state(config, model, sampler, r),
                 out_shardings=NamedSharding(mesh, P()))
  state = init(experiment.initial_rng(config))
  step_fn = train.make_train_step(config, model, diff, sampler, mesh)
  all_metrics = []
  for batch in batches:
    batch = jax.device_put(batch, NamedSharding(mesh, P(None, "data")))
    state, metrics = step_fn(state, batch)
    all_metrics.append(jax.device_get(metrics))
  return jax.device_get(state), all_metrics


@pytest.mark.parametrize("timestep_sampler", ["uniform", "loss_aware"])
def test_one_device_and_eight_devices_give_the_same_trajectory(timestep_sampler):
  assert jax.device_count() == 8
  config = _tiny(**{"training.steps_per_dispatch": 2,
                    "diffusion.timestep_sampler": timestep_sampler})
  batches = _synthetic_batches(config, 2)
  s1, m1 = _run_steps(config, jax.devices()[:1], batches)
  s8, m8 = _run_steps(config, jax.devices(), batches)
  assert int(s1.step) == int(s8.step) == 4
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  for a, b in zip(jax.tree.leaves(s1.ema_params), jax.tree.leaves(s8.ema_params)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(m1[-1]["loss"], m8[-1]["loss"], rtol=1e-4)
  # The pmean'd gradient is the gradient of the mean loss over the whole global batch.
  np.testing.assert_allclose(m1[-1]["grad_norm"], m8[-1]["grad_norm"], rtol=1e-4)
  # Parameters moved, and the EMA is between the initial and the current parameters.
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(s1.params),
                                            jax.tree.leaves(s1.ema_params)))


def test_steps_per_dispatch_equals_single_steps():
  base = _tiny(**{"training.steps_per_dispatch": 1})
  two = _tiny(**{"training.steps_per_dispatch": 2})
  batches2 = _synthetic_batches(two, 1)
  batches1 = [dict(image=batches2[0]["image"][i:i + 1], label=batches2[0]["label"][i:i + 1])
              for i in range(2)]
  s1, _ = _run_steps(base, jax.devices(), batches1)
  s2, _ = _run_steps(two, jax.devices(), batches2)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """An uninterrupted 4-step run of configs/tiny.py."""
  workdir = str(tmp_path_factory.mktemp("full"))
  state = train.train_and_evaluate(_tiny(), workdir)
  return workdir, jax.device_get(state)


def test_outputs_of_a_run(trained_run):
  workdir, state = trained_run
  assert int(state.step) == 4
  assert checkpointing.latest_step(os.path.join(workdir, "checkpoints")) == 4
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [m["step"] for m in lines] == [2, 4]
  for key in ("loss", "grad_norm", "lr", "steps_per_s", "images_per_s", "mse"):
    assert all(np.isfinite(m[key]) for m in lines), key
  assert any(k.startswith("loss_q") for k in lines[0])
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_stop_and_resume_is_bitwise_identical(trained_run, tmp_path):
  _, full = trained_run
  workdir = str(tmp_path)
  train.train_and_evaluate(_tiny(**{"training.num_train_steps": 2}), workdir)
  resumed = jax.device_get(train.train_and_evaluate(_tiny(), workdir))
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_rerun_of_a_finished_run_does_not_restart(trained_run):
  workdir, full = trained_run
  again = jax.device_get(train.train_and_evaluate(_tiny(), workdir))
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path):
  # A learning rate this large overflows the parameters after the first checkpoint.
  config = _tiny(**{"optim.lr": 1e30, "optim.warmup": 0, "optim.grad_clip": 0.0,
                    "training.num_train_steps": 8, "training.log_every": 2,
                    "training.checkpoint_every": 2})
  workdir = str(tmp_path)
  with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss .* at step \d+") as err:
    train.train_and_evaluate(config, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  last = checkpointing.latest_step(ckpt_dir)
  msg = str(err.value)
  # The named step is the one metrics.jsonl would count that loss under: every logged row (all
  # finite) comes before it.
  bad = int(re.search(r"at step (\d+)", msg).group(1))
  rows = workdir_lib.read_metrics(workdir)  # [] when the run stopped before its first log
  assert all(np.isfinite(r["loss"]) and r["step"] < bad for r in rows)
  assert last is None or last < bad
  if last is None:
    assert "none (no checkpoint was written yet)" in msg
  else:
    assert f"Last good checkpoint: step {last}" in msg
    _, _, _, _, init_fn = experiment.setup(config)
    restored = checkpointing.restore_latest(checkpointing.create_manager(ckpt_dir),
                                            init_fn(experiment.initial_rng(config)))
    assert checkpointing.nonfinite_leaves(restored[0]) == []


def test_preemption_saves_and_resume_is_bitwise_identical(trained_run, tmp_path, sigterm_at_step):
  """SIGTERM mid-run: the loop saves at the next step boundary and exits; a rerun finishes."""
  _, full = trained_run
  workdir = str(tmp_path)
  disarm = sigterm_at_step(2)
  stopped = jax.device_get(train.train_and_evaluate(_tiny(), workdir))
  assert int(stopped.step) == 2
  assert checkpointing.latest_step(os.path.join(workdir, "checkpoints")) == 2
  disarm()
  resumed = jax.device_get(train.train_and_evaluate(_tiny(), workdir))
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
