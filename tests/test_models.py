"""Tests of the U-Net (ddpm/models): shapes, embedding, dropout, labels, dtypes, remat, init,
and the parameter counts of the paper's models (Ho et al. 2020, App. B)."""
import importlib
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm import config_validation
from ddpm.models import build_model, count_params
from ddpm.models.unet import AttnBlock, UNet, num_groups, timestep_embedding, upsample_nearest

NUM_CLASSES = 3


def _perturb(params, seed, scale=0.1):
  """Adds N(0, scale^2) noise to every parameter, so the ~zero-initialised layers are live.

  (numpy noise: eager jax.random per leaf shape would compile one kernel per shape.)
  """
  rng = np.random.RandomState(seed)
  return jax.tree.map(
      lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), params)


def _init_key(seed=0):
  # XLA:CPU compiles a threefry-keyed init of even a tiny U-Net in ~15 s (jax 0.10, partitionable
  # threefry); an rbg key compiles in ~3 s and draws from the same initialiser distributions.
  return jax.random.key(seed, impl="unsafe_rbg")


def _random_params(shapes, seed, scale=0.1):
  """Random parameters of the given shapes without compiling an init: GroupNorm scales
  1 + N(0, scale^2), everything else N(0, scale^2)."""
  def base_value(path, s):
    return (np.ones if path[-1].key == "scale" else np.zeros)(s.shape, s.dtype)
  return _perturb(jax.tree_util.tree_map_with_path(base_value, shapes), seed, scale)


@pytest.fixture(scope="module")
def base():
  """A tiny class-conditional model with dropout, its init params, perturbed params and inputs."""
  model = UNet(ch=16, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
               dropout=0.3, num_classes=NUM_CLASSES)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  t = jnp.array([3, 900], jnp.int32)
  variables = jax.jit(model.init)(_init_key(), x, t)
  live = {"params": _perturb(variables["params"], 2)}
  apply = jax.jit(model.apply, static_argnames=("train",))
  return dict(model=model, x=x, t=t, variables=variables, live=live, apply=apply)


# ---- shapes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,shape", [
    (dict(ch=8, ch_mult=(1,), attn_resolutions=()), (2, 8, 8, 1)),
    (dict(ch=8, ch_mult=(1, 2), attn_resolutions=(8,), learn_sigma=True), (2, 16, 16, 3)),
    (dict(ch=16, ch_mult=(1, 2, 2), attn_resolutions=(16,), resblock_updown=True,
          use_scale_shift_norm=True, num_head_channels=8), (1, 32, 32, 3)),
    (dict(ch=8, ch_mult=(1, 2, 4), attn_resolutions=(4,), resamp_with_conv=False,
          num_heads=2, learn_sigma=True), (2, 16, 16, 1)),
    (dict(ch=12, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(8,)), (1, 8, 16, 3)),
])
def test_output_shape_equals_input_shape(kwargs, shape):
  model = UNet(out_ch=shape[-1], **{"num_res_blocks": 1, **kwargs})
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
  out = jax.eval_shape(model.apply, variables, x, t)
  channels = 2 * shape[-1] if kwargs.get("learn_sigma") else shape[-1]
  assert out.shape == shape[:3] + (channels,)
  assert out.dtype == jnp.float32


def test_forward_runs_and_is_finite(base):
  out = base["apply"](base["live"], base["x"], base["t"])
  assert out.shape == base["x"].shape
  assert np.all(np.isfinite(out))


def test_upsample_is_nearest_neighbour():
  x = np.random.RandomState(0).randn(2, 3, 5, 4).astype(np.float32)
  np.testing.assert_array_equal(upsample_nearest(jnp.asarray(x)),
                                np.repeat(np.repeat(x, 2, axis=1), 2, axis=2))
  # Its gradient sums the cotangent over each 2x2 block.
  g = np.random.RandomState(1).randn(2, 6, 10, 4).astype(np.float32)
  _, vjp = jax.vjp(upsample_nearest, jnp.asarray(x))
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0], g.reshape(2, 3, 2, 5, 2, 4).sum((2, 4)),
                             rtol=1e-6, atol=1e-6)


