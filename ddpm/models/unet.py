"""The DDPM U-Net (Ho et al. 2020, App. B) in Flax linen, with the Improved-DDPM / ADM options.

With the default options this is the architecture of the official TF code
(hojonathanho/diffusion, diffusion_tf/models/unet.py): a PixelCNN++-style U-Net of wide
residual blocks with GroupNorm, swish, a sinusoidal timestep embedding added in every residual
block, and single-head self-attention at chosen resolutions and in the middle. Parameter names
mirror the TF variable scopes (TF model/down_0/block_0/conv1/W is down_0_block_0/conv1/kernel
here), so the released checkpoints can be mapped by name. The CIFAR-10 model (ch=128,
ch_mult=(1, 2, 2, 2)) has exactly the TF model's 35,746,307 parameters and the 256x256 model
(ch_mult=(1, 1, 2, 2, 4, 4)) its 113,673,219. GroupNorm uses 32 groups as in DDPM, fewer only
in layers narrower than 64 channels (see `num_groups`), or `norm_groups` in every layer. The
same network is diffusers' UNet2DModel with the DDPM releases' settings, output for output
(ddpm/pretrained/diffusers_format.py; tests/test_pretrained.py).

Options from Nichol & Dhariwal 2021 (Improved DDPM) and Dhariwal & Nichol 2021 (ADM):
multi-head attention (`num_heads` / `num_head_channels`), adaptive GroupNorm
(`use_scale_shift_norm`), residual blocks that resample (`resblock_updown`), a learned variance
(`learn_sigma` doubles the output channels) and class conditioning with a "null" label for
classifier-free guidance (Ho & Salimans 2022). `dtype` sets the computation dtype (parameters
stay float32) and `remat` rematerialises the residual blocks in the backward pass.

The layers are stock Flax (nn.Conv, nn.Dense, nn.GroupNorm) on every platform; on CPU,
`ddpm.models.build_model` swaps their primitives for the XLA:CPU kernels of
`ddpm.models.cpu_ops` (`layers`), with the same parameters and values.

Images are NHWC. All modules are pure: dropout draws from the 'dropout' RNG stream.
"""
import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


def default_init(scale: float = 1.0):
  """The DDPM TF code's initialiser: variance scaling, fan_avg, uniform.

  A scale of 0 means 1e-10 (as in the TF code): the layers that end a residual branch start
  (almost) at zero, so every residual block starts as the identity and the network's output
  starts at ~0.
  """
  return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


TIMESTEP_EMBEDDINGS = ("ddpm", "adm")


