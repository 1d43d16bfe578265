"""FID and Inception Score: feature extractors (device side) and the metric math (float64 host side).

FID (Heusel et al. 2017, eq. 6): d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}), the
Frechet distance between Gaussians fitted to the features of two image sets.
IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over `num_splits` splits.

A feature extractor is any callable
  features_fn(images [B, H, W, C] uint8) -> (pool_features [B, D], logits [B, K] or None)
so FID can use the Inception network (`inception_feature_fn`) or, for small datasets such as
digits/MNIST, the penultimate layer of a small classifier (`classifier_feature_fn`).
"""
import os
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm import inception
from ddpm import workdir

# features_fn(images [B, H, W, C] uint8) -> (pool_features [B, D], logits [B, K] or None).
FeatureExtractor = Callable[[np.ndarray], Tuple[np.ndarray, Optional[np.ndarray]]]


# ------------------------------------------------------------------------------------------------
# Feature extractors
# ------------------------------------------------------------------------------------------------
def batched_feature_fn(apply_fn: Callable[[Any, jax.Array], Any], variables: Any, *,
                       batch_size: int, devices: Optional[Sequence[jax.Device]] = None
                       ) -> FeatureExtractor:
  """Wraps `apply_fn(variables, images) -> features or (features, logits)` as a FeatureExtractor.

  The call is jitted once per image shape: inputs are cut into chunks of `batch_size` and the
  last chunk is zero-padded, so the compiled function never sees a new batch size. Each chunk is
  split over `devices` (data parallel, variables replicated); the devices must be local to this
  process, so every process can extract features of its own images independently.

  Args:
    apply_fn: pure function of (variables, images [b, H, W, C]).
    variables: its variables (e.g. {'params': ..., 'batch_stats': ...}).
    batch_size: images per compiled call; rounded up to a multiple of len(devices).
    devices: local devices to split each chunk over (default: all of this process's devices).
  Returns:
    features_fn(images [B, H, W, C]) -> (features [B, D] float32 numpy, logits [B, K] or None).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  devices = list(jax.local_devices() if devices is None else devices)
  if not devices:
    raise ValueError("devices must name at least one device")
  non_local = [d for d in devices if d.process_index != jax.process_index()]
  if non_local:
    raise ValueError(f"devices must be local to process {jax.process_index()}, got {non_local}")
  n = len(devices)
  batch_size = -(-batch_size // n) * n
  mesh = Mesh(np.asarray(devices), ("batch",))
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
  variables = jax.device_put(variables, replicated)

  def _apply(v, images):
    out = apply_fn(v, images)
    features, logits = out if isinstance(out, tuple) else (out, None)
    if features.ndim != 2 or (logits is not None and logits.ndim != 2):
      raise ValueError(f"feature extractor must return [B, D] features (and [B, K] logits), got "
                       f"{features.shape} and {None if logits is None else logits.shape}")
    return features.astype(jnp.float32), (None if logits is None else logits.astype(jnp.float32))

  compiled = jax.jit(_apply, in_shardings=(replicated, split), out_shardings=split)

  def features_fn(images: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    images = np.asarray(images)
    if images.ndim != 4:
      raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    feats, logits = [], []
    for start in range(0, images.shape[0], batch_size):
      chunk = images[start:start + batch_size]
      real = chunk.shape[0]
      if real < batch_size:
        pad = np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      f, l = compiled(variables, jax.device_put(chunk, split))
      feats.append(np.asarray(f)[:real])
      if l is not None:
        logits.append(np.asarray(l)[:real])
    if not feats:
      raise ValueError("images is empty: no features to compute")
    return np.concatenate(feats), (np.concatenate(logits) if logits else None)

  return features_fn


def inception_feature_fn(variables: Any, *, batch_size: int = 64,
                         devices: Optional[Sequence[jax.Device]] = None,
                         logits_bias: bool = False) -> FeatureExtractor:
  """The FID Inception as a FeatureExtractor: (pool3 [B, 2048], logits [B, 1008]).

  Args:
    variables: from `inception.load_params(...)`.
    batch_size, devices: see `batched_feature_fn`.
    logits_bias: see `inception.InceptionV3.logits_bias` (False = the original IS code).
  """
  model = inception.InceptionV3(logits_bias=logits_bias)
  return batched_feature_fn(model.apply, variables, batch_size=batch_size, devices=devices)


def uint8_to_unit_range(images: jax.Array) -> jax.Array:
  """[B, H, W, C] uint8 -> float32 in [-1, 1], the range the diffusion models train on."""
  if images.dtype != jnp.uint8:
    raise ValueError(f"expected uint8 images, got dtype {images.dtype}")
  return images.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def classifier_feature_fn(module: nn.Module, variables: Any, *,
                          method: Union[str, Callable[..., Any], None] = None,
                          preprocess: Callable[[jax.Array], jax.Array] = uint8_to_unit_range,
                          batch_size: int = 256,
                          devices: Optional[Sequence[jax.Device]] = None) -> FeatureExtractor:
  """Any Flax classifier as a FeatureExtractor (e.g. for digits / MNIST, where Inception is moot).

  `module.apply(variables, preprocess(images), method=method)` must return the penultimate
  features [B, D], or a tuple (features [B, D], logits [B, K]); with logits, IS can be computed
  with this classifier too.
  """
  def apply_fn(v, images):
    return module.apply(v, preprocess(images), method=method)
  return batched_feature_fn(apply_fn, variables, batch_size=batch_size, devices=devices)


FEATURE_EXTRACTORS = ("inception", "none")  # config.eval.feature_extractor


def feature_fn_from_config(config, batch_size: Optional[int] = None
                           ) -> Optional[FeatureExtractor]:
  """The extractor named by config.eval.feature_extractor ('inception' or 'none' -> None).

  Inception weights come from config.eval.inception_weights or the cache (see
  `inception.get_weights_path`); a missing file raises with instructions.
  """
  name = config.eval.feature_extractor
  if name == "none":
    return None
  if name not in FEATURE_EXTRACTORS:
    raise ValueError(f"config.eval.feature_extractor={name!r} is not one of "
                     f"{', '.join(map(repr, FEATURE_EXTRACTORS))}")
  variables = inception.load_params(inception.get_weights_path(config.eval.inception_weights))
  if batch_size is None:  # eval.batch_size is global; each process extracts its own share
    batch_size = max(1, config.eval.batch_size // jax.process_count())
  return inception_feature_fn(variables, batch_size=batch_size)


def features_in_batches(features_fn: FeatureExtractor,
                        images: Union[np.ndarray, Iterable[np.ndarray]],
                        batch_size: int = 256, progress: bool = False
                        ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """Features of many images, computed `batch_size` at a time to bound host and device memory.

  Args:
    features_fn: a FeatureExtractor.
    images: [N, H, W, C] array (cut into batches here), or an iterable of [b, H, W, C] batches
      (e.g. straight from the sampler, so the N images never need to be in memory at once).
    batch_size: images per features_fn call when `images` is an array.
    progress: show a tqdm progress bar.
  Returns:
    (features [N, D], logits [N, K] or None).
  """
  if isinstance(images, np.ndarray):
    if images.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    batches = (images[i:i + batch_size] for i in range(0, images.shape[0], batch_size))
    total = -(-images.shape[0] // batch_size)
  else:
    batches, total = iter(images), None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    batches = tqdm.tqdm(batches, total=total, desc="features", unit="batch")
  feats, logits = [], []
  for batch in batches:
    f, l = features_fn(np.asarray(batch))
    if feats and (l is None) != (not logits):
      raise ValueError("features_fn returned logits for some batches and None for others")
    feats.append(np.asarray(f))
    if l is not None:
      logits.append(np.asarray(l))
  if not feats:
    raise ValueError("no images: cannot compute features")
  return np.concatenate(feats), (np.concatenate(logits) if logits else None)


# ------------------------------------------------------------------------------------------------
# Metric math (float64 numpy / scipy)
# ------------------------------------------------------------------------------------------------
def compute_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """features [N, D] -> (mu [D], sigma [D, D]): mean and unbiased covariance, in float64."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must be [N, D], got shape {features.shape}")
  if features.shape[0] < 2:
    raise ValueError(f"need at least 2 feature vectors for a covariance, got {features.shape[0]}")
  if not np.all(np.isfinite(features)):
    raise ValueError("features contain NaN or Inf")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6).

  d^2 = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2}).

  When the product is singular (fewer images than feature dimensions), its square root may come
  out non-finite; as in the TTUR reference code, eps is then added to both diagonals. Small
  imaginary parts from round-off are dropped; large ones raise.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"means must be [D] vectors of equal length, got {mu1.shape} and {mu2.shape}")
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"covariances must be [{d}, {d}] to match the means, got {sigma1.shape} and "
                     f"{sigma2.shape}")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    offset = np.eye(d) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    max_imag = np.max(np.abs(np.diagonal(covmean).imag))
    if max_imag > 1e-3:
      raise ValueError(f"matrix square root has a large imaginary component ({max_imag:.3g}); "
                       "the covariances are not positive semi-definite")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, num_splits: int = 10) -> Tuple[float, float]:
  """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over splits.

  As in the reference code, the images are cut into `num_splits` consecutive parts (part i is
  images [i * N // num_splits, (i + 1) * N // num_splits)), p(y) is the mean prediction of each
  part, and the score's mean and standard deviation over parts returned.

  Args:
    logits: [N, K] unnormalised log-probabilities of the classifier.
    num_splits: number of parts (1 <= num_splits <= N).
  Returns:
    (mean, std) of the per-split scores; 1 <= score <= K.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [N, K], got shape {logits.shape}")
  if not 1 <= num_splits <= logits.shape[0]:
    raise ValueError(f"num_splits must be in [1, N={logits.shape[0]}], got {num_splits}")
  log_p = scipy.special.log_softmax(logits, axis=1)                       # log p(y|x)
  n, scores = log_p.shape[0], []
  for i in range(num_splits):
    part = log_p[i * n // num_splits:(i + 1) * n // num_splits]
    log_py = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])  # log p(y)
    kl = np.sum(np.exp(part) * (part - log_py), axis=1)                     # KL per image
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------------
# Cached reference statistics (same 'mu' / 'sigma' keys as pytorch-fid's and TTUR's .npz files)
# ------------------------------------------------------------------------------------------------
def save_statistics(path, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes (mu [D], sigma [D, D]) to `path` (.npz, local or gs:// / s3://) atomically: readers
  never see a partial file."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  _check_statistics(mu, sigma, path)
  workdir.write_bytes(path, workdir.npz_bytes(mu=mu, sigma=sigma))


def load_statistics(path) -> Tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) from an .npz written by `save_statistics` (or pytorch-fid / TTUR)."""
  if not workdir.exists(path):
    raise FileNotFoundError(f"FID statistics file {os.fspath(path)!r} does not exist")
  with workdir.load_npz(path) as data:
    missing = [k for k in ("mu", "sigma") if k not in data.files]
    if missing:
      raise ValueError(f"{path}: missing key(s) {missing}; found {data.files}")
    mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
  _check_statistics(mu, sigma, path)
  return mu, sigma


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{where}: statistics must be mu [D] and sigma [D, D], got {mu.shape} and "
                     f"{sigma.shape}")
