"""Every config in configs/ builds: validation, U-Net, parameter count, diffusion, sweep variants.

Nothing is trained or allocated: models are traced with jax.eval_shape. The paper configs are
also checked against the hyper-parameters their papers and released code state (see each
config's docstring for the sources), and the Improved-DDPM U-Nets against an independent count
of openai/improved-diffusion's UNetModel.
"""
import glob
import importlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm import config_validation, diffusion, input_pipeline, sweep
from ddpm.models import build_model, count_params

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_NAMES = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
    if not os.path.basename(p).startswith("_") and os.path.basename(p) != "default.py")

_COUNTS = {}  # parameter counts by (model, image size, channels): variants share most models


def _load(name):
  return importlib.import_module(f"configs.{name}").get_config()


def _count_key(config):
  return (repr(build_model(config)), config.data.image_size, config.data.channels)


def _num_params(config) -> int:
  key = _count_key(config)
  if key not in _COUNTS:
    _COUNTS[key] = count_params(build_model(config), config.data.image_size,
                                config.data.channels)
  return _COUNTS[key]


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def test_config_files_are_found():
  for name in ("cifar10_ddpm", "cifar10_ddpm_vlb", "cifar10_improved", "imagenet64_improved",
               "mnist", "fashion_mnist", "tiny"):
    assert name in CONFIG_NAMES


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_builds(name):
  module = importlib.import_module(f"configs.{name}")
  assert (module.__doc__ or "").strip(), f"configs/{name}.py needs a docstring"
  config = config_validation.validate_config(module.get_config(), num_devices=8)
  dataset = config.data.dataset.split(":")[0]
  assert dataset in input_pipeline.SUPPORTED_DATASETS

  # The U-Net, traced only: output shape and parameter count without allocating anything.
  model = build_model(config)
  size, channels = config.data.image_size, config.data.channels
  x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), x, t)
  learns_sigma = config.diffusion.model_var_type in diffusion.LEARNED_VAR_TYPES
  out_channels = channels * (2 if learns_sigma else 1)
  assert out.shape == (2, size, size, out_channels) and out.dtype == jnp.float32
  n = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))
  assert n > 0 and _COUNTS.setdefault(_count_key(config), n) == n

  gd = diffusion.from_config(config)
  assert gd.num_timesteps == config.diffusion.num_timesteps
  assert (gd.model_mean_type, gd.model_var_type, gd.loss_type) == (
      config.diffusion.model_mean_type, config.diffusion.model_var_type,
      config.diffusion.loss_type)
  alphas_cumprod = np.cumprod(1.0 - gd.betas_float64)
  assert np.all(np.diff(alphas_cumprod) < 0) and 0 <= alphas_cumprod[-1] < alphas_cumprod[0] < 1


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_variants_build(name):
  config = _load(name)
  base = config.to_dict()
  base.pop("variants", None)
  flat_base = _flatten(base)
  for variant in sweep.variant_names(config):
    vc = sweep.variant_config(config, variant)  # validates for jax.device_count() == 8 devices
    assert "variants" not in vc
    overrides = _flatten(config.variants[variant].to_dict())
    flat = _flatten(vc.to_dict())
    assert flat.keys() == flat_base.keys()
    for key, value in flat.items():  # exactly the overrides change, nothing else
      assert value == overrides.get(key, flat_base[key]), (variant, key)
    gd = diffusion.from_config(vc)
    assert gd.num_timesteps == vc.diffusion.num_timesteps
    assert _num_params(vc) > 0


# ---- DDPM (Ho et al. 2020) ---------------------------------------------------------------------

def test_cifar10_ddpm_vlb_is_cifar10_ddpm_trained_on_the_bound():
  vlb, simple = _load("cifar10_ddpm_vlb"), _load("cifar10_ddpm")
  assert vlb.diffusion.loss_type == "kl"  # Table 1/2: "L, fixed isotropic Sigma"
  assert vlb.diffusion.model_var_type in ("fixed_large", "fixed_small")
  assert vlb.diffusion.model_mean_type == "eps"
  flat_vlb, flat_simple = _flatten(vlb.to_dict()), _flatten(simple.to_dict())
  differ = {k for k in flat_simple if flat_vlb[k] != flat_simple[k]}
  assert differ <= {"diffusion.loss_type", "diffusion.model_var_type"}
  # Appendix B: "Our CIFAR10 model has 35.7 million parameters".
  assert round(_num_params(vlb) / 1e6, 1) == 35.7