def timestep_embedding(timesteps: Array, dim: int, max_period: float = 10000.0,
                       kind: str = "ddpm") -> Array:
  """Sinusoidal timestep embedding, the tensor2tensor variant of the Transformer encoding
  (Vaswani et al. 2017, Sec. 3.5), as in the DDPM TF code (`nn.get_timestep_embedding`) or in
  improved-diffusion / ADM (`nn.timestep_embedding`).

  Frequencies are geometric from 1 towards 1/max_period over dim // 2 channels:
    kind 'ddpm': freq_i = exp(-log(max_period) * i / (dim // 2 - 1)), [sin(t freq), cos(t freq)];
    kind 'adm':  freq_i = exp(-log(max_period) * i / (dim // 2)),     [cos(t freq), sin(t freq)];
  i = 0 .. dim // 2 - 1, zero-padded by one channel when dim is odd.

  Args:
    timesteps: [B] integer or float timesteps.
    dim: embedding width, >= 4.
    max_period: the slowest period.
    kind: 'ddpm' or 'adm'.
  Returns:
    [B, dim] float32.
  """
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must have shape [B], got shape {timesteps.shape}")
  if dim < 4:
    raise ValueError(f"timestep embedding dim must be >= 4, got {dim}")
  if kind not in TIMESTEP_EMBEDDINGS:
    raise ValueError(f"timestep embedding kind must be one of {TIMESTEP_EMBEDDINGS}, got {kind!r}")
  half = dim // 2
  denominator = half - 1 if kind == "ddpm" else half
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / denominator)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  waves = [jnp.sin(args), jnp.cos(args)]
  emb = jnp.concatenate(waves if kind == "ddpm" else waves[::-1], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def num_groups(channels: int) -> int:
  """GroupNorm groups: 32 as in DDPM, fewer for narrow layers.

  The largest divisor of `channels` that is at most min(32, channels // 2), so every group has
  at least two channels. Every DDPM/ADM layer (>= 64 channels, multiples of 32) gets exactly 32
  groups. Narrow models need the two-channel minimum: the embedding is added to h right before
  norm2 as a per-channel constant, and a one-channel group (instance norm) subtracts it again,
  which would silently cut the timestep and label conditioning out of that block.
  """
  if channels < 1:
    raise ValueError(f"GroupNorm needs at least one channel, got {channels}")
  limit = max(1, min(32, channels // 2))
  return max(g for g in range(1, limit + 1) if channels % g == 0)


@dataclasses.dataclass(frozen=True)
class Layers:
  """The primitives the U-Net's layers compute with: stock Flax / lax by default.

  On CPU, `ddpm.models.build_model` passes `ddpm.models.cpu_ops.LAYERS` instead: the same
  parameters and values, computed in forms XLA:CPU runs faster. The methods build the DDPM
  layers (initialisers, padding, GroupNorm(32)) from these primitives.
  """
  conv_general_dilated: Callable = jax.lax.conv_general_dilated  # for nn.Conv
  dot_general: Callable = jax.lax.dot_general                    # for nn.Dense
  group_norm: Callable[..., nn.Module] = nn.GroupNorm            # takes nn.GroupNorm's arguments

  def conv(self, features: int, dtype: Dtype, name: str, *, kernel: int = 3, stride: int = 1,
           init_scale: float = 1.0, padding: Any = "SAME") -> nn.Conv:
    # 'SAME' padding follows TF's convention (for stride 2 on even sizes: pad 0 before, 1 after),
    # as the official model did.
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   kernel_init=default_init(init_scale), dtype=dtype, param_dtype=jnp.float32,
                   conv_general_dilated=self.conv_general_dilated, name=name)

  def dense(self, features: int, dtype: Dtype, name: str, init_scale: float = 1.0) -> nn.Dense:
    # Also the DDPM "NIN" layer (a 1x1 convolution): Dense acts on the last (channel) axis.
    return nn.Dense(features, kernel_init=default_init(init_scale), dtype=dtype,
                    param_dtype=jnp.float32, dot_general=self.dot_general, name=name)

  def norm(self, channels: int, dtype: Dtype, name: str, epsilon: float = 1e-6,
           groups: int = 0) -> nn.Module:
    """GroupNorm(32) as in DDPM (see `num_groups` for narrow models), or `groups` groups if > 0;
    epsilon 1e-6 as in TF (torch's default, improved-diffusion's, is 1e-5)."""
    return self.group_norm(num_groups=groups if groups > 0 else num_groups(channels),
                           epsilon=epsilon, dtype=dtype, name=name)


STOCK_LAYERS = Layers()


def upsample_nearest(x: Array) -> Array:
  """Nearest-neighbour 2x upsampling. x: [B, H, W, C] -> [B, 2H, 2W, C].

  A broadcast and a reshape (its gradient a sum over 2x2 blocks): the values of
  jax.image.resize(method='nearest'), whose gather and scatter-add gradient XLA:CPU ran slower.
  """
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(
      b, 2 * h, 2 * w, c)


def downsample_avg(x: Array) -> Array:
  """2x2 average pooling, stride 2. x: [B, H, W, C] -> [B, H/2, W/2, C]."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


DOWNSAMPLE_PADDINGS = {"same": "SAME", "symmetric": ((1, 1), (1, 1))}


class Downsample(nn.Module):
  """Halves the resolution: stride-2 3x3 conv (DDPM) or 2x2 average pooling.

  The conv's `padding`: 'same' is TF's SAME (on even sizes 0 rows before, 1 after: output i
  sees input rows 2i .. 2i+2), as in DDPM; 'symmetric' pads 1 on each side (torch's padding=1:
  rows 2i-1 .. 2i+1), as in improved-diffusion.
  """
  with_conv: bool
  dtype: Dtype = jnp.float32
  layers: Layers = STOCK_LAYERS
  padding: str = "same"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> [B, H/2, W/2, C]."""
    if self.with_conv:
      if self.padding not in DOWNSAMPLE_PADDINGS:
        raise ValueError(f"Downsample padding must be one of {tuple(DOWNSAMPLE_PADDINGS)}, got "
                         f"{self.padding!r}")
      return self.layers.conv(x.shape[-1], self.dtype, "conv", stride=2,
                              padding=DOWNSAMPLE_PADDINGS[self.padding])(x)
    return downsample_avg(x)


class Upsample(nn.Module):
  """Doubles the resolution: nearest neighbour, then (optionally) a 3x3 conv."""
  with_conv: bool
  dtype: Dtype = jnp.float32
  layers: Layers = STOCK_LAYERS

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> [B, 2H, 2W, C]."""
    x = upsample_nearest(x)
    if self.with_conv:
      x = self.layers.conv(x.shape[-1], self.dtype, "conv")(x)
    return x


class ResBlock(nn.Module):
  """Wide residual block with the timestep (+ label) embedding added after the first conv.

  DDPM: h = conv1(swish(norm1(x))) + dense(swish(emb)); h = conv2(dropout(swish(norm2(h))));
  out = shortcut(x) + h, with conv2 initialised at ~0 and a 1x1 "NIN" shortcut when the channel
  count changes. With `use_scale_shift_norm` (ADM) the embedding instead modulates the second
  norm, norm2(h) * (1 + scale) + shift. With `resample` ('up' | 'down', ADM's resblock_updown)
  the block also changes resolution, resampling both branches after the first norm.
  """
  out_ch: int
  dropout: float = 0.0
  deterministic: bool = True
  use_scale_shift_norm: bool = False
  resample: Optional[str] = None
  norm_groups: int = 0
  dtype: Dtype = jnp.float32
  layers: Layers = STOCK_LAYERS
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array, emb: Array) -> Array:
    """x: [B, H, W, C], emb: [B, E] -> [B, H', W', out_ch] (H' = 2H / H/2 when resampling)."""
    if self.resample not in (None, "up", "down"):
      raise ValueError(f"ResBlock resample must be None, 'up' or 'down', got {self.resample!r}")
    h = nn.swish(self.layers.norm(x.shape[-1], self.dtype, "norm1", self.norm_eps,
                                  self.norm_groups)(x))
    if self.resample is not None:
      resample = upsample_nearest if self.resample == "up" else downsample_avg
      h, x = resample(h), resample(x)
    h = self.layers.conv(self.out_ch, self.dtype, "conv1")(h)

    emb_ch = 2 * self.out_ch if self.use_scale_shift_norm else self.out_ch
    emb_out = self.layers.dense(emb_ch, self.dtype, "temb_proj")(nn.swish(emb))
    emb_out = emb_out[:, None, None, :]
    norm2 = self.layers.norm(self.out_ch, self.dtype, "norm2", self.norm_eps, self.norm_groups)
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = nn.swish(norm2(h) * (1 + scale) + shift)
    else:
      h = nn.swish(norm2(h + emb_out))
    h = nn.Dropout(rate=self.dropout)(h, deterministic=self.deterministic)
    h = self.layers.conv(self.out_ch, self.dtype, "conv2", init_scale=0.0)(h)

    if x.shape[-1] != self.out_ch:
      x = self.layers.dense(self.out_ch, self.dtype, "nin_shortcut")(x)
    return x + h


# Recomputes the block's activations in the backward pass instead of storing them. Train/eval
# mode is the `deterministic` attribute, not an argument, so no static_argnums are needed.
_RematResBlock = nn.remat(ResBlock)


class AttnBlock(nn.Module):
  """Self-attention over all H*W positions, residual, with ~zero-initialised output projection.

  q, k, v and proj_out are 1x1 ("NIN") dense layers as in DDPM; with one head this is exactly
  the DDPM block (softmax(q k^T / sqrt(C)) v). Heads split the channels (ADM): `num_heads`
  heads, or C // num_head_channels heads when num_head_channels > 0.
  """
  num_heads: int = 1
  num_head_channels: int = -1
  norm_groups: int = 0
  dtype: Dtype = jnp.float32
  layers: Layers = STOCK_LAYERS
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    b, height, width, c = x.shape
    if self.num_head_channels > 0:
      if c % self.num_head_channels:
        raise ValueError(f"num_head_channels={self.num_head_channels} does not divide the {c} "
                         "channels of an attention block")
      heads = c // self.num_head_channels
    else:
      heads = self.num_heads
      if heads < 1 or c % heads:
        raise ValueError(f"num_heads={heads} must be >= 1 and divide the {c} channels of an "
                         "attention block")
    h = self.layers.norm(c, self.dtype, "norm", self.norm_eps, self.norm_groups)(x)
    split = lambda a: a.reshape(b, height * width, heads, c // heads)
    q = split(self.layers.dense(c, self.dtype, "q")(h))
    k = split(self.layers.dense(c, self.dtype, "k")(h))
    v = split(self.layers.dense(c, self.dtype, "v")(h))
    # Logits and softmax are computed in float32 also for bfloat16 inputs; scale 1/sqrt(C/heads).
    h = jax.nn.dot_product_attention(q, k, v).reshape(b, height, width, c)
    h = self.layers.dense(c, self.dtype, "proj_out", init_scale=0.0)(h)
    return x + h


class UNet(nn.Module):
  """The DDPM U-Net, eps (or x0 / v) predictor of a diffusion model.

  Attributes:
    ch: base channel count (128 in DDPM).
    out_ch: output channels (the image channels); doubled when `learn_sigma`.
    ch_mult: channel multiplier per resolution level; len(ch_mult) - 1 downsamplings.
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attn_resolutions: resolutions (feature-map height in pixels, e.g. (16,)) with
      self-attention after each residual block there.
    dropout: dropout rate inside the residual blocks (DDPM CIFAR-10: 0.1).
    resamp_with_conv: stride-2 conv / conv after nearest upsampling (else avg pool / nearest).
    num_heads: attention heads (when num_head_channels <= 0).
    num_head_channels: > 0: channels per head, overriding num_heads (ADM).
    use_scale_shift_norm: the embedding scales and shifts the second norm (ADM's AdaGN).
    resblock_updown: resample with residual blocks instead of Downsample / Upsample (ADM).
    learn_sigma: also output the variance interpolation v (Improved DDPM): 2 * out_ch channels.
    num_classes: > 0: class-conditional; the label table has num_classes + 1 rows, the last
      (label num_classes) being the "null" label of classifier-free guidance.
    norm_groups: > 0: this many groups in every GroupNorm (diffusers' norm_num_groups); 0: 32,
      fewer in narrow layers (`num_groups`).
    dtype: computation dtype (e.g. jnp.bfloat16); parameters are always float32 and the
      output is float32.
    remat: rematerialise (nn.remat) the residual blocks, trading compute for memory.
    layers: the primitives of the layers (`Layers`): stock by default, the XLA:CPU kernels of
      `cpu_ops.LAYERS` when build_model picks them. Parameters and values do not depend on it.
    timestep_scale: the network embeds t * timestep_scale (improved-diffusion's
      rescale_timesteps is 1000 / T: every T looks like 1000 steps to the network).
    timestep_embedding_kind: 'ddpm' or 'adm' (see `timestep_embedding`).
    norm_eps: GroupNorm epsilon (1e-6 in DDPM's TF code, torch's 1e-5 in improved-diffusion).
    downsample_padding: 'same' (TF, DDPM) or 'symmetric' (torch, improved-diffusion); see
      `Downsample`.
  """
  ch: int
  out_ch: int
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  resamp_with_conv: bool = True
  num_heads: int = 1
  num_head_channels: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  learn_sigma: bool = False
  num_classes: int = 0
  norm_groups: int = 0
  dtype: Dtype = jnp.float32
  remat: bool = False
  layers: Layers = STOCK_LAYERS
  timestep_scale: float = 1.0
  timestep_embedding_kind: str = "ddpm"
  norm_eps: float = 1e-6
  downsample_padding: str = "same"

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Optional[Array] = None,
               train: bool = False) -> Array:
    """Predicts the model output for noisy images x at timesteps t.

    Args:
      x: [B, H, W, C] float images (NHWC, in [-1, 1] scale).
      t: [B] timesteps (integer; float timesteps of a respaced model work too).
      y: [B] integer labels in [0, num_classes] (num_classes = the null label), or None
        (= the null label for a class-conditional model). Must be None when num_classes == 0.
      train: enables dropout (needs rngs={'dropout': key}).
    Returns:
      [B, H, W, out_ch] float32, or [B, H, W, 2 * out_ch] when learn_sigma
      (the first out_ch channels are the mean prediction, the rest the variance output).
    """
    x, t = jnp.asarray(x), jnp.asarray(t)
    y = None if y is None else jnp.asarray(y)
    self._check_inputs(x, t, y)
    batch = x.shape[0]
    num_levels = len(self.ch_mult)
    emb_dim = 4 * self.ch

    # Timestep embedding -> 2-layer MLP of width 4*ch (DDPM: temb/dense0, temb/dense1).
    emb = timestep_embedding(t.astype(jnp.float32) * self.timestep_scale, self.ch,
                             kind=self.timestep_embedding_kind)
    emb = self.layers.dense(emb_dim, self.dtype, "temb_dense0")(emb)
    emb = self.layers.dense(emb_dim, self.dtype, "temb_dense1")(nn.swish(emb))
    if self.num_classes > 0:
      # ADM adds a learned label embedding to the timestep embedding; row num_classes is the
      # "null" label used for unconditional predictions in classifier-free guidance.
      if y is None:
        y = jnp.full((batch,), self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, emb_dim, dtype=self.dtype,
                           param_dtype=jnp.float32, name="label_emb")(y)

    block_cls = _RematResBlock if self.remat else ResBlock

    def res_block(out_ch, name, resample=None):
      return block_cls(out_ch=out_ch, dropout=self.dropout, deterministic=not train,
                       use_scale_shift_norm=self.use_scale_shift_norm, resample=resample,
                       dtype=self.dtype, layers=self.layers, norm_eps=self.norm_eps,
                       norm_groups=self.norm_groups, name=name)

    def attn_block(name):
      return AttnBlock(num_heads=self.num_heads, num_head_channels=self.num_head_channels,
                       dtype=self.dtype, layers=self.layers, norm_eps=self.norm_eps,
                       norm_groups=self.norm_groups, name=name)

    # Downsampling path: every block output is kept for the skip connections.
    hs = [self.layers.conv(self.ch, self.dtype, "conv_in")(x.astype(self.dtype))]
    for level, mult in enumerate(self.ch_mult):
      for block in range(self.num_res_blocks):
        h = res_block(self.ch * mult, f"down_{level}_block_{block}")(hs[-1], emb)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(f"down_{level}_attn_{block}")(h)
        hs.append(h)
      if level != num_levels - 1:
        if self.resblock_updown:
          hs.append(res_block(hs[-1].shape[-1], f"down_{level}_downsample", "down")(hs[-1], emb))
        else:
          hs.append(Downsample(self.resamp_with_conv, self.dtype, self.layers,
                               self.downsample_padding, name=f"down_{level}_downsample")(hs[-1]))

    # Middle: block, attention, block.
    h = hs[-1]
    h = res_block(h.shape[-1], "mid_block_1")(h, emb)
    h = attn_block("mid_attn_1")(h)
    h = res_block(h.shape[-1], "mid_block_2")(h, emb)

    # Upsampling path: num_res_blocks + 1 blocks per level, each eating one skip connection.
    for level in reversed(range(num_levels)):
      for block in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = res_block(self.ch * self.ch_mult[level], f"up_{level}_block_{block}")(h, emb)
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(f"up_{level}_attn_{block}")(h)
      if level != 0:
        if self.resblock_updown:
          h = res_block(h.shape[-1], f"up_{level}_upsample", "up")(h, emb)
        else:
          h = Upsample(self.resamp_with_conv, self.dtype, self.layers,
                       name=f"up_{level}_upsample")(h)
    assert not hs, "every skip connection must be consumed"

    h = nn.swish(self.layers.norm(h.shape[-1], self.dtype, "norm_out", self.norm_eps,
                                  self.norm_groups)(h))
    out_ch = 2 * self.out_ch if self.learn_sigma else self.out_ch
    h = self.layers.conv(out_ch, self.dtype, "conv_out", init_scale=0.0)(h)
    return h.astype(jnp.float32)

  def _check_inputs(self, x, t, y):
    if x.ndim != 4:
      raise ValueError(f"x must be [B, H, W, C] (NHWC), got shape {x.shape}")
    batch, height, width, _ = x.shape
    factor = 2 ** (len(self.ch_mult) - 1)
    if height % factor or width % factor:
      raise ValueError(f"image size {height}x{width} is not divisible by {factor}, the "
                       f"U-Net's downsampling for ch_mult={tuple(self.ch_mult)}")
    if t.shape != (batch,):
      raise ValueError(f"t must have shape [B] = ({batch},), got shape {t.shape}")
    if y is not None:
      if self.num_classes <= 0:
        raise ValueError("labels y were given to an unconditional model (num_classes=0)")
      if y.shape != (batch,):
        raise ValueError(f"y must have shape [B] = ({batch},), got shape {y.shape}")
      if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must hold integer labels, got dtype {y.dtype}")
