"""The FID Inception-v3 in Flax: pool3 features (FID) and 1008-way logits (IS), and its weights.

This is the network of the TF graph `inception-2015-12-05` that the original FID code (Heusel et
al. 2017, TTUR) and Inception Score code (Salimans et al. 2016) use, in the layout of pytorch-fid's
`fid_inception_v3()`: torchvision's Inception-v3 with 1008 classes, no auxiliary head, and the
graph's quirks patched in (`FIDInceptionA/C/E_1/E_2`):
  * average pools in the Inception blocks ignore the zero padding (`count_include_pad=False`),
  * the last block (Mixed_7c) pools its fourth branch with a *max* pool instead of an average pool.
Module names equal the PyTorch state_dict names, so 'Mixed_6b.branch7x7_2.conv.weight' loads into
`params['Mixed_6b']['branch7x7_2']['conv']['kernel']`.

Weights: `get_weights_path()` finds (or downloads once) pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`; `load_params()` reads it, or the `.npz` made from it by
scripts/convert_inception_weights.py, into Flax variables. Random weights are never substituted.

Images are NHWC, uint8 in [0, 255] or float in [-1, 1], any size and 1 or 3 channels.
"""
import functools
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# What scripts/convert_inception_weights.py writes by default; looked for first in the cache.
CONVERTED_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.npz"
# The file name carries the first 8 hex digits of the file's SHA-256 (torch.hub's naming
# convention, which `torch.hub.download_url_to_file(..., hash_prefix=...)` checks). Only this
# prefix is published with the file, so it is what we check.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "ddpm_jax")

INPUT_SIZE = 299     # the graph's input resolution
POOL_DIM = 2048      # pool3 features (FID)
NUM_CLASSES = 1008   # the 2015 graph's classifier: 1000 ImageNet classes + 8 unused
BN_EPSILON = 1e-3    # TF's batch-norm epsilon in the 2015 graph (torchvision: eps=0.001)

Variables = Dict[str, Any]  # {'params': ..., 'batch_stats': ...}


class InceptionWeightsError(RuntimeError):
  """The FID Inception weights are missing, corrupt, or do not fit the network."""


# ------------------------------------------------------------------------------------------------
# Architecture
# ------------------------------------------------------------------------------------------------
def _sym_pad(padding: Tuple[int, int]):
  return ((padding[0], padding[0]), (padding[1], padding[1]))


def _avg_pool_3x3_same(x):
  # TF's 'SAME' average pool divides by the number of real (unpadded) inputs in each window;
  # pytorch-fid reproduces it with count_include_pad=False.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class BasicConv2d(nn.Module):
  """Convolution without bias -> batch norm (running statistics) -> ReLU."""
  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  padding: Tuple[int, int] = (0, 0)  # symmetric (rows, columns), as in torch.nn.Conv2d
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=_sym_pad(self.padding), use_bias=False, precision=self.precision,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


class InceptionA(nn.Module):
  """Mixed_5b/c/d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (35x35 -> 17x17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..e (17x17): factorised 7x7 convolutions (1x7 and 7x1)."""
  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (17x17 -> 8x8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/c (8x8): expanded filter banks (1x3 and 3x1 side by side).

  `pool`: 'avg' for Mixed_7b (FIDInceptionE_1); 'max' for Mixed_7c (FIDInceptionE_2), where the
  2015 graph max-pools, unlike the paper and torchvision.
  """
  pool: str
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3a = conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3)
    b3b = conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bda = conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd)
    bdb = conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)
    if self.pool == "avg":
      pooled = _avg_pool_3x3_same(x)
    elif self.pool == "max":
      # Padding with -inf (nn.max_pool's init value) equals torch's max_pool2d(padding=1).
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"InceptionE.pool must be 'avg' or 'max', got {self.pool!r}")
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


def preprocess(images: jax.Array) -> jax.Array:
  """Images as the FID network expects them: 299x299 RGB in [-1, 1].

  pytorch-fid converts images to RGB, scales them to [0, 1], resizes bilinearly to 299x299
  (`F.interpolate(..., align_corners=False)`, no antialiasing) and maps to [-1, 1]. Bilinear
  resizing is affine-equivariant (its weights sum to 1), so mapping to [-1, 1] first is the same.

  Args:
    images: [B, H, W, C] uint8 in [0, 255] or float in [-1, 1]; C is 1 (grey) or 3 (RGB).
  Returns:
    [B, 299, 299, 3] float32 in [-1, 1].
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  if images.shape[-1] not in (1, 3):
    raise ValueError(f"images must have 1 or 3 channels (NHWC), got shape {images.shape}")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) * (2.0 / 255.0) - 1.0
  elif jnp.issubdtype(images.dtype, jnp.floating):
    x = images.astype(jnp.float32)
  else:
    raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype "
                     f"{images.dtype}")
  if x.shape[-1] == 1:  # PIL's convert('RGB') of a grey image repeats it in R, G and B
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    # Half-pixel centres without antialiasing == torch's bilinear, align_corners=False.
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), method="bilinear",
                         antialias=False)
  return x


