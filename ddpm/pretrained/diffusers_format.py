"""diffusers `UNet2DModel` folders (the DDPM releases on the Hugging Face hub) <-> our params.

A folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or `.bin`, a torch
pickle); a pipeline folder keeps them in `unet/`. The DDPM releases (google/ddpm-cifar10-32,
ddpm-celebahq-256, ddpm-church-256, ddpm-bedroom-256, ddpm-cat-256 and their ddpm-ema-* twins)
are exactly our DDPM U-Net, block for block:
  conv_in, time_embedding.linear_1/2          conv_in, temb_dense0/1
  down_blocks.{l}.resnets.{b}                 down_{l}_block_{b}   (ResnetBlock2D = ResBlock)
  down_blocks.{l}.attentions.{b}              down_{l}_attn_{b}    (AttnDownBlock2D levels)
  down_blocks.{l}.downsamplers.0.conv         down_{l}_downsample/conv
  mid_block.resnets.0, attentions.0, resnets.1   mid_block_1, mid_attn_1, mid_block_2
  up_blocks.{L-1-l}.resnets / attentions / upsamplers.0.conv   up_{l}_...
  conv_norm_out, conv_out                     norm_out, conv_out
with diffusers' DDPM settings: timestep embedding flip_sin_to_cos=False, freq_shift=1 (DDPM's
get_timestep_embedding: [sin, cos], frequencies over dim // 2 - 1), downsample_padding=0 (pad
right/bottom by one, then a stride-2 conv: TF's SAME padding), GroupNorm eps 1e-6, one
attention head of all channels (attention_head_dim=None), nearest upsampling + conv.
Older folders name the attention layers query/key/value/proj_attn; both spellings are read.
"""
import json
import os
import re
import shutil
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ddpm import config_validation
from ddpm import diffusion as diffusion_lib
from ddpm.errors import UserError
from ddpm.models import unet as unet_lib
from ddpm.pretrained import mapping

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
NORM_EPS = 1e-6  # our GroupNorm epsilon (DDPM's)

# UNet2DModel.__init__ defaults (diffusers 0.42), for config.json files that omit a key.
_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-5, "resnet_time_scale_shift": "default",
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
}
# Which part of our config each UNet2DModel setting comes from (for mismatch messages).
_OUR_KEYS = {
    "sample_size": "data.image_size", "in_channels": "data.channels",
    "out_channels": "data.channels", "block_out_channels": "model.ch, model.ch_mult",
    "layers_per_block": "model.num_res_blocks", "down_block_types": "model.attn_resolutions",
    "up_block_types": "model.attn_resolutions", "norm_num_groups": "model.norm_groups",
    "attention_head_dim": "model.num_heads, model.num_head_channels",
    "resnet_time_scale_shift": "model.use_scale_shift_norm",
    "num_class_embeds": "data.num_classes", "class_embed_type": "data.num_classes",
}
# Settings of the DDPM U-Net that no config key changes.
_FIXED_MEANING = {
    "flip_sin_to_cos": "DDPM's timestep embedding ([sin, cos])",
    "freq_shift": "DDPM's timestep embedding (frequencies over dim // 2 - 1)",
    "time_embedding_type": "DDPM's sinusoidal timestep embedding",
    "time_embedding_dim": "the timestep MLP width 4 * model.ch",
    "downsample_padding": "TF SAME padding of the stride-2 convs (0 before, 1 after)",
    "norm_eps": f"the U-Net's GroupNorm epsilon {NORM_EPS}",
    "act_fn": "swish", "center_input_sample": "inputs already in [-1, 1]",
    "mid_block_scale_factor": "unscaled residual blocks", "mid_block_type": "the middle block",
    "add_attention": "the middle attention block", "attn_norm_num_groups": "model.norm_groups",
    "downsample_type": "model.resamp_with_conv", "upsample_type": "model.resamp_with_conv",
}
# config.model / config.diffusion keys the mapping above covers, or that do not change the
# network; any other key set away from its default is refused by `unet2d_config` (it may change
# the network in a way UNet2DModel cannot follow).
_HANDLED = {
    "model": {"name", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
              "resamp_with_conv", "num_heads", "num_head_channels", "use_scale_shift_norm",
              "resblock_updown", "class_dropout", "remat", "norm_groups", "cpu_kernels"},
    "diffusion": {"num_timesteps", "beta_schedule", "model_mean_type", "model_var_type",
                  "loss_type", "hybrid_lambda", "min_snr_gamma", "timestep_sampler"},
}