# ---- timestep embedding ------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [16, 17, 128])
def test_timestep_embedding_matches_sinusoid_formula(dim):
  t = np.array([0, 1, 7, 250, 999])
  half = dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half, dtype=np.float64) / (half - 1))
  args = t[:, None].astype(np.float64) * freqs[None]
  expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
  if dim % 2:
    expected = np.pad(expected, ((0, 0), (0, 1)))
  got = timestep_embedding(jnp.asarray(t, jnp.int32), dim)
  assert got.shape == (5, dim) and got.dtype == jnp.float32
  # float32 arguments up to ~1000 rad: absolute error ~ 1000 * 2^-24 per rounding step.
  np.testing.assert_allclose(got, expected, atol=3e-4)


def test_timestep_embedding_rejects_bad_input():
  with pytest.raises(ValueError, match="shape"):
    timestep_embedding(jnp.zeros((2, 1)), 16)
  with pytest.raises(ValueError, match="dim"):
    timestep_embedding(jnp.zeros((2,)), 2)


def test_timestep_changes_output(base):
  v, x = base["live"], base["x"]
  y = jnp.array([0, 1])
  out_a = base["apply"](v, x, jnp.array([3, 900]), y)
  out_b = base["apply"](v, x, jnp.array([4, 100]), y)
  assert np.abs(out_a - out_b)[0].max() > 1e-3 and np.abs(out_a - out_b)[1].max() > 1e-3


@pytest.mark.parametrize("channels", [2, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 384, 512, 768])
def test_group_norm_groups(channels):
  g = num_groups(channels)
  assert channels % g == 0
  if channels % 32 == 0 and channels >= 64:
    assert g == 32  # DDPM's GroupNorm(32) for every layer of the paper's models
  else:
    # At least two channels per group: a one-channel group would subtract the per-channel
    # timestep embedding added right before it.
    assert channels // g >= 2 and g <= 32


# ---- dropout -----------------------------------------------------------------------------------

def test_dropout_only_when_training(base):
  apply, v, x, t = base["apply"], base["live"], base["x"], base["t"]
  k1, k2 = jax.random.key(10), jax.random.key(11)
  # train=False draws no randomness: no dropout key is needed (Flax raises if one is drawn).
  eval_out = apply(v, x, t)
  np.testing.assert_array_equal(eval_out, apply(v, x, t))
  train_1 = apply(v, x, t, train=True, rngs={"dropout": k1})
  train_1b = apply(v, x, t, train=True, rngs={"dropout": k1})
  train_2 = apply(v, x, t, train=True, rngs={"dropout": k2})
  np.testing.assert_array_equal(train_1, train_1b)
  assert np.abs(train_1 - train_2).max() > 1e-3
  assert np.abs(train_1 - eval_out).max() > 1e-3


# ---- class labels ------------------------------------------------------------------------------