class InceptionV3(nn.Module):
  """The FID Inception-v3.

  Attributes:
    logits_bias: add the classifier bias to the logits. False by default, as in Salimans et al.'s
      Inception Score code, which multiplies pool3 by the softmax weights only (torch-fidelity's
      'logits_unbiased'); published IS values are computed that way.
    precision: matmul/conv precision; 'highest' keeps float32 accuracy on TPUs/GPUs, where the
      default would round inputs to bfloat16 and shift FID.
  """
  logits_bias: bool = False
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """images: [B, H, W, C] uint8 or float in [-1, 1] -> (pool [B, 2048], logits [B, 1008])."""
    p = self.precision
    conv = lambda *a, **k: BasicConv2d(*a, precision=p, **k)
    x = preprocess(images)                                        # [B, 299, 299, 3]
    x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # [B, 149, 149, 32]
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)                  # [B, 147, 147, 32]
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)  # [B, 147, 147, 64]
    x = _max_pool_3x3_s2(x)                                        # [B, 73, 73, 64]
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)                  # [B, 73, 73, 80]
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)                 # [B, 71, 71, 192]
    x = _max_pool_3x3_s2(x)                                        # [B, 35, 35, 192]
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)            # [B, 35, 35, 256]
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)            # [B, 35, 35, 288]
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)            # [B, 35, 35, 288]
    x = InceptionB(precision=p, name="Mixed_6a")(x)                # [B, 17, 17, 768]
    x = InceptionC(128, precision=p, name="Mixed_6b")(x)           # [B, 17, 17, 768]
    x = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x = InceptionC(160, precision=p, name="Mixed_6d")(x)
    x = InceptionC(192, precision=p, name="Mixed_6e")(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)                # [B, 8, 8, 1280]
    x = InceptionE("avg", precision=p, name="Mixed_7b")(x)         # [B, 8, 8, 2048]
    x = InceptionE("max", precision=p, name="Mixed_7c")(x)         # [B, 8, 8, 2048]
    pool = jnp.mean(x, axis=(1, 2))                                # [B, 2048] ("pool3")
    logits = _Classifier(self.logits_bias, precision=p, name="fc")(pool)  # [B, 1008]
    return pool, logits


class _Classifier(nn.Module):
  """The graph's softmax layer (PyTorch's `fc`), optionally without its bias."""
  add_bias: bool
  precision: Any = None

  @nn.compact
  def __call__(self, pool):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool.shape[-1], NUM_CLASSES))
    bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
    logits = jnp.dot(pool, kernel, precision=self.precision)
    return logits + bias if self.add_bias else logits


# ------------------------------------------------------------------------------------------------
# Weights: PyTorch state_dict <-> Flax variables
# ------------------------------------------------------------------------------------------------
# Flax leaf -> (PyTorch suffix, how the PyTorch array becomes the Flax array).
_LEAF_TO_TORCH = {
    ("params", "kernel", 4): ("weight", lambda w: np.transpose(w, (2, 3, 1, 0))),  # OIHW -> HWIO
    ("params", "kernel", 2): ("weight", lambda w: np.transpose(w, (1, 0))),        # [out, in]
    ("params", "bias", 1): ("bias", lambda b: b),
    ("params", "scale", 1): ("weight", lambda g: g),
    ("batch_stats", "mean", 1): ("running_mean", lambda m: m),
    ("batch_stats", "var", 1): ("running_var", lambda v: v),
}
# Bookkeeping entries of a PyTorch state_dict that carry no weights.
_IGNORED_TORCH_SUFFIXES = ("num_batches_tracked",)


