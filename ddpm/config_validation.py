"""Validation of experiment configs, run before anything is built or compiled.

The public functions that take a config (`train.train_and_evaluate`, `evaluation.run_sampling`,
`evaluation.evaluate`, `sweep.run_sweep`, `benchmark.run_benchmark`) call `validate_config` first;
`launch.py` only dispatches to them. Every problem is reported as one `ConfigError` naming the
offending key, e.g.
  ConfigError: config.training.batchsize: unknown key (did you mean 'batch_size'?)
Each list of choices is read from the module that implements the choices.
"""
import difflib
from typing import Any, Optional

import ml_collections

from ddpm import default_config as default_config_lib
from ddpm import diffusion as diffusion_lib
from ddpm import errors
from ddpm import experiment
from ddpm import fid
from ddpm import input_pipeline
from ddpm import models
from ddpm import sampling
from ddpm import schedules
from ddpm import timestep_sampler

CHOICES = {
    "diffusion.beta_schedule": schedules.SCHEDULE_NAMES,
    "diffusion.model_mean_type": diffusion_lib.MEAN_TYPES,
    "diffusion.model_var_type": diffusion_lib.VAR_TYPES,
    "diffusion.loss_type": diffusion_lib.LOSS_TYPES,
    "diffusion.timestep_sampler": timestep_sampler.SAMPLER_NAMES,
    "training.compute_dtype": tuple(models.COMPUTE_DTYPES),
    "optim.optimizer": experiment.OPTIMIZERS,
    "optim.schedule": experiment.LR_SCHEDULES,
    "sampling.method": sampling.METHODS,
    "sampling.spacing": sampling.SPACINGS,
    "eval.feature_extractor": fid.FEATURE_EXTRACTORS,
    "model.name": models.MODEL_NAMES,
    "model.timestep_embedding": models.unet.TIMESTEP_EMBEDDINGS,
    "model.downsample_padding": tuple(models.unet.DOWNSAMPLE_PADDINGS),
    "data.channels": input_pipeline.CHANNELS,
}
# Keys a config may add on top of the defaults (free-form groups).
_FREE_FORM = ("variants",)


class ConfigError(errors.UserError, ValueError):
  """A config value is unknown, of the wrong type, or impossible."""


def default_config() -> ml_collections.ConfigDict:
  """The base config (ddpm/default_config.py, re-exported by configs/default.py)."""
  return default_config_lib.get_config()


def learns_sigma(config) -> bool:
  """Whether the model outputs a variance too (twice the channels)."""
  return config.diffusion.model_var_type in diffusion_lib.LEARNED_VAR_TYPES


def batch_sizes(config) -> tuple:
  """Every batch size the config (and any of its sweep variants) runs with: training, sampling
  and evaluation. Each must divide by the device count."""
  groups = ("training", "sampling", "eval")
  sizes = [config[g].batch_size for g in groups]
  for overrides in config.get("variants", {}).values():
    sizes += [overrides[g]["batch_size"] for g in groups
              if g in overrides and "batch_size" in overrides[g]]
  return tuple(sizes)


