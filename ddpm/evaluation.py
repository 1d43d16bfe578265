"""Sampling and evaluation modes: sample grids and GIFs, bits/dim, FID and Inception Score.

  --mode=sample  workdir/samples/samples_<step>.npz (key 'images', uint8 NHWC), a PNG grid
                 samples_<step>.png and the denoising progression progression_<step>.gif
  --mode=eval    bits/dim of the test split with the full T-step bound (Ho et al. eq. 5 in bits
                 per dimension), FID and IS of eval.num_samples EMA samples against the cached
                 reference statistics of eval.reference_num_images training images (0: all),
                 to workdir/eval/eval_<step>.json and TensorBoard.

FID samples are generated in rounds saved as workdir/eval/samples_<step>/round_<i>.npz, so a
preempted evaluation resumes where it stopped. Everything uses the EMA parameters of the newest
complete checkpoint.
"""
import hashlib
import inspect
import json
import os
import time
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm import checkpointing
from ddpm import config_validation
from ddpm import experiment
from ddpm import fid
from ddpm import images
from ddpm import inception
from ddpm import input_pipeline
from ddpm import models
from ddpm import sampling
from ddpm import workdir as workdir_lib

REFERENCE_CACHE_DIR = os.path.expanduser("~/.cache/ddpm_jax/reference_stats")
GIF_BATCH = 16
GIF_FRAMES = 50


def _to_host(x) -> np.ndarray:
  """A global (possibly multi-process) array as one numpy array on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _labels(config, n: int, offset: int = 0) -> Optional[np.ndarray]:
  """Class labels cycling through the classes (None for unconditional models)."""
  if config.data.num_classes <= 0:
    return None
  return ((offset + np.arange(n)) % config.data.num_classes).astype(np.int32)


def _global_labels(y: Optional[np.ndarray], mesh):
  if y is None or jax.process_count() == 1:
    return y
  n = jax.process_count()
  local = np.split(y, n)[jax.process_index()]
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local, y.shape)


def _sample_rng(config, step: int, purpose: int):
  """Sampling keys that do not depend on how often a mode was run before."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed + 1), step), purpose)


def load_ema_params(config, workdir: str):
  """(EMA params replicated over all devices, step) of the newest complete checkpoint.

  Only the EMA parameters are read from disk (Orbax partial restore): not the parameters or the
  optimizer state, which together are twice the size for Adam.
  """
  mesh, model, diffusion, _, init_fn = experiment.setup(config)
  ckpt_dir = workdir_lib.path(workdir, "checkpoints")
  if checkpointing.latest_step(ckpt_dir) is None:
    raise checkpointing.NoCheckpointError(f"no checkpoint in {ckpt_dir}: train first with "
                                          f"--mode=train --workdir={workdir}")
  replicated = NamedSharding(mesh, P())
  shapes = jax.eval_shape(init_fn, experiment.initial_rng(config)).ema_params  # no allocation
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          shapes)
  mngr = checkpointing.create_manager(ckpt_dir, read_only=True)
  restored, _, step = checkpointing.restore_latest(mngr, {"ema_params": abstract}, partial=True)
  return restored["ema_params"], int(step), (mesh, model, diffusion)


def generate(config, params, mesh, model, diffusion, num: int, rng, batch_size: int,
             progress: bool = True):
  """Yields uint8 [b, H, W, C] batches of `num` samples (the last batch trimmed)."""
  sampler = sampling.make_sampler_from_config(config, diffusion,
                                              sampling.apply_fn_from_model(model),
                                              mesh=mesh, batch_size=batch_size,
                                              intermediate_every=0)
  done, i = 0, 0
  while done < num:
    start = time.perf_counter()
    y = _global_labels(_labels(config, batch_size, done), mesh)
    x = _to_host(sampler(params, jax.random.fold_in(rng, i), y=y))
    take = min(batch_size, num - done)
    done += take
    i += 1
    if progress:
      logging.info("sampled %d/%d images (%.1f s for %d)", done, num,
                   time.perf_counter() - start, batch_size)
    yield images.to_uint8(x[:take])