@functools.lru_cache(maxsize=1)
def variable_shapes() -> Variables:
  """The network's variables as ShapeDtypeStructs (traced once, no computation, no memory)."""
  return jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))


def _torch_name_and_converter(path: Tuple[str, ...], ndim: int):
  collection, *modules, leaf = path
  key = (collection, leaf, ndim)
  if key not in _LEAF_TO_TORCH:
    raise KeyError(f"no PyTorch counterpart for Flax variable {'/'.join(path)} (ndim {ndim})")
  suffix, convert = _LEAF_TO_TORCH[key]
  return ".".join(modules + [suffix]), convert


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray],
                              source: str = "state_dict") -> Variables:
  """PyTorch state_dict of pytorch-fid's FID Inception -> Flax variables of `InceptionV3`.

  Every Flax variable must find its PyTorch array (same name, matching shape) and every PyTorch
  array must be used, so a wrong or partial file fails loudly instead of computing wrong FIDs.

  Args:
    state_dict: PyTorch names -> numpy arrays in PyTorch layout (conv OIHW, linear [out, in]).
    source: where the state_dict came from, for error messages.
  Returns:
    {'params': ..., 'batch_stats': ...} of float32 jax arrays.
  Raises:
    InceptionWeightsError: naming the missing, unexpected or wrongly shaped key.
  """
  flat = {}
  used = set()
  for path, spec in traverse_util.flatten_dict(variable_shapes()).items():
    name, convert = _torch_name_and_converter(path, len(spec.shape))
    if name not in state_dict:
      raise InceptionWeightsError(f"{source}: missing key {name!r} (for Flax variable "
                                  f"{'/'.join(path)}); is this pytorch-fid's FID Inception?")
    value = np.asarray(state_dict[name])
    converted = convert(value)
    if converted.shape != spec.shape:
      raise InceptionWeightsError(
          f"{source}: key {name!r} has shape {value.shape}, which does not fit Flax variable "
          f"{'/'.join(path)} of shape {spec.shape} (expected PyTorch layout)")
    flat[path] = jnp.asarray(converted, dtype=jnp.float32)
    used.add(name)
  unexpected = sorted(k for k in state_dict
                      if k not in used and not k.endswith(_IGNORED_TORCH_SUFFIXES))
  if unexpected:
    raise InceptionWeightsError(f"{source}: unexpected keys {unexpected[:5]}"
                                f"{' ...' if len(unexpected) > 5 else ''} "
                                f"({len(unexpected)} in all); is this the FID Inception "
                                "(1008 classes, no AuxLogits) and not torchvision's?")
  return traverse_util.unflatten_dict(flat)


def read_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A PyTorch .pth state_dict as numpy arrays. Needs torch (not a project dependency)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise InceptionWeightsError(
        f"reading {path} needs PyTorch, which is not installed (it is not a dependency of "
        "ddpm-jax). Convert the file once where torch is installed: "
        f"`python scripts/convert_inception_weights.py --input {path} --output "
        f"{CONVERTED_WEIGHTS_FILENAME}`, then point config.eval.inception_weights at the .npz "
        f"(or copy it into {DEFAULT_CACHE_DIR}).") from e
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state_dict, Mapping):
    raise InceptionWeightsError(f"{path}: expected a state_dict, got {type(state_dict).__name__}")
  return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def load_params(path: str) -> Variables:
  """Flax variables of `InceptionV3` from a local weights file.

  Args:
    path: `.npz` whose keys are pytorch-fid's state_dict names with arrays in PyTorch layout
      (what scripts/convert_inception_weights.py writes), or the `.pth` itself (needs torch).
  Returns:
    {'params': ..., 'batch_stats': ...} for `InceptionV3().apply`.
  """
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise InceptionWeightsError(f"FID Inception weights file {path!r} does not exist")
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      state_dict = {k: data[k] for k in data.files}
  elif suffix in (".pth", ".pt"):
    state_dict = read_torch_state_dict(path)
  else:
    raise InceptionWeightsError(f"{path}: unknown weights format {suffix!r}; expected .npz "
                                "(see scripts/convert_inception_weights.py) or .pth")
  return variables_from_state_dict(state_dict, source=path)