# ---- our config -> UNet2DModel config ---------------------------------------------------------
def _cannot(reason: str) -> UserError:
  return UserError(f"a diffusers UNet2DModel cannot express this config: {reason}")


def _norm_widths(config) -> list:
  """Channel counts of every GroupNorm of build_model(config)."""
  return [shape[0] for path, shape in mapping.param_shapes(config).items()
          if path[-1] == "scale"]


def _group_count(config) -> int:
  """The one GroupNorm group count of the model, or UserError when layers differ."""
  fixed = config.model.norm_groups
  if fixed > 0:
    return int(fixed)
  counts = {}
  for width in _norm_widths(config):
    counts.setdefault(unet_lib.num_groups(width), width)
  if len(counts) > 1:
    shown = ", ".join(f"{g} for {w} channels" for g, w in sorted(counts.items()))
    raise _cannot(f"its GroupNorms have different group counts ({shown}) but UNet2DModel has "
                  "one norm_num_groups; set model.norm_groups to a count dividing every width")
  return next(iter(counts))


def _attention_head_dim(config, attn_widths) -> Optional[int]:
  m = config.model
  if m.num_head_channels > 0:
    return int(m.num_head_channels)
  if m.num_heads == 1:
    return None  # UNet2DModel: one head of all channels
  if len(set(attn_widths)) != 1:
    raise _cannot(f"model.num_heads={m.num_heads} heads at attention widths "
                  f"{sorted(set(attn_widths))} (UNet2DModel fixes the channels per head: use "
                  "model.num_head_channels)")
  return attn_widths[0] // m.num_heads