def _sampling_batch(config, batch_size: int) -> int:
  n = jax.device_count()
  return max(n, (batch_size // n) * n)


def run_sampling(config, workdir: str) -> Dict[str, str]:
  """--mode=sample: samples, grid and denoising GIF from the newest checkpoint's EMA params."""
  config_validation.validate_config(config, num_devices=jax.device_count())
  params, step, (mesh, model, diffusion) = load_ema_params(config, workdir)
  num = config.sampling.num_samples
  batch = _sampling_batch(config, min(config.sampling.batch_size, max(num, 1)))
  logging.info("Sampling %d images at step %d with %s (%s steps).", num, step,
               config.sampling.method, config.sampling.num_steps or diffusion.num_timesteps)
  samples = np.concatenate(list(generate(config, params, mesh, model, diffusion, num,
                                         _sample_rng(config, step, 0), batch)))

  # The progression: a few images from noise to data, ~GIF_FRAMES frames.
  gif_batch = _sampling_batch(config, GIF_BATCH)
  nfe = sampling.num_function_evals(config.sampling.method,
                                    config.sampling.num_steps or diffusion.num_timesteps)
  every = config.sampling.intermediate_every or max(1, nfe // GIF_FRAMES)
  gif_sampler = sampling.make_sampler_from_config(
      config, diffusion, sampling.apply_fn_from_model(model), mesh=mesh, batch_size=gif_batch,
      intermediate_every=every)
  y = _global_labels(_labels(config, gif_batch), mesh)
  _, frames = gif_sampler(params, _sample_rng(config, step, 1), y=y)
  frames = _to_host(frames)

  out = {}
  if jax.process_index() == 0:
    sample_dir = workdir_lib.path(workdir, "samples")
    out["npz"] = images.save_npz(sample_dir / f"samples_{step}.npz", samples, step=step)
    out["grid"] = images.save_grid(sample_dir / f"samples_{step}.png",
                                   samples[:min(len(samples), 100)])
    out["gif"] = images.save_gif(sample_dir / f"progression_{step}.gif",
                                 images.to_uint8(np.clip(frames, -1, 1)))
    for name, path in out.items():
      print(f"{name}: {path}", flush=True)
  return out


def make_training_sample_hook(config, workdir: str, model, diffusion, mesh):
  """hook(state, step) writing an EMA sample grid to workdir/samples/ema_<step>.png.

  Previews use deterministic DDIM with at most 50 steps, so they cost little training time.
  """
  batch = _sampling_batch(config, min(config.sampling.batch_size, 64))
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.sampling.method, config.sampling.eta = "ddim", 0.0
    config.sampling.num_steps = min(50, diffusion.num_timesteps)
  sampler = sampling.make_sampler_from_config(config, diffusion,
                                              sampling.apply_fn_from_model(model), mesh=mesh,
                                              batch_size=batch, intermediate_every=0)

  def hook(state, step: int):
    y = _global_labels(_labels(config, batch), mesh)
    x = _to_host(sampler(state.ema_params, _sample_rng(config, step, 2), y=y))
    if jax.process_index() == 0:
      path = images.save_grid(workdir_lib.path(workdir, "samples", f"ema_{step}.png"), x)
      logging.info("EMA samples at step %d: %s", step, path)
  return hook


# ---------------------------------------------------------------------------------------------
# Bits per dimension
# ---------------------------------------------------------------------------------------------
def make_bpd_fn(diffusion, model, mesh, clip_denoised: bool = False,
                compiler_options: Optional[dict] = None):
  """Jitted fn(params, x [B, H, W, C] in [-1, 1] sharded on 'data', rng) -> dict of [B] / [B, T].

  compiler_options: XLA options for the compilation, e.g. `ddpm.models.compiler_options(mesh,
  config)`.
  """

  def local(params, x, key):
    key = jax.random.fold_in(key, jax.lax.axis_index("data"))
    model_fn = lambda x_t, t: model.apply({"params": params}, x_t, t, train=False)
    out = diffusion.calc_bpd_loop(model_fn, x, key, clip_denoised=clip_denoised)
    return {k: out[k] for k in ("total_bpd", "prior_bpd", "vb", "mse")}

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P()),
                               out_specs=P("data"), check_vma=False),
                 compiler_options=compiler_options)


