"""Released checkpoints of other codebases as params of our U-Net, and export to diffusers.

  params = ddpm.pretrained.load(path, config)   # Flax params of ddpm.models.build_model(config)
  ddpm.pretrained.export(params, config, out_dir)   # a diffusers UNet2DModel folder

`path` may be
  * a diffusers model folder (config.json + diffusion_pytorch_model.safetensors or .bin; a
    pipeline folder's unet/): the DDPM releases google/ddpm-{cifar10-32, celebahq-256,
    church-256, bedroom-256, cat-256} and their ddpm-ema-* twins. Its config.json is checked
    against `config` first (diffusers_format.py);
  * a torch file (.pt/.pth/.bin) holding an improved-diffusion UNetModel state dict
    (improved_diffusion.py) or a UNet2DModel state dict, read without PyTorch
    (torch_pickle.py: nothing in the file is executed);
  * a .safetensors file of a UNet2DModel state dict;
  * a TF checkpoint prefix of the original DDPM code (diffusion_tf's model.ckpt-*), when
    TensorFlow is installed (tf_checkpoint.py).
Every mistake (missing or foreign file, pickled code, a config that does not match the weights)
is one `UserError` line naming the first bad tensor or setting and the config key to change.

`import_checkpoint` / `export_checkpoint` are launch.py's --mode=import and --mode=export.
"""
import os

from ddpm.errors import UserError
from ddpm.pretrained import diffusers_format

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _load_state_dict_file(path: str, config) -> dict:
  if path.endswith(".safetensors"):
    state_dict = diffusers_format.read_weights(path)
  else:
    from ddpm.pretrained import torch_pickle
    state_dict = torch_pickle.load_state_dict(path)
  if diffusers_format.is_diffusers(state_dict):
    return diffusers_format.to_params(state_dict, config, source=path)
  from ddpm.pretrained import improved_diffusion  # pylint: disable=g-import-not-at-top
  if improved_diffusion.is_improved_diffusion(state_dict):
    return improved_diffusion.to_params(state_dict, config)
  first = ", ".join(list(state_dict)[:3])
  raise UserError(f"{path}: a state dict of neither a diffusers UNet2DModel nor an "
                  f"improved-diffusion UNetModel (first tensors: {first or 'none'})")


def load(path: str, config) -> dict:
  """Flax params (nested dict of float32 numpy arrays) of `ddpm.models.build_model(config)`
  from a released checkpoint at `path` (see the module doc for the formats).

  Raises:
    UserError: unreadable or foreign `path`, or weights that do not fit `config` (naming the
      first missing, unexpected or mis-shaped tensor and the config key that likely differs).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    return diffusers_format.load_folder(path, config)
  if os.path.isfile(path) and path.endswith(TORCH_SUFFIXES + (".safetensors",)):
    return _load_state_dict_file(path, config)
  if os.path.isfile(path + ".index"):
    from ddpm.pretrained import tf_checkpoint
    return tf_checkpoint.load(path, config)
  if os.path.isfile(path):
    raise UserError(f"{path}: unknown checkpoint format (expected a diffusers model folder, a "
                    "torch .pt/.pth/.bin, a .safetensors file or a TF checkpoint prefix)")
  raise UserError(f"no checkpoint at {path}: neither a folder, a file nor a TF checkpoint "
                  "prefix (PREFIX.index)")


def export(params, config, out_dir: str) -> str:
  """Writes params of build_model(config) as a diffusers UNet2DModel folder (config.json +
  diffusion_pytorch_model.safetensors); UserError (nothing written) for configs UNet2DModel
  cannot express or an `out_dir` that is not empty. Returns out_dir."""
  return diffusers_format.export(params, config, os.fspath(out_dir))


def import_checkpoint(config, workdir: str, path: str) -> int:
  """--mode=import: writes workdir/checkpoints step 0 whose params and EMA params are the
  weights at `path`, with a fresh optimizer state, so that --mode=sample / eval / train
  (fine-tuning) use them unchanged. Nothing is written when loading fails or workdir already
  holds a checkpoint. Returns the step written (0)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from absl import logging
  from ddpm import checkpointing, config_validation, experiment

  config_validation.validate_config(config, num_devices=jax.device_count())
  ckpt_dir = os.path.join(workdir, "checkpoints")
  existing = checkpointing.latest_step(ckpt_dir)
  if existing is not None:
    raise UserError(f"{ckpt_dir} already holds checkpoint step {existing}: import into a new "
                    "--workdir")
  params = load(path, config)
  mesh, model, _, sampler, _ = experiment.setup(config)
  # Eagerly (nothing to compile: no model.init), then replicated like setup's init_fn.
  state = experiment.create_train_state(config, model, sampler, experiment.initial_rng(config),
                                        params=jax.tree.map(jnp.asarray, params))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  mngr = checkpointing.create_manager(ckpt_dir, max_to_keep=config.training.keep_checkpoints,
                                      async_save=False)
  checkpointing.save(mngr, 0, state, force=True)
  checkpointing.wait(mngr)
  n = sum(x.size for x in jax.tree.leaves(params))
  logging.info("Imported %s parameters from %s into %s (step 0; params = EMA params).",
               f"{n:,}", path, ckpt_dir)
  return 0


def export_checkpoint(config, workdir: str, out_dir: str) -> str:
  """--mode=export: the EMA params of workdir's newest checkpoint as a diffusers UNet2DModel
  folder at out_dir. Returns out_dir."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax
  from absl import logging
  from ddpm import checkpointing, config_validation, evaluation

  config_validation.validate_config(config, num_devices=jax.device_count())
  diffusers_format.unet2d_config(config)  # fail before restoring anything
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if checkpointing.latest_step(ckpt_dir) is None:
    raise UserError(f"no checkpoint in {ckpt_dir} to export (train or --mode=import first)")
  params, step, _ = evaluation.load_ema_params(config, workdir)
  export(jax.tree.map(np.asarray, params), config, out_dir)
  logging.info("Exported the EMA params of step %d in %s to %s.", step, ckpt_dir, out_dir)
  return out_dir