def test_class_label_changes_output_and_null_label(base):
  apply, v, x, t = base["apply"], base["live"], base["x"], base["t"]
  table = v["params"]["label_emb"]["embedding"]
  assert table.shape == (NUM_CLASSES + 1, 4 * base["model"].ch)  # + the null label
  out0 = apply(v, x, t, jnp.array([0, 0]))
  out1 = apply(v, x, t, jnp.array([1, 1]))
  null = apply(v, x, t, jnp.array([NUM_CLASSES, NUM_CLASSES]))
  unlabeled = apply(v, x, t, None)
  assert np.abs(out0 - out1).max() > 1e-3
  assert np.abs(out0 - null).max() > 1e-3
  np.testing.assert_allclose(unlabeled, null, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_clear_errors(base):
  model, v, x, t = base["model"], base["variables"], base["x"], base["t"]
  with pytest.raises(ValueError, match="t must have shape"):
    model.apply(v, x, t[:1])
  with pytest.raises(ValueError, match="NHWC"):
    model.apply(v, x[0], t)
  with pytest.raises(ValueError, match="not divisible by 2"):
    model.apply(v, jnp.zeros((2, 15, 15, 3)), t)
  with pytest.raises(ValueError, match="integer labels"):
    model.apply(v, x, t, jnp.zeros((2,), jnp.float32))
  uncond = UNet(ch=8, out_ch=3, ch_mult=(1,), attn_resolutions=())
  xs = jnp.zeros((2, 8, 8, 3))
  uv = jax.eval_shape(uncond.init, jax.random.key(0), xs, t)
  with pytest.raises(ValueError, match="unconditional"):
    jax.eval_shape(uncond.apply, uv, xs, t, jnp.array([0, 1]))
  bad_heads = UNet(ch=8, out_ch=3, ch_mult=(1,), attn_resolutions=(8,), num_head_channels=3)
  with pytest.raises(ValueError, match="num_head_channels=3"):
    jax.eval_shape(bad_heads.init, jax.random.key(0), xs, t)


# ---- dtypes ------------------------------------------------------------------------------------

def test_bfloat16_compute_keeps_float32_params(base):
  model = base["model"].clone(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, jax.random.key(0), base["x"], base["t"])
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  v, x, t = base["live"], base["x"], base["t"]
  out_bf16 = jax.jit(model.apply)(v, x, t)
  out_f32 = base["apply"](v, x, t)
  assert out_bf16.dtype == jnp.float32
  # bfloat16 has an 8-bit mantissa: agree to a few percent of the output's scale.
  assert np.abs(out_bf16 - out_f32).max() < 0.05 * np.abs(out_f32).max()


# ---- remat -------------------------------------------------------------------------------------

def test_remat_same_output_and_gradients():
  kwargs = dict(ch=8, out_ch=1, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,),
                dropout=0.2)
  plain, remat = UNet(**kwargs), UNet(remat=True, **kwargs)
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
  t = jnp.array([5, 500])
  shapes = jax.eval_shape(plain.init, jax.random.key(0), x, t)["params"]
  # Same parameter tree, so checkpoints are interchangeable between remat and no remat.
  assert jax.eval_shape(remat.init, jax.random.key(0), x, t)["params"] == shapes
  params = _random_params(shapes, seed=4)
  rngs = {"dropout": jax.random.key(5)}  # dropout on: the recomputation must redraw the same mask

  def loss_and_grad(model):
    def loss(p):
      out = model.apply({"params": p}, x, t, train=True, rngs=rngs)
      return jnp.mean(out ** 2), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (l1, o1), g1 = loss_and_grad(plain)
  (l2, o2), g2 = loss_and_grad(remat)
  np.testing.assert_allclose(o1, o2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


# ---- initialisation ----------------------------------------------------------------------------

def _fan_avg_bound(kernel, scale):
  """Closed-form bound of variance_scaling(scale, 'fan_avg', 'uniform') for a kernel."""
  receptive = math.prod(kernel.shape[:-2])
  fan_avg = (kernel.shape[-2] + kernel.shape[-1]) * receptive / 2
  return math.sqrt(3 * scale / fan_avg)


def test_ddpm_initialisation_and_zero_output_at_init(base):
  params = base["variables"]["params"]
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  zero_init = [k for k in flat if k.endswith("kernel") and
               k.split("/")[-2] in ("conv2", "proj_out", "conv_out")]
  assert "conv_out/kernel" in zero_init and "mid_attn_1/proj_out/kernel" in zero_init
  for name in zero_init:  # DDPM's init_scale=0 layers: variance scale 1e-10
    assert np.abs(flat[name]).max() <= _fan_avg_bound(flat[name], 1e-10), name
  for name, value in flat.items():
    if name.endswith("bias") and "norm" not in name:
      np.testing.assert_array_equal(value, 0.0, err_msg=name)
  kernel = flat["down_0_block_0/conv1/kernel"]  # 3x3x16x16: a regular scale-1 layer
  bound = _fan_avg_bound(kernel, 1.0)
  assert np.abs(kernel).max() <= bound
  np.testing.assert_allclose(np.var(kernel), bound ** 2 / 3, rtol=0.15)  # Var U(-b, b) = b^2/3
  out = base["apply"](base["variables"], base["x"], base["t"])
  assert np.abs(out).max() < 1e-3  # every residual branch and the output start at ~0


# ---- jit ---------------------------------------------------------------------------------------

def test_model_jits_once_per_shape(base):
  """No Python control flow on traced values: new x, t and y values reuse the compiled call."""
  apply, v = base["apply"], base["live"]
  apply(v, base["x"], base["t"], jnp.array([0, 1]))
  compiled = apply._cache_size()
  for seed in range(3):
    x = jax.random.normal(jax.random.key(seed), base["x"].shape)
    t = jax.random.randint(jax.random.key(seed), (2,), 0, 1000)
    y = jax.random.randint(jax.random.key(seed), (2,), 0, NUM_CLASSES + 1)
    out = apply(v, x, t, y)
    assert out.shape == x.shape and np.all(np.isfinite(out))
  assert apply._cache_size() == compiled


# ---- attention against an independent float64 computation --------------------------------------

@pytest.mark.parametrize("heads", [1, 2])
def test_attention_block_matches_numpy(heads):
  block = AttnBlock(num_heads=heads)
  x = np.random.RandomState(0).randn(2, 4, 4, 16).astype(np.float32)
  shapes = jax.eval_shape(block.init, jax.random.key(0), jnp.asarray(x))["params"]
  params = _random_params(shapes, seed=1, scale=0.3)
  got = block.apply({"params": params}, jnp.asarray(x))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b, hgt, wid, c = x.shape
  xd = x.astype(np.float64)
  groups = 8  # 16 channels: two per group (see test_group_norm_groups)
  g = xd.reshape(b, hgt * wid, groups, c // groups)
  mean, var = g.mean(axis=(1, 3), keepdims=True), g.var(axis=(1, 3), keepdims=True)
  h = ((g - mean) / np.sqrt(var + 1e-6)).reshape(b, hgt * wid, c)
  h = h * p["norm"]["scale"] + p["norm"]["bias"]
  q, k, v = (h @ p[n]["kernel"] + p[n]["bias"] for n in ("q", "k", "v"))
  d = c // heads
  q, k, v = (a.reshape(b, hgt * wid, heads, d).transpose(0, 2, 1, 3) for a in (q, k, v))
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  a = (w @ v).transpose(0, 2, 1, 3).reshape(b, hgt * wid, c)
  expected = xd + (a @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]).reshape(x.shape)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ---- build_model and the paper configs ---------------------------------------------------------

def _load(name):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name,expected", [
    ("cifar10_ddpm", 35_746_307),           # the official TF model; the paper's "35.7M"
    ("celebahq256_ddpm", 113_673_219),      # the paper's "114M"
    ("lsun_church256_ddpm", 113_673_219),
    ("lsun_bedroom256_ddpm", 113_673_219),
])
def test_paper_configs_parameter_counts(name, expected):
  config = config_validation.validate_config(_load(name), num_devices=8)
  model = build_model(config)
  assert count_params(model, config.data.image_size, config.data.channels) == expected
  # A learned variance only widens conv_out (3x3 kernel from ch channels, plus biases).
  config.diffusion.model_var_type = "learned_range"
  extra = 9 * config.model.ch * config.data.channels + config.data.channels
  assert count_params(build_model(config), config.data.image_size,
                      config.data.channels) == expected + extra


def test_count_params_matches_real_init(base):
  real = sum(a.size for a in jax.tree.leaves(base["variables"]["params"]))
  assert count_params(base["model"], 16, 3) == real


def test_build_model_reads_the_config():
  config = _load("tiny")
  config.data.channels = 3
  config.data.num_classes = 5
  config.diffusion.model_var_type = "learned"
  config.training.compute_dtype = "bfloat16"
  config.model.num_head_channels = 8
  config.model.use_scale_shift_norm = True
  config.model.remat = True
  config_validation.validate_config(config)
  model = build_model(config)
  assert (model.ch, model.out_ch, model.ch_mult, model.attn_resolutions) == (
      config.model.ch, 3, tuple(config.model.ch_mult), tuple(config.model.attn_resolutions))
  assert model.learn_sigma and model.num_classes == 5 and model.dtype == jnp.bfloat16
  assert model.num_head_channels == 8 and model.use_scale_shift_norm and model.remat
  config.diffusion.model_var_type = "fixed_small"
  assert not build_model(config).learn_sigma
  config.model.name = "transformer"
  with pytest.raises(ValueError, match="transformer"):
    build_model(config)