def compute_bpd(config, params, mesh, model, diffusion, test_images: np.ndarray, rng
                ) -> Dict[str, float]:
  """Bits/dim of this process's share of the test images (uint8 [N, H, W, C]), all processes."""
  if config.data.num_classes > 0:
    raise NotImplementedError("bits/dim of class-conditional models is not implemented")
  batch = config.eval.batch_size
  local_batch = batch // jax.process_count()
  fn = make_bpd_fn(diffusion, model, mesh,
                   compiler_options=models.compiler_options(mesh, config))
  n = test_images.shape[0]
  totals, priors, count = [], [], 0
  for i in range(0, n, local_batch):
    chunk = test_images[i:i + local_batch]
    real = chunk.shape[0]
    if real < local_batch:  # pad with copies; the padding is dropped below
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], local_batch - real, axis=0)])
    x = chunk.astype(np.float32) / 127.5 - 1.0
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), x,
                                               (batch,) + x.shape[1:])
    out = fn(params, x, jax.random.fold_in(rng, i))
    total = _to_host(out["total_bpd"]).reshape(jax.process_count(), local_batch)[:, :real]
    prior = _to_host(out["prior_bpd"]).reshape(jax.process_count(), local_batch)[:, :real]
    totals.append(total.reshape(-1))
    priors.append(prior.reshape(-1))
    count += total.size
    logging.info("bits/dim: %d images, running mean %.4f", count, np.mean(np.concatenate(totals)))
  totals = np.concatenate(totals)
  return {"bpd": float(np.mean(totals)), "bpd_stderr": float(np.std(totals) / np.sqrt(len(totals))),
          "prior_bpd": float(np.mean(np.concatenate(priors))), "bpd_num_images": int(len(totals))}


# ---------------------------------------------------------------------------------------------
# FID / IS
# ---------------------------------------------------------------------------------------------
def _preprocessing_fingerprint() -> str:
  """SHA-256 of the code that turns dataset records into Inception inputs: the input pipeline
  (decoding, crops, resizing, per-dataset specs) and `inception.preprocess`. Any edit there
  gives new reference statistics (recomputed once) rather than possibly stale ones."""
  source = inspect.getsource(input_pipeline) + inspect.getsource(inception.preprocess)
  return hashlib.sha256(source.encode()).hexdigest()