# ---- Improved DDPM (Nichol & Dhariwal 2021) ----------------------------------------------------

def _improved_diffusion_unet_params(image_size, in_channels, model_channels, out_channels,
                                    num_res_blocks, attention_resolutions, channel_mult,
                                    use_scale_shift_norm, conv_resample=True):
  """Parameter count of improved-diffusion's UNetModel, following its constructor.

  openai/improved-diffusion, improved_diffusion/unet.py and script_util.py (create_model):
  attention_resolutions are feature-map sizes, turned into downsample rates image_size // res.
  """
  conv = lambda cin, cout, k: k * k * cin * cout + cout
  linear = lambda cin, cout: cin * cout + cout
  norm = lambda c: 2 * c  # GroupNorm scale and bias
  emb = 4 * model_channels

  def res_block(cin, cout):
    n = norm(cin) + conv(cin, cout, 3)
    n += linear(emb, 2 * cout if use_scale_shift_norm else cout)
    n += norm(cout) + conv(cout, cout, 3)
    return n + (0 if cin == cout else conv(cin, cout, 1))

  def attention(c):
    return norm(c) + linear(c, 3 * c) + linear(c, c)  # qkv and proj_out 1x1 convs

  attention_ds = {image_size // r for r in attention_resolutions}
  total = linear(model_channels, emb) + linear(emb, emb)
  total += conv(in_channels, model_channels, 3)
  chans, ch, ds = [model_channels], model_channels, 1
  for level, mult in enumerate(channel_mult):
    for _ in range(num_res_blocks):
      total += res_block(ch, mult * model_channels)
      ch = mult * model_channels
      total += attention(ch) if ds in attention_ds else 0
      chans.append(ch)
    if level != len(channel_mult) - 1:
      total += conv(ch, ch, 3) if conv_resample else 0
      chans.append(ch)
      ds *= 2
  total += 2 * res_block(ch, ch) + attention(ch)
  for level, mult in list(enumerate(channel_mult))[::-1]:
    for i in range(num_res_blocks + 1):
      total += res_block(ch + chans.pop(), model_channels * mult)
      ch = model_channels * mult
      total += attention(ch) if ds in attention_ds else 0
      if level and i == num_res_blocks:
        total += conv(ch, ch, 3) if conv_resample else 0
        ds //= 2
  return total + norm(ch) + conv(model_channels, out_channels, 3)


def test_improved_diffusion_count_reproduces_the_ddpm_unet():
  # The counting function above, checked on a model whose count is published: with DDPM's
  # CIFAR-10 settings (one head, no scale-shift, 2 blocks, attention at 16) it is 35.7M.
  n = _improved_diffusion_unet_params(32, 3, 128, 3, 2, (16,), (1, 2, 2, 2), False)
  assert n == _num_params(_load("cifar10_ddpm"))
  assert round(n / 1e6, 1) == 35.7


def _check_improved_common(config):
  d, m, t, o = config.diffusion, config.model, config.training, config.optim
  # improved-diffusion README flags: --diffusion_steps 4000 --noise_schedule cosine
  # --learn_sigma True --num_channels 128 --num_res_blocks 3 --lr 1e-4 --batch_size 128.
  assert (d.num_timesteps, d.beta_schedule, d.model_var_type) == (4000, "cosine", "learned_range")
  assert (d.loss_type, d.hybrid_lambda, d.model_mean_type) == ("hybrid", 0.001, "eps")
  assert (m.ch, m.num_res_blocks) == (128, 3)
  assert (o.lr, t.batch_size) == (1e-4, 128)
  # script_util defaults: 4 heads, attention_resolutions "16,8", use_scale_shift_norm True.
  assert (m.num_heads, m.num_head_channels, tuple(m.attn_resolutions)) == (4, -1, (16, 8))
  assert m.use_scale_shift_norm and m.resamp_with_conv and not m.resblock_updown
  # train_util: AdamW(weight_decay=0), no warm-up, no clipping, EMA 0.9999, fp32; no flips.
  assert o.optimizer in ("adam", "adamw") and o.weight_decay == 0.0
  assert (o.warmup, o.grad_clip, o.schedule) == (0, 0.0, "constant")
  assert (t.ema_decay, t.ema_warmup, t.compute_dtype) == (0.9999, False, "float32")
  assert not config.data.random_flip and config.data.num_classes == 0
  # The L_vlb models of the README: --use_kl True --schedule_sampler loss-second-moment.
  vlb = sweep.variant_config(config, "l_vlb")
  assert (vlb.diffusion.loss_type, vlb.diffusion.timestep_sampler) == ("kl", "loss_aware")
  assert vlb.diffusion.model_var_type == "learned_range"


def _check_improved_param_count(config):
  m = config.model
  assert _num_params(config) == _improved_diffusion_unet_params(
      config.data.image_size, config.data.channels, m.ch, 2 * config.data.channels,
      m.num_res_blocks, tuple(m.attn_resolutions), tuple(m.ch_mult), m.use_scale_shift_norm)


def test_cifar10_improved_hyperparameters():
  config = _load("cifar10_improved")
  _check_improved_common(config)
  assert (config.data.dataset, config.data.image_size, config.data.channels) == ("cifar10", 32, 3)
  assert tuple(config.model.ch_mult) == (1, 2, 2, 2)  # script_util for image_size 32
  assert config.model.dropout == 0.3  # README: --dropout 0.3
  assert config.training.num_train_steps == 500_000  # checkpoint cifar10_uncond_50M_500K
  _check_improved_param_count(config)


def test_cifar10_improved_ablation_variants():
  config = _load("cifar10_improved")
  get = lambda name: sweep.variant_config(config, name).diffusion
  assert get("linear_schedule").beta_schedule == "linear"
  assert (get("l_simple").loss_type, get("l_simple").model_var_type) == ("mse", "fixed_large")
  assert get("T1000").num_timesteps == 1000
  assert get("v_prediction").model_mean_type == "v"
  assert not _flatten(config.variants["baseline"].to_dict())
  # learned_range vs fixed variance changes only the output convolution's width.
  extra = 9 * config.model.ch * config.data.channels + config.data.channels
  assert _num_params(config) == _num_params(sweep.variant_config(config, "l_simple")) + extra


def test_imagenet64_improved_hyperparameters():
  config = _load("imagenet64_improved")
  _check_improved_common(config)
  assert (config.data.dataset, config.data.image_size, config.data.channels) == (
      "downsampled_imagenet/64x64", 64, 3)
  assert tuple(config.model.ch_mult) == (1, 2, 3, 4)  # script_util for image_size 64
  assert config.model.dropout == 0.0
  assert config.training.num_train_steps == 1_500_000  # imagenet64_uncond_100M_1500K
  _check_improved_param_count(config)


# ---- Small configs ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,dataset", [("mnist", "mnist"), ("fashion_mnist", "fashion_mnist")])
def test_small_grey_configs(name, dataset):
  config = _load(name)
  assert config.data.dataset == dataset
  assert (config.data.image_size, config.data.channels) == (32, 1)
  assert config.diffusion.num_timesteps == 1000
  assert 2_000_000 <= _num_params(config) <= 6_000_000
  assert "baseline" in sweep.variant_names(config)
  cond = sweep.variant_config(config, "class_conditional")
  assert cond.data.num_classes == 10 and cond.model.class_dropout > 0


def test_fashion_mnist_is_mnist_with_other_data():
  a, b = _flatten(_load("mnist").to_dict()), _flatten(_load("fashion_mnist").to_dict())
  assert {k for k in a if a[k] != b[k]} == {"data.dataset", "data.random_flip"}