def unet2d_config(config) -> Dict[str, Any]:
  """The complete UNet2DModel config.json of build_model(config).

  Raises:
    UserError: (one line) for a network UNet2DModel cannot express.
  """
  m = config.model
  defaults = config_validation.default_config()
  for group, handled in _HANDLED.items():
    for key in config[group].keys():
      default = defaults[group].get(key)
      if key not in handled and key in defaults[group] and config[group][key] != default:
        raise _cannot(f"{group}.{key}={config[group][key]!r} (this exporter writes the DDPM "
                      f"layout, {group}.{key}={default!r})")
  if config.diffusion.model_var_type in diffusion_lib.LEARNED_VAR_TYPES:
    raise _cannot(f"diffusion.model_var_type={config.diffusion.model_var_type!r}: a learned "
                  "variance needs a scheduler with variance_type='learned_range', which a "
                  "model folder does not record; export fixed-variance models only")
  if m.use_scale_shift_norm:
    raise _cannot("model.use_scale_shift_norm=True (only the DDPM layout of the released "
                  "UNet2DModel checkpoints is exported: no AdaGN)")
  if config.data.num_classes > 0:
    raise _cannot(f"data.num_classes={config.data.num_classes}: class-conditional models "
                  "(with a null label) are not exported")
  if m.resblock_updown:
    raise _cannot("model.resblock_updown=True (not supported by this exporter)")
  if not m.resamp_with_conv:
    raise _cannot("model.resamp_with_conv=False (DownBlock2D and UpBlock2D always resample "
                  "with convolutions)")
  size = config.data.image_size
  levels = len(m.ch_mult)
  attn_levels = [size // 2 ** level in m.attn_resolutions for level in range(levels)]
  widths = [m.ch * mult for mult in m.ch_mult]
  attn_widths = [w for w, a in zip(widths, attn_levels) if a] + [widths[-1]]
  return {
      "_class_name": "UNet2DModel",
      "sample_size": size,
      "in_channels": config.data.channels,
      "out_channels": config.data.channels,
      "center_input_sample": False,
      "time_embedding_type": "positional",
      "time_embedding_dim": None,
      "freq_shift": 1,
      "flip_sin_to_cos": False,
      "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels],
      "mid_block_type": "UNetMidBlock2D",
      "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in attn_levels[::-1]],
      "block_out_channels": widths,
      "layers_per_block": m.num_res_blocks,
      "mid_block_scale_factor": 1,
      "downsample_padding": 0,
      "downsample_type": "conv",
      "upsample_type": "conv",
      "dropout": m.dropout,
      "act_fn": "silu",
      "attention_head_dim": _attention_head_dim(config, attn_widths),
      "norm_num_groups": _group_count(config),
      "attn_norm_num_groups": None,
      "norm_eps": NORM_EPS,
      "resnet_time_scale_shift": "default",
      "add_attention": True,
      "class_embed_type": None,
      "num_class_embeds": None,
      "num_train_timesteps": None,
  }


def check_config(folder_config: Dict[str, Any], config, source: str) -> None:
  """Raises UserError naming the first UNet2DModel setting of `folder_config` (a config.json)
  that differs from what `config` builds, with both values and our config key."""
  cls = folder_config.get("_class_name", "UNet2DModel")
  if cls != "UNet2DModel":
    raise UserError(f"{source}: _class_name={cls!r}, expected 'UNet2DModel' (the DDPM "
                    "releases' model class)")
  want = unet2d_config(config)
  for key, expected in want.items():
    if key.startswith("_") or key in ("dropout", "num_train_timesteps"):
      continue  # dropout does not change outputs at inference; num_train_timesteps is unused
    got = folder_config.get(key, _DEFAULTS[key])
    if isinstance(got, (list, tuple)):
      got = list(got)
    if got != expected and not (isinstance(got, float) and isinstance(expected, float)
                                and np.isclose(got, expected, rtol=1e-9, atol=0)):
      ours = _OUR_KEYS.get(key)
      where = (f"config's {ours} give {expected!r}" if ours and "," in ours else
               f"config's {ours} gives {expected!r}" if ours else
               f"our U-Net needs {expected!r} ({_FIXED_MEANING.get(key, 'fixed')})")
      raise UserError(f"{source}: {key}={got!r}, but the {where}")


# ---- names --------------------------------------------------------------------------------
_RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
             "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
_TOP = {"conv_in": "conv_in", "temb_dense0": "time_embedding.linear_1",
        "temb_dense1": "time_embedding.linear_2", "norm_out": "conv_norm_out",
        "conv_out": "conv_out", "mid_block_1": "mid_block.resnets.0",
        "mid_attn_1": "mid_block.attentions.0", "mid_block_2": "mid_block.resnets.1"}


def diffusers_name(path: mapping.Path, num_levels: int) -> str:
  """Our parameter path -> its UNet2DModel state-dict name, e.g.
  ('up_3_block_0', 'temb_proj', 'kernel') -> 'up_blocks.0.resnets.0.time_emb_proj.weight'."""
  top, *inner, leaf = path
  if top in _TOP:
    prefix = _TOP[top]
  else:
    match = re.fullmatch(r"(down|up)_(\d+)_(block|attn)_(\d+)", top)
    resample = re.fullmatch(r"(down|up)_(\d+)_(downsample|upsample)", top)
    if match:
      side, level, kind, index = match.groups()
    elif resample:
      side, level, kind, index = resample.groups() + ("0",)
    else:
      raise ValueError(f"no diffusers name for parameter {'/'.join(path)}")
    level = int(level) if side == "down" else num_levels - 1 - int(level)
    kind = {"block": "resnets", "attn": "attentions"}.get(kind, kind + "rs")
    prefix = f"{side}_blocks.{level}.{kind}.{index}"
  table = _ATTN if ".attentions." in prefix else _RESBLOCK
  inner = [table.get(name, name) for name in inner]
  return ".".join([prefix, *inner, _LEAF[leaf]])


def _is_conv_1x1(name: str) -> bool:
  return ".conv_shortcut." in name


def _hint(name: str) -> str:
  """The config key that most likely differs when tensor `name` is missing/unexpected/mis-shaped."""
  if name.startswith("conv_in."):
    return "data.channels or model.ch"
  if name.startswith("conv_out."):
    return "data.channels or diffusion.model_var_type (a learned variance doubles the outputs)"
  if name.startswith("time_embedding."):
    return "model.ch (the timestep MLP is 4 * model.ch wide)"
  if name.startswith("class_embedding."):
    return "data.num_classes"
  if ".attentions." in name:
    return "model.attn_resolutions"
  match = re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.", name)
  if match and int(match.group(3)) >= 1:
    return "model.num_res_blocks"
  return "model.ch_mult (or model.ch, model.num_res_blocks)"


def normalize_names(state_dict: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Old diffusers attention names (query, key, value, proj_attn) -> current ones."""
  out = {}
  for name, value in state_dict.items():
    match = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", name)
    out[f"{match.group(1)}.{_OLD_ATTN[match.group(2)]}.{match.group(3)}" if match else name] = value
  return out


def is_diffusers(state_dict) -> bool:
  """Whether a state dict looks like a UNet2DModel's."""
  return "conv_in.weight" in state_dict and "time_embedding.linear_1.weight" in state_dict


def match(shapes_by_name, config, source: str = "state dict") -> Dict[mapping.Path, str]:
  """{our parameter path: UNet2DModel tensor name} of a state dict given by its tensor shapes
  (mapping.match: UserError naming the first missing, mis-shaped or unexpected tensor)."""
  levels = len(config.model.ch_mult)
  return mapping.match(normalize_names(shapes_by_name), config,
                       lambda path: diffusers_name(path, levels), _hint, source,
                       conv_1x1=_is_conv_1x1)


def to_params(state_dict, config, source: str = "state dict") -> dict:
  """Flax params of build_model(config) from a UNet2DModel state dict (numpy arrays)."""
  levels = len(config.model.ch_mult)
  return mapping.to_params(normalize_names(state_dict), config,
                           lambda path: diffusers_name(path, levels), _hint, source,
                           conv_1x1=_is_conv_1x1)


def from_params(params, config, source: str = "params") -> Dict[str, np.ndarray]:
  """The UNet2DModel state dict (float32 numpy, torch layout) of our params."""
  levels = len(config.model.ch_mult)
  out = {}
  for path, value in mapping.check_params(params, config, source).items():
    name = diffusers_name(path, levels)
    out[name] = mapping.to_torch(value, _is_conv_1x1(name))
  return out


# ---- folders ------------------------------------------------------------------------------
def model_folder(path: str) -> str:
  """`path`, or its unet/ subfolder for a pipeline folder (DDPMPipeline.save_pretrained)."""
  if not os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(
      os.path.join(path, "unet", CONFIG_NAME)):
    return os.path.join(path, "unet")
  return path


def read_folder(path: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """(config.json as a dict, state dict) of a diffusers model folder.

  Raises:
    UserError: no config.json or no weights, unreadable JSON or weights.
  """
  folder = model_folder(path)
  config_path = os.path.join(folder, CONFIG_NAME)
  weights = [os.path.join(folder, n) for n in WEIGHTS_NAMES
             if os.path.isfile(os.path.join(folder, n))]
  if not os.path.isfile(config_path) or not weights:
    missing = CONFIG_NAME if not os.path.isfile(config_path) else " or ".join(WEIGHTS_NAMES)
    raise UserError(f"{path} is not a diffusers model folder: {missing} not found in {folder}")
  try:
    with open(config_path) as f:
      folder_config = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {config_path}: {e}") from None
  if not isinstance(folder_config, dict):
    raise UserError(f"{config_path} holds no JSON object")
  return folder_config, read_weights(weights[0])


def read_weights(path: str) -> Dict[str, np.ndarray]:
  """A .safetensors (safetensors' numpy API) or torch .bin/.pt state dict, without torch."""
  if path.endswith(".safetensors"):
    from safetensors import numpy as safetensors_numpy
    try:
      return dict(safetensors_numpy.load_file(path))
    except Exception as e:  # pylint: disable=broad-except
      # safetensors raises SafetensorError (or OSError/ValueError) for truncated/foreign files.
      raise UserError(f"cannot read {path}: not a complete safetensors file ({type(e).__name__}"
                      f": {str(e)[:200]})") from None
  from ddpm.pretrained import torch_pickle
  return torch_pickle.load_state_dict(path)


def load_folder(path: str, config) -> dict:
  """Flax params of build_model(config) from a diffusers UNet2DModel folder, after checking its
  config.json against `config`."""
  folder_config, state_dict = read_folder(path)
  check_config(folder_config, config, os.path.join(model_folder(path), CONFIG_NAME))
  return to_params(state_dict, config, source=path)


def export(params, config, out_dir: str) -> str:
  """Writes `params` (of build_model(config)) as a diffusers UNet2DModel folder.

  `out_dir` gets config.json and diffusion_pytorch_model.safetensors, readable by
  `diffusers.UNet2DModel.from_pretrained(out_dir)`. Nothing is written when the config cannot
  be expressed or `out_dir` exists and is not empty. Returns out_dir.
  """
  folder_config = unet2d_config(config)
  tensors = from_params(params, config)
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise UserError(f"--export_to={out_dir} exists and is not an empty folder: choose a new one")
  from safetensors import numpy as safetensors_numpy
  # Written next to out_dir, then renamed: an interrupted export leaves no half folder there.
  tmp = f"{os.path.abspath(out_dir).rstrip(os.sep)}.partial-{os.getpid()}"
  os.makedirs(tmp)
  try:
    safetensors_numpy.save_file(tensors, os.path.join(tmp, WEIGHTS_NAMES[0]),
                                metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(folder_config, f, indent=2)
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty (checked above)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