def reference_statistics_path(config, num_images: int, weights_sha256: str,
                              cache_dir: str = REFERENCE_CACHE_DIR) -> str:
  """The cache file of the reference statistics of `num_images` training images.

  Its name hashes everything the statistics depend on: the data settings, the number of images,
  the Inception weights file's SHA-256 and the preprocessing code, so changed weights or
  preprocessing never reuse stale statistics.
  """
  d = config.data
  key = json.dumps([d.dataset, d.path, d.tfds_data_dir, d.image_size, d.channels,
                    config.eval.feature_extractor, int(num_images), weights_sha256,
                    _preprocessing_fingerprint()], sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  name = f"{d.dataset.replace('/', '_')}_{d.image_size}_{digest}.npz"
  return os.fspath(workdir_lib.path(cache_dir, name))


def reference_statistics(config, features_fn, dataset, cache_dir: str = REFERENCE_CACHE_DIR
                         ) -> Tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the training images' features, computed once and cached on disk.

  Uses eval.reference_num_images training images (0: the whole training split), a fixed
  seed-independent random subset, with the Inception weights of eval.inception_weights.
  """
  num = config.eval.reference_num_images or dataset.info["num_train"]
  weights = inception.get_weights_path(config.eval.inception_weights)
  path = reference_statistics_path(config, num, inception.sha256_of_file(weights), cache_dir)
  if workdir_lib.exists(path):
    logging.info("Reference statistics from cache %s", path)
    return fid.load_statistics(path)
  logging.info("Reference statistics of %d training images (once; cached in %s).", num, path)
  feats, _ = fid.features_in_batches(
      features_fn, dataset.iter_reference_images(num, config.eval.batch_size))
  mu, sigma = fid.compute_statistics(feats)
  if jax.process_index() == 0:
    fid.save_statistics(path, mu, sigma)
    logging.info("Reference statistics cached in %s", path)
  return mu, sigma


def sample_in_rounds(config, workdir, step, params, mesh, model, diffusion) -> np.ndarray:
  """eval.num_samples uint8 samples, generated in saved rounds (a rerun resumes)."""
  round_dir = workdir_lib.path(workdir, "eval", f"samples_{step}")
  batch = _sampling_batch(config, config.eval.batch_size)
  num = config.eval.num_samples
  rounds = -(-num // batch)
  rng = _sample_rng(config, step, 3)
  sampler = sampling.make_sampler_from_config(config, diffusion,
                                              sampling.apply_fn_from_model(model), mesh=mesh,
                                              batch_size=batch, intermediate_every=0)
  out = []
  for r in range(rounds):
    path = round_dir / f"round_{r:05d}.npz"
    if path.exists():
      with workdir_lib.load_npz(path) as f:
        out.append(f["images"])
      continue
    y = _global_labels(_labels(config, batch, r * batch), mesh)
    x = images.to_uint8(_to_host(sampler(params, jax.random.fold_in(rng, r), y=y)))
    if jax.process_index() == 0:
      images.save_npz(path, x)
    out.append(x)
    logging.info("FID samples: round %d/%d saved", r + 1, rounds)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("fid_rounds")
  return np.concatenate(out)[:num]


def evaluate(config, workdir: str) -> Dict[str, float]:
  """Bits/dim and (when a feature extractor is configured) FID/IS of the newest checkpoint.

  Writes workdir/eval/eval_<step>.json and TensorBoard scalars; returns the results.
  """
  config_validation.validate_config(config, num_devices=jax.device_count())
  # Data first: a dataset that is not prepared is reported before the checkpoint is read.
  dataset = input_pipeline.create_datasets(config, seed=config.seed)
  params, step, (mesh, model, diffusion) = load_ema_params(config, workdir)
  results: Dict[str, float] = {"step": step}
  if config.eval.bpd_num_images > 0 and config.data.num_classes == 0:
    test = dataset.eval_images(config.eval.bpd_num_images)
    results.update(compute_bpd(config, params, mesh, model, diffusion, test,
                               jax.random.key(config.seed + 7)))
  if config.eval.num_samples > 0 and config.eval.feature_extractor != "none":
    features_fn = fid.feature_fn_from_config(config)
    mu_ref, sigma_ref = reference_statistics(config, features_fn, dataset)
    samples = sample_in_rounds(config, workdir, step, params, mesh, model, diffusion)
    feats, logits = fid.features_in_batches(features_fn, samples, config.eval.batch_size)
    mu, sigma = fid.compute_statistics(feats)
    results["fid"] = float(fid.frechet_distance(mu, sigma, mu_ref, sigma_ref))
    if logits is not None:
      results["inception_score"], results["inception_score_std"] = map(
          float, fid.inception_score(logits))
    results["fid_num_samples"] = int(samples.shape[0])
  if jax.process_index() == 0:
    path = workdir_lib.write_json(workdir_lib.path(workdir, "eval", f"eval_{step}.json"), results)
    tb = workdir_lib.tensorboard_writer(workdir)
    if tb is not None:
      with tb:
        for k, v in results.items():
          if k != "step":
            tb.add_scalar(f"eval/{k}", v, step)
    logging.info("Evaluation at step %d: %s (%s)", step, results, path)
  return results


def run_eval(config, workdir: str) -> Dict[str, float]:
  """--mode=eval."""
  results = evaluate(config, workdir)
  if jax.process_index() == 0:
    print(json.dumps(results, indent=2), flush=True)
  return results
