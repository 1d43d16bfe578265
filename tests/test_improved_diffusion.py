"""Import of openai/improved-diffusion UNetModel state dicts (ddpm/pretrained/improved_diffusion.py)
into configs/cifar10_improved.py and configs/imagenet64_improved.py.

The fixtures (tests/fixtures/improved_diffusion_*_tiny.npz, written by
scripts/make_improved_diffusion_fixtures.py with improved-diffusion's own code) hold random
narrow UNetModels with the README flags of the CIFAR-10 and ImageNet-64 models, inputs at
t = 0, between and T - 1, and the peer's outputs; ours must equal them to 1e-4 relative.
"""
import importlib
import json
import math
import os

import jax
import numpy as np
import pytest

from ddpm import config_validation
from ddpm.errors import UserError
from ddpm.models import build_model
from ddpm.models.unet import Downsample, timestep_embedding
from ddpm.pretrained import improved_diffusion

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(base, overrides):
  config = importlib.import_module(f"configs.{base}").get_config()
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = tuple(value) if isinstance(value, list) else value
  return config


def _load(name):
  """(config, state dict, x, t, peer output) of a fixture."""
  with np.load(os.path.join(FIXTURES, f"improved_diffusion_{name}_tiny.npz")) as f:
    data = {k: f[k] for k in f.files}
  state_dict, offset = {}, 0
  for key, shape in json.loads(data["state_dict_index"].item()):
    size = math.prod(shape)
    state_dict[key] = data["state_dict_values"][offset:offset + size].reshape(shape)
    offset += size
  assert offset == data["state_dict_values"].size
  config = _config(str(data["base"]), json.loads(data["overrides"].item()))
  config_validation.validate_config(config)
  return config, state_dict, data["x"].astype(np.float32), data["t"], data["out"]


def _relative_error(config, params, x, t, want):
  got = jax.jit(build_model(config).apply)({"params": params}, x, t)
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def cifar10():
  return _load("cifar10")


# On CPU the model runs with the XLA:CPU kernels by default (cpu_kernels); the stock Flax layers
# that GPUs and TPUs run are checked on the second fixture.
@pytest.mark.parametrize("name,cpu_kernels", [("cifar10", True), ("imagenet64", False)])
def test_outputs_equal_improved_diffusion(name, cpu_kernels, cifar10):
  config, state_dict, x, t, want = cifar10 if name == "cifar10" else _load(name)
  config.model.cpu_kernels = cpu_kernels
  assert t[0] == 0 and t[-1] == config.diffusion.num_timesteps - 1 and 0 < t[1] < t[-1]
  assert want.shape == x.shape[:3] + (2 * config.data.channels,)  # learned variance
  params = improved_diffusion.to_params(state_dict, config)
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) == sum(
      v.size for v in state_dict.values())
  assert _relative_error(config, params, x, t, want) < 1e-4


@pytest.mark.slow
def test_each_improved_diffusion_option_is_needed(cifar10):
  # The fixture tells the options apart: DDPM's value of any of them gives a visibly wrong output.
  config, state_dict, x, t, want = cifar10
  params = improved_diffusion.to_params(state_dict, config)
  for key, ddpm_value in [("rescale_timesteps", False), ("timestep_embedding", "ddpm"),
                          ("downsample_padding", "same"), ("num_heads", 1)]:
    changed = _config("cifar10_improved", {"model.ch": 8, "model." + key: ddpm_value})
    assert _relative_error(changed, params, x, t, want) > 1e-2, key
  # GroupNorm's epsilon only matters where the variance is small: 1e-6 instead of 1e-5 moves
  # the output, though far less.
  changed = _config("cifar10_improved", {"model.ch": 8, "model.norm_eps": 1e-6})
  assert _relative_error(changed, params, x, t, want) > 1e-6


# ---- the U-Net options, one by one ---------------------------------------------------------

def test_configs_select_improved_diffusion_options_and_defaults_stay_ddpm():
  for name in ("cifar10_improved", "imagenet64_improved"):
    model = build_model(_config(name, {}))
    assert model.timestep_scale == 1000 / 4000  # rescale_timesteps: t * 1000 / T
    assert (model.timestep_embedding_kind, model.norm_eps, model.downsample_padding) == (
        "adm", 1e-5, "symmetric")
  t1000 = _config("cifar10_improved", {"diffusion.num_timesteps": 1000})
  assert build_model(t1000).timestep_scale == 1.0
  model = build_model(_config("cifar10_ddpm", {}))
  assert (model.timestep_scale, model.timestep_embedding_kind, model.norm_eps,
          model.downsample_padding) == (1.0, "ddpm", 1e-6, "same")


@pytest.mark.parametrize("key,value", [("model.timestep_embedding", "adn"),
                                       ("model.downsample_padding", "valid"),
                                       ("model.norm_eps", 0.0)])
def test_bad_option_values_are_refused(key, value):
  config = _config("cifar10_improved", {key: value})
  with pytest.raises(config_validation.ConfigError, match=f"config.{key}"):
    config_validation.validate_config(config)