def _type_ok(default: Any, value: Any) -> bool:
  if default is None or value is None:
    return True
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def _check_keys(config, default, prefix: str):
  for key in config.keys():
    name = f"{prefix}{key}"
    if prefix == "" and key in _FREE_FORM:
      continue
    if key not in default:
      close = difflib.get_close_matches(key, list(default.keys()), n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ""
      raise ConfigError(f"config.{name}: unknown key{hint}. Valid keys here: "
                        f"{', '.join(sorted(default.keys()))}")
    value, ref = config[key], default[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config.{name}: expected a group of settings, got {value!r}")
      _check_keys(value, ref, name + ".")
    elif not _type_ok(ref, value):
      raise ConfigError(f"config.{name}: expected {type(ref).__name__}, got "
                        f"{type(value).__name__} {value!r}")


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _require(cond: bool, key: str, msg: str):
  if not cond:
    raise ConfigError(f"config.{key}: {msg}")


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: Optional[int] = None) -> ml_collections.ConfigDict:
  """Checks `config` against ddpm/default_config.py and for impossible combinations.

  Args:
    config: the experiment config.
    num_devices: global device count; when given, batch sizes must divide by it.
  Returns:
    `config`, unchanged, so calls can be chained.
  Raises:
    ConfigError: naming the first offending key.
  """
  _check_keys(config, default_config(), "")
  for key, choices in CHOICES.items():
    value = _get(config, key)
    _require(value in choices, key, f"{value!r} is not one of {', '.join(map(repr, choices))}")

  d, m, t, o, s, e = (config.data, config.model, config.training, config.optim,
                      config.sampling, config.eval)
  _require(d.dataset != "", "data.dataset", "must name a dataset (digits, folder or a TFDS name)")
  known = ("digits", "folder") + tuple(input_pipeline.TFDS_DATASETS)
  _require(d.dataset.split(":")[0] in known, "data.dataset",
           f"unknown dataset {d.dataset!r}; one of {', '.join(known)} (TFDS names may add "
           "':<version>')")
  _require(config.seed >= 0, "seed", f"must be >= 0, got {config.seed}")
  _require(d.dataset != "folder" or d.path, "data.path",
           "must name a folder of images when data.dataset='folder'")
  _require(d.image_size > 0, "data.image_size", f"must be positive, got {d.image_size}")
  _require(d.num_classes >= 0, "data.num_classes", f"must be >= 0, got {d.num_classes}")

  _require(len(m.ch_mult) >= 1, "model.ch_mult", "needs at least one level")
  factor = 2 ** (len(m.ch_mult) - 1)
  _require(d.image_size % factor == 0, "data.image_size",
           f"{d.image_size} is not divisible by {factor}, the U-Net's downsampling for "
           f"model.ch_mult={tuple(m.ch_mult)}")
  resolutions = [d.image_size // 2 ** i for i in range(len(m.ch_mult))]
  for r in m.attn_resolutions:
    _require(r in resolutions, "model.attn_resolutions",
             f"{r} is not one of the U-Net's resolutions {resolutions}")
  _require(m.ch > 0, "model.ch", f"must be positive, got {m.ch}")
  _require(m.norm_eps > 0, "model.norm_eps", f"must be positive, got {m.norm_eps}")
  _require(m.num_res_blocks >= 1, "model.num_res_blocks", f"must be >= 1, got {m.num_res_blocks}")
  _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
  _require(0.0 <= m.class_dropout < 1.0, "model.class_dropout",
           f"must be in [0, 1), got {m.class_dropout}")
  _require(m.class_dropout == 0.0 or d.num_classes > 0, "model.class_dropout",
           "classifier-free guidance needs labels: set data.num_classes > 0")
  # Any width works for GroupNorm: the U-Net picks the groups per layer (unet.num_groups),
  # unless model.norm_groups fixes them (every width is a sum of ch * mult terms).
  _require(m.norm_groups >= 0, "model.norm_groups", f"must be >= 0, got {m.norm_groups}")
  for mult in m.ch_mult if m.norm_groups > 0 else ():
    _require((m.ch * mult) % m.norm_groups == 0, "model.norm_groups",
             f"{m.norm_groups} groups do not divide the {m.ch * mult} channels of model.ch * "
             f"{mult}")
  if m.num_head_channels > 0:
    for mult in m.ch_mult:
      _require((m.ch * mult) % m.num_head_channels == 0, "model.num_head_channels",
               f"{m.num_head_channels} does not divide {m.ch * mult} channels")
  else:
    _require(m.num_heads >= 1, "model.num_heads", f"must be >= 1, got {m.num_heads}")

  df = config.diffusion
  _require(df.num_timesteps >= 2, "diffusion.num_timesteps", f"must be >= 2, got {df.num_timesteps}")
  learned_var = df.model_var_type in diffusion_lib.LEARNED_VAR_TYPES
  _require(df.loss_type != "hybrid" or learned_var, "diffusion.loss_type",
           "'hybrid' trains the variance through L_vlb: it needs model_var_type 'learned' or "
           f"'learned_range', got {df.model_var_type!r}")
  _require(df.min_snr_gamma >= 0, "diffusion.min_snr_gamma", f"must be >= 0, got {df.min_snr_gamma}")

  _require(t.batch_size > 0, "training.batch_size", f"must be positive, got {t.batch_size}")
  _require(t.num_train_steps >= 0, "training.num_train_steps", "must be >= 0")
  for key in ("log_every", "checkpoint_every", "steps_per_dispatch", "keep_checkpoints"):
    _require(t[key] >= 1, f"training.{key}", f"must be >= 1, got {t[key]}")
  _require(t.sample_every >= 0, "training.sample_every", "must be >= 0")
  for key in ("log_every", "checkpoint_every", "sample_every"):
    _require(t[key] % t.steps_per_dispatch == 0, f"training.{key}",
             f"{t[key]} is not a multiple of training.steps_per_dispatch={t.steps_per_dispatch}")
  _require(0.0 <= t.ema_decay < 1.0, "training.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
  _require(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
  _require(o.warmup >= 0, "optim.warmup", "must be >= 0")
  _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
  _require(o.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")

  _require(0 <= s.num_steps <= df.num_timesteps, "sampling.num_steps",
           f"must be in [0, diffusion.num_timesteps={df.num_timesteps}], got {s.num_steps}")
  _require(s.num_samples > 0, "sampling.num_samples", "must be positive")
  _require(s.batch_size > 0, "sampling.batch_size", "must be positive")
  _require(s.eta >= 0, "sampling.eta", f"must be >= 0, got {s.eta}")
  _require(s.guidance_scale == 0 or d.num_classes > 0, "sampling.guidance_scale",
           "classifier-free guidance needs a class-conditional model (data.num_classes > 0)")
  _require(e.num_samples >= 0, "eval.num_samples", "must be >= 0")
  _require(e.reference_num_images >= 0, "eval.reference_num_images",
           "must be >= 0 (0 = the whole training split)")
  _require(e.bpd_num_images >= 0, "eval.bpd_num_images", "must be >= 0")
  _require(e.batch_size > 0, "eval.batch_size", "must be positive")

  if num_devices is not None:
    for key in ("training.batch_size", "sampling.batch_size", "eval.batch_size"):
      value = _get(config, key)
      _require(value % num_devices == 0, key,
               f"{value} is not divisible by the {num_devices} devices; use a multiple of "
               f"{num_devices}")
  return config