# ------------------------------------------------------------------------------------------------
# Finding the weights file: config path, cache, or a one-time download
# ------------------------------------------------------------------------------------------------
def sha256_of_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def verify_sha256(path: str, expected: str) -> None:
  """Raises InceptionWeightsError unless the file's SHA-256 hex digest starts with `expected`."""
  expected = expected.lower()
  if len(expected) < 8 or any(c not in "0123456789abcdef" for c in expected):
    raise ValueError(f"expected SHA-256 must be >= 8 hex digits, got {expected!r}")
  actual = sha256_of_file(path)
  if not actual.startswith(expected):
    raise InceptionWeightsError(
        f"SHA-256 mismatch for {path}: expected a digest starting with {expected}, got {actual}. "
        "The file is truncated, corrupt, or not pytorch-fid's FID Inception weights; delete it "
        f"and supply {FID_WEIGHTS_FILENAME} from {FID_WEIGHTS_URL}.")


def _how_to_supply(cache_dir: str) -> str:
  return (f"Download {FID_WEIGHTS_URL} on a machine with internet access, then either\n"
          f"  * copy it to {os.path.join(cache_dir, FID_WEIGHTS_FILENAME)} (reading .pth needs "
          "torch), or\n"
          "  * convert it with `python scripts/convert_inception_weights.py --input "
          f"{FID_WEIGHTS_FILENAME}` (needs torch, once) and copy the .npz to "
          f"{os.path.join(cache_dir, CONVERTED_WEIGHTS_FILENAME)}, or\n"
          "  * pass --config.eval.inception_weights=/path/to/the/file (.pth or .npz).\n"
          "To run without FID/IS, set --config.eval.feature_extractor=none.")


def _download(url: str, dest: str, sha256_prefix: str, timeout: float) -> None:
  """Downloads `url` to `dest` atomically (temp file + rename), checking the hash first."""
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".download-")
  try:
    with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
      for chunk in iter(lambda: response.read(1 << 20), b""):
        f.write(chunk)
    verify_sha256(tmp, sha256_prefix)
    os.replace(tmp, dest)  # atomic: concurrent processes never see a partial file
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def get_weights_path(path: str = "", cache_dir: str = DEFAULT_CACHE_DIR, *,
                     url: str = FID_WEIGHTS_URL,
                     sha256_prefix: str = FID_WEIGHTS_SHA256_PREFIX,
                     timeout: float = 60.0) -> str:
  """The local FID Inception weights file: `path`, else a cached file, else a one-time download.

  Args:
    path: config.eval.inception_weights; '' to use the cache. A given path must exist. A file
      named like pytorch-fid's .pth has its SHA-256 checked.
    cache_dir: where the converted .npz or the .pth are looked for and downloads go.
    url, sha256_prefix, timeout: the download source and the hash it must have.
  Returns:
    Path of a .npz or .pth for `load_params`.
  Raises:
    InceptionWeightsError: with instructions, if no file can be found or downloaded, or a hash
      does not match. Random weights are never used instead.
  """
  cache_dir = os.path.expanduser(cache_dir)
  if path:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise InceptionWeightsError(
          f"config.eval.inception_weights={path!r}: no such file.\n" + _how_to_supply(cache_dir))
    if os.path.basename(path) == FID_WEIGHTS_FILENAME:
      verify_sha256(path, sha256_prefix)
    return path

  converted = os.path.join(cache_dir, CONVERTED_WEIGHTS_FILENAME)
  if os.path.isfile(converted):
    return converted
  cached = os.path.join(cache_dir, FID_WEIGHTS_FILENAME)
  if os.path.isfile(cached):
    verify_sha256(cached, sha256_prefix)
    return cached
  try:
    _download(url, cached, sha256_prefix, timeout)
  except (urllib.error.URLError, OSError, ValueError) as e:
    raise InceptionWeightsError(
        f"FID Inception weights not found: config.eval.inception_weights is empty, {cache_dir} "
        f"has neither {CONVERTED_WEIGHTS_FILENAME} nor {FID_WEIGHTS_FILENAME}, and downloading "
        f"{url} failed ({type(e).__name__}: {e}).\n" + _how_to_supply(cache_dir)) from e
  return cached