def test_adm_timestep_embedding_closed_form():
  t = np.array([0.0, 0.25, 999.75, 731.5])
  dim = 10
  freqs = np.exp(-np.log(10000.0) * np.arange(dim // 2) / (dim // 2))
  want = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  got = timestep_embedding(jax.numpy.asarray(t, np.float32), dim, kind="adm")
  np.testing.assert_allclose(got, want, atol=2e-4)  # float32 arguments up to 1000
  odd = timestep_embedding(jax.numpy.asarray(t, np.float32), dim + 1, kind="adm")
  np.testing.assert_allclose(odd[:, :dim], got)
  assert np.all(np.asarray(odd[:, dim]) == 0)


@pytest.mark.parametrize("padding,offset", [("same", 0), ("symmetric", -1)])
def test_downsample_conv_padding(padding, offset):
  # Output (i, j) of the stride-2 3x3 conv sees input rows / columns 2i + offset + (0, 1, 2):
  # TF's SAME pads nothing before (offset 0), torch's padding=1 one row before (offset -1).
  rng = np.random.RandomState(0)
  x = rng.standard_normal((1, 8, 8, 2)).astype(np.float32)
  layer = Downsample(with_conv=True, padding=padding)
  params = layer.init(jax.random.key(0), x)
  w = np.asarray(params["params"]["conv"]["kernel"])
  b = np.asarray(params["params"]["conv"]["bias"])
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))  # index r of x is r + 2 here
  want = np.zeros((1, 4, 4, 2), np.float32) + b
  for i in range(4):
    for j in range(4):
      r, c = 2 * i + offset + 2, 2 * j + offset + 2
      want[0, i, j] += np.einsum("hwi,hwio->o", padded[0, r:r + 3, c:c + 3], w)
  np.testing.assert_allclose(layer.apply(params, x), want, rtol=1e-5, atol=1e-5)


# ---- the mapping ---------------------------------------------------------------------------

def test_is_improved_diffusion(cifar10):
  _, state_dict, *_ = cifar10
  assert improved_diffusion.is_improved_diffusion(state_dict)
  # Our own flattened names, and a diffusers UNet2DModel's, are not improved-diffusion's.
  assert not improved_diffusion.is_improved_diffusion({"conv_in/kernel": 0, "conv_out/bias": 0})
  assert not improved_diffusion.is_improved_diffusion(
      {"conv_in.weight": 0, "time_embedding.linear_1.weight": 0,
       "mid_block.resnets.0.conv1.weight": 0})


def test_missing_tensor_is_named(cifar10):
  config, state_dict, *_ = cifar10
  key = "output_blocks.4.1.qkv.weight"
  with pytest.raises(UserError, match=f"missing tensor {key}"):
    improved_diffusion.to_params({k: v for k, v in state_dict.items() if k != key}, config)


def test_unexpected_tensor_is_named(cifar10):
  config, state_dict, *_ = cifar10
  extra = dict(state_dict, **{"label_emb.weight": np.zeros((10, 32), np.float16)})
  with pytest.raises(UserError, match="unexpected tensor label_emb.weight"):
    improved_diffusion.to_params(extra, config)


@pytest.mark.parametrize("key,value", [("data.num_classes", 10),
                                       ("model.resblock_updown", True)])
def test_configs_improved_diffusion_cannot_express_are_refused(cifar10, key, value):
  _, state_dict, *_ = cifar10
  with pytest.raises(UserError, match=f"config.{key}="):
    improved_diffusion.to_params(state_dict, _config("cifar10_improved", {"model.ch": 8,
                                                                          key: value}))


@pytest.mark.parametrize("key,value,tensor,hint", [
    # 2 residual blocks per level instead of the checkpoint's 3: input_blocks.3 is a residual
    # block where the config expects the first downsampling conv.
    ("model.num_res_blocks", 2, "missing tensor input_blocks.3.0.op.weight",
     "config.model.num_res_blocks: the checkpoint has 3, the config 2"),
    ("model.ch", 16, r"tensor time_embed.0.weight has shape \(32, 8\)",
     "config.model.ch: the checkpoint has 8, the config 16"),
    ("model.ch_mult", (1, 2, 2, 4), "tensor input_blocks.13.0.in_layers.2.weight has shape",
     r"config.model.ch_mult: the checkpoint has \(1, 2, 2, 2\), the config \(1, 2, 2, 4\)"),
    ("model.attn_resolutions", (16,), "unexpected tensor input_blocks.9.1.norm.weight",
     r"config.model.attn_resolutions: the checkpoint has \(16, 8\), the config \(16,\)"),
    ("model.use_scale_shift_norm", False,
     r"tensor input_blocks.1.0.emb_layers.1.weight has shape \(16, 32\)",
     "config.model.use_scale_shift_norm: the checkpoint has True, the config False"),
    ("diffusion.model_var_type", "fixed_large", r"tensor out.2.weight has shape \(6, 8, 3, 3\)",
     "config.diffusion.model_var_type"),
])
def test_config_mismatch_names_tensor_and_config_key(cifar10, key, value, tensor, hint):
  config, state_dict, *_ = cifar10
  section, name = key.split(".")
  config = _config("cifar10_improved", {"model.ch": 8, key: value})
  with pytest.raises(UserError, match=tensor) as info:
    improved_diffusion.to_params(state_dict, config)
  assert info.match(hint)
  assert "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("name,num_params", [("cifar10_improved", 52_546_438),
                                             ("imagenet64_improved", 121_063_942)])
def test_full_size(name, num_params):
  """The full-size networks of the configs against improved-diffusion's (needs torch and
  improved-diffusion's source on the path)."""
  pytest.importorskip("torch")
  pytest.importorskip("improved_diffusion")
  spec = importlib.util.spec_from_file_location(
      "make_improved_diffusion_fixtures",
      os.path.join(ROOT, "scripts", "make_improved_diffusion_fixtures.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  n, diff = script.full_size_difference(name)
  assert n == num_params
  assert diff < 1e-4
