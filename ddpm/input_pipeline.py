"""Input pipelines: TFDS datasets, image folders and the embedded `digits` set.

Every dataset becomes a random-access *source* of preprocessed `uint8 [S, S, C]` images and int
labels; one `grain` pipeline on top turns any source into sharded, resumable training batches:

  global stream   position i -> record index, a fresh uniform permutation per epoch (grain's
                  index shuffle, seeded by `seed` folded with the epoch), repeated forever;
                  optional horizontal flip drawn per stream position (Philox keyed by position).
  global batch s  stream positions [s * B, (s + 1) * B), B = training.batch_size.
  process p       positions [s * B + p * B / P, s * B + (p + 1) * B / P) of every global batch.

So the data a run sees does not depend on how many processes read it: the concatenation of the
local batches of P processes is exactly the batch a single process would read, and an iterator
state (the number of batches consumed) resumes on any process count. Only the part a process
feeds to its devices is read and decoded by it.

Datasets (`config.data.dataset`):
  digits   scikit-learn's bundled 8x8 handwritten digits (1797 real images, offline), levels
           0..16 mapped to 0..255, resized to data.image_size with PIL bicubic interpolation.
           Fixed, seed-independent stratified split: within each class (in the data set's order)
           every 5th image is a test image (355 test, 1442 train).
  folder   every png/jpg/jpeg/webp/bmp under data.path (recursive, case-insensitive, sorted),
           EXIF-rotated, alpha composited on white, converted to RGB or L, centre-cropped to a
           square and resized to data.image_size (PIL, antialiased bicubic). Unreadable files
           are skipped with one warning each. Folders have no labels (label 0) and no held-out
           split: `eval_images` reuses the training images (bits/dim is then a training-set
           number).
  TFDS     see `TFDS_DATASETS` (labels where the dataset has them, else 0). Read with
           `tfds.data_source` (array_record files, random access, no TensorFlow needed):
           prepare the dataset once with
           `bash scripts/prepare_data.sh <name> [--data_dir=...]`.
           mnist / fashion_mnist (28x28) are zero-padded to image_size in 29..32 (pixels stay
           exact) and resized otherwise; celeb_a gets score_sde's central 140x140 crop; every
           image is centre-cropped to a square and resized (antialiased) to image_size.

Other keys: data.num_workers > 0 decodes in that many grain worker processes (the main module
then needs an `if __name__ == "__main__":` guard, as with any spawned multiprocessing);
data.prefetch is the `size` to pass to `prefetch.prefetch_to_mesh` (ddpm/prefetch.py). There is
no shuffle-buffer size: grain shuffles globally by index (an exact uniform permutation per
epoch), which a shuffle buffer only approximates.
"""
import concurrent.futures
import dataclasses
import os
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import grain
import jax
import numpy as np
from absl import flags, logging
from PIL import Image, ImageOps

from ddpm.errors import UserError

CHANNELS = (1, 3)  # config.data.channels: greyscale or RGB
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Preprocessed folder images are kept in memory when they take at most this many bytes;
# larger folders are decoded again on every read (after one validating pass at start-up).
FOLDER_CACHE_BYTES = 2 << 30
# MNIST-like 28x28 images are zero-padded (not resized) to image_size when it exceeds 28 by at
# most this much (the usual 28 -> 32 padding keeps the pixels exact).
_MAX_PAD = 4
_REFERENCE_SEED = 20200619  # fixed order of `reference_images`, independent of the run's seed


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
  """How one TFDS dataset is read and preprocessed."""
  train_split: str
  eval_split: str
  label_key: Optional[str] = None
  # Centre crop applied before the square crop and resize, as (height, width); None = none.
  crop: Optional[Tuple[int, int]] = None
  resample: int = Image.Resampling.BICUBIC
  pad_small: bool = False  # zero-pad by up to _MAX_PAD pixels instead of resizing
  note: str = ""


TFDS_DATASETS = {
    "mnist": _TfdsSpec("train", "test", "label", pad_small=True),
    "fashion_mnist": _TfdsSpec("train", "test", "label", pad_small=True),
    "cifar10": _TfdsSpec("train", "test", "label"),
    # score_sde (Song et al. 2021) CelebA 64x64: central 140x140 crop of the 218x178 aligned
    # images, then an antialiased bilinear resize to image_size.
    "celeb_a": _TfdsSpec("train", "test", crop=(140, 140), resample=Image.Resampling.BILINEAR),
    # CelebA-HQ has only a train split: eval images reuse it.
    "celeb_a_hq/256": _TfdsSpec("train", "train", note="no test split: eval reuses train"),
    # DDPM / score_sde LSUN: centre crop to a square, antialiased bicubic resize.
    "lsun/church_outdoor": _TfdsSpec("train", "validation"),
    "lsun/bedroom": _TfdsSpec("train", "validation"),
    # Downsampled ImageNet (van den Oord et al. 2016) has no labels in TFDS; bits/dim is
    # reported on its validation split.
    "downsampled_imagenet/32x32": _TfdsSpec("train", "validation"),
    "downsampled_imagenet/64x64": _TfdsSpec("train", "validation"),
}
SUPPORTED_DATASETS = ("digits", "folder") + tuple(TFDS_DATASETS)


# ---------------------------------------------------------------------------------------------
# Image preprocessing (PIL).
# ---------------------------------------------------------------------------------------------

def _to_pil(image: np.ndarray) -> Image.Image:
  """image: uint8 [H, W, C] with C in (1, 3, 4) -> PIL image."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return Image.fromarray(np.ascontiguousarray(image))


def _convert_mode(img: Image.Image, channels: int) -> Image.Image:
  """Any PIL mode -> 'L' (channels=1) or 'RGB' (channels=3); transparency composited on white."""
  if img.mode.startswith("I"):
    # 16-bit greyscale PNGs open as I;16 (or I): scale 0..65535 to 0..255 rather than clip.
    levels = np.asarray(img, dtype=np.float64)
    img = Image.fromarray(np.clip(np.round(levels / 257.0), 0, 255).astype(np.uint8), "L")
  elif img.mode == "F":
    raise ValueError("floating-point images (PIL mode F) have no defined 0..255 range")
  has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
      img.mode == "P" and "transparency" in img.info)
  if has_alpha:
    # Transparent pixels have arbitrary colour values; show them over a white background, as
    # image viewers do, instead of keeping whatever colour hides under alpha = 0.
    rgba = img.convert("RGBA")
    img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
  return img.convert("L" if channels == 1 else "RGB")


def _center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
  w, h = img.size
  height, width = min(height, h), min(width, w)
  top, left = (h - height) // 2, (w - width) // 2
  return img.crop((left, top, left + width, top + height))


def preprocess_image(img: Image.Image, image_size: int, channels: int, *,
                     crop: Optional[Tuple[int, int]] = None,
                     resample: int = Image.Resampling.BICUBIC,
                     pad_small: bool = False) -> np.ndarray:
  """Converts, centre-crops and resizes one image.

  Args:
    img: a PIL image of any mode and size.
    image_size: output side S.
    channels: 1 (L) or 3 (RGB).
    crop: optional (height, width) centre crop applied first (e.g. CelebA's 140x140).
    resample: PIL filter; Pillow widens the filter support by the reduction factor when
      shrinking, so downsampling is antialiased.
    pad_small: zero-pad (centred) instead of resizing when S exceeds the side by <= 4 pixels.
  Returns:
    uint8 [S, S, channels].
  """
  img = _convert_mode(img, channels)
  if crop is not None:
    img = _center_crop(img, *crop)
  side = min(img.size)
  img = _center_crop(img, side, side)
  if side != image_size:
    if pad_small and side < image_size <= side + _MAX_PAD:
      canvas = Image.new(img.mode, (image_size, image_size), 0)
      offset = (image_size - side) // 2
      canvas.paste(img, (offset, offset))
      img = canvas
    else:
      img = img.resize((image_size, image_size), resample=resample)
  out = np.asarray(img, dtype=np.uint8)
  return out[..., None] if out.ndim == 2 else out


def load_image_file(path: str, image_size: int, channels: int) -> np.ndarray:
  """Decodes and preprocesses one image file -> uint8 [S, S, channels].

  Raises whatever PIL raises for an unreadable, truncated or non-image file.
  """
  with Image.open(path) as img:
    # JPEG only: decode at the smallest 1/2^k scale that is still >= image_size on both sides
    # (much faster for large photos; the antialiased resize below does the rest).
    img.draft(None, (image_size, image_size))
    img = ImageOps.exif_transpose(img)  # camera photos carry their rotation in EXIF
    img.load()
    return preprocess_image(img, image_size, channels)


# ---------------------------------------------------------------------------------------------
# Random-access sources: len(src) and src[i] -> (uint8 [S, S, C] image, int label).
# ---------------------------------------------------------------------------------------------

class ArraySource:
  """Images already preprocessed in memory."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels.astype(np.int32)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int):
    return self.images[index], int(self.labels[index])


class TfdsSource:
  """A `tfds.data_source` split, preprocessed on read."""

  def __init__(self, source, spec: _TfdsSpec, image_size: int, channels: int):
    self.source, self.spec = source, spec
    self.image_size, self.channels = image_size, channels

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    record = self.source[int(index)]
    image = preprocess_image(_to_pil(np.asarray(record["image"])), self.image_size,
                             self.channels, crop=self.spec.crop, resample=self.spec.resample,
                             pad_small=self.spec.pad_small)
    label = int(record[self.spec.label_key]) if self.spec.label_key else 0
    return image, label


class FolderSource:
  """Image files under a folder; validated once at construction."""

  def __init__(self, root: str, image_size: int, channels: int,
               cache_bytes: int = FOLDER_CACHE_BYTES):
    self.root, self.image_size, self.channels = root, image_size, channels
    candidates, ignored = _list_image_files(root)
    if not candidates:
      raise ValueError(f"data.path={root!r}: no images found (searched recursively for files "
                       f"ending in {', '.join(IMAGE_EXTENSIONS)}, case-insensitive; "
                       f"{ignored} other file(s) ignored)")
    shape = (image_size, image_size, channels)
    cache = len(candidates) * int(np.prod(shape)) <= cache_bytes
    buffer = np.empty((len(candidates),) + shape, np.uint8) if cache else None

    def try_load(i):
      try:
        image = load_image_file(candidates[i], image_size, channels)
      except Exception as e:  # pylint: disable=broad-except
        return e
      if cache:
        buffer[i] = image
      return None

    workers = min(32, (os.cpu_count() or 1) + 2)  # PIL decoding releases the GIL
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      errors = list(pool.map(try_load, range(len(candidates))))
    for path, error in zip(candidates, errors):
      if error is not None:
        reason = " ".join(f"{type(error).__name__}: {error}".split())  # one line
        logging.warning("Skipping unreadable image %s (%s)", path, reason)
    valid = np.asarray([e is None for e in errors])
    self.paths = [p for p, ok in zip(candidates, valid) if ok]
    skipped = len(candidates) - len(self.paths)
    logging.info("Image folder %s: %d images, %d unreadable file(s) skipped, %d non-image "
                 "file(s) ignored%s.", root, len(self.paths), skipped, ignored,
                 "" if cache else " (decoded on every read: too large to cache)")
    if not self.paths:
      raise ValueError(f"data.path={root!r}: none of the {len(candidates)} image file(s) could "
                       f"be read (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})")
    self.images = None if not cache else buffer if valid.all() else buffer[valid]
    self.num_skipped = skipped

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int):
    if self.images is not None:
      return self.images[index], 0
    path = self.paths[index]
    try:
      return load_image_file(path, self.image_size, self.channels), 0
    except Exception as e:
      raise OSError(f"image {path} was readable at start-up but now fails: {e}") from e


def _list_image_files(root: str) -> Tuple[list, int]:
  """Sorted image paths under `root` (recursive) and the number of other files ignored."""
  if not os.path.exists(root):
    raise FileNotFoundError(f"data.path={root!r} does not exist (expected a folder of "
                            f"{', '.join(IMAGE_EXTENSIONS)} images)")
  if not os.path.isdir(root):
    raise ValueError(f"data.path={root!r} is not a folder (expected a folder of "
                     f"{', '.join(IMAGE_EXTENSIONS)} images)")
  paths, ignored, seen = [], 0, set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:  # a symlink back up the tree: do not walk it twice (or forever)
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames.sort()
    for name in filenames:
      if name.startswith("."):
        continue  # .DS_Store, editor swap files, ...
      if name.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(dirpath, name))
      else:
        ignored += 1
  return sorted(paths), ignored


def _digits_sources(image_size: int, channels: int):
  """scikit-learn's 8x8 digits -> (train, test) ArraySources; fixed stratified split."""
  from sklearn import datasets as sk_datasets
  digits = sk_datasets.load_digits()
  levels = np.asarray(digits.images, dtype=np.float64)  # [1797, 8, 8], integers 0..16
  images = np.round(levels * (255.0 / 16.0)).astype(np.uint8)
  labels = np.asarray(digits.target, dtype=np.int32)
  if image_size != 8:
    images = np.stack([np.asarray(Image.fromarray(im).resize(
        (image_size, image_size), resample=Image.Resampling.BICUBIC)) for im in images])
  images = images[..., None]
  if channels == 3:
    images = np.repeat(images, 3, axis=-1)
  is_test = np.zeros(len(labels), dtype=bool)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    is_test[members[4::5]] = True  # every 5th image of each class: a stratified 20% test split
  return (ArraySource(images[~is_test], labels[~is_test]),
          ArraySource(images[is_test], labels[is_test]))


class DatasetNotPreparedError(UserError, FileNotFoundError):
  """A TFDS dataset of the config has no array_record files in its data dir yet."""


def not_prepared_message(name: str, data_dir: str, split: str, reason: str = "") -> str:
  """One line: which dataset is missing where, and the command that prepares it."""
  where = os.path.abspath(os.path.expanduser(
      data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"))
  reason = " ".join(reason.split())  # TFDS's messages span lines
  if len(reason) > 300:
    reason = reason[:300] + " ..."
  return (f"TFDS dataset {name!r} (split {split!r}) is not prepared as array_record files in "
          f"data.tfds_data_dir={where!r}: prepare it once with `bash scripts/prepare_data.sh "
          f"{name} --data_dir={where}`" + (f" (TFDS said: {reason})" if reason else ""))


def _tfds_sources(name: str, data_dir: str, image_size: int, channels: int):
  """(train, test, num_classes) for a TFDS dataset read with tfds.data_source."""
  import tensorflow_datasets as tfds
  spec = TFDS_DATASETS[name.split(":")[0]]

  def open_split(split):
    try:
      return tfds.data_source(name, split=split, data_dir=os.path.expanduser(data_dir) or None,
                              download=False,
                              builder_kwargs={"file_format": "array_record"})
    except Exception as e:
      raise DatasetNotPreparedError(not_prepared_message(
          name, data_dir, split, f"{type(e).__name__}: {e}")) from e

  train = open_split(spec.train_split)
  test = train if spec.eval_split == spec.train_split else open_split(spec.eval_split)
  num_classes = 0
  if spec.label_key:
    num_classes = int(train.dataset_info.features[spec.label_key].num_classes)
  if spec.note:
    logging.info("%s: %s", name, spec.note)
  return (TfdsSource(train, spec, image_size, channels),
          TfdsSource(test, spec, image_size, channels), num_classes)


# ---------------------------------------------------------------------------------------------
# Training iterator.
# ---------------------------------------------------------------------------------------------

class _DrawFlip(grain.transforms.RandomMap):
  """stream record index -> (record index, flip?) with the flip drawn per stream position."""

  def random_map(self, element, rng: np.random.Generator):
    return element, bool(rng.integers(2))


class _NoFlip(grain.transforms.Map):

  def map(self, element):
    return element, False


class _LoadBatch(grain.transforms.Map):
  """(indices [b], flips [b]) -> dict(image=float32 [b, S, S, C] in [-1, 1], label=int32 [b])."""

  def __init__(self, source):
    self.source = source

  def map(self, element):
    indices, flips = element
    records = [self.source[int(i)] for i in indices]
    images = np.stack([image for image, _ in records])
    labels = np.asarray([label for _, label in records], dtype=np.int32)
    flips = np.asarray(flips, dtype=bool)
    images[flips] = images[flips, :, ::-1]  # horizontal: reverse the width axis
    return {"image": images.astype(np.float32) / 127.5 - 1.0, "label": labels}


class TrainIterator:
  """Infinite iterator over this process's part of every global training batch.

  `next(it)` -> dict(image=np.float32 [B_local, S, S, C] in [-1, 1], label=np.int32 [B_local]).
  `get_state()` is a small JSON-serialisable dict whose position is the number of global batches
  consumed; `set_state(state)` makes the following batches exactly those that followed when the
  state was taken, whatever the process count or data.num_workers of either run.
  """

  def __init__(self, source, *, dataset: str, global_batch_size: int, process_index: int,
               process_count: int, seed: int, random_flip: bool, num_workers: int = 0):
    self.local_batch_size = global_batch_size // process_count
    # What fixes the stream: a state saved under other values would point into another stream.
    self._meta = {"dataset": dataset, "num_records": len(source),
                  "global_batch_size": global_batch_size, "seed": seed}
    self._num_workers = num_workers
    ds = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat()
    ds = ds.random_map(_DrawFlip()) if random_flip else ds.map(_NoFlip())
    # Cut the global stream into local-batch-sized pieces; process p takes pieces p, p + P, ...
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    self._batches = ds[process_index::process_count].map(_LoadBatch(source))
    self._it = None  # grain iterator, started on the first next() (after any set_state)
    self._next_batch = 0

  def _start(self):
    """Starts reading at local batch `self._next_batch` (= global batch `self._next_batch`)."""
    threads = max(1, min(8, (os.cpu_count() or 1) // 2))
    it_ds = self._batches[self._next_batch:].to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
    if self._num_workers > 0:
      if not flags.FLAGS.is_parsed():
        # grain's worker start-up reads its absl flags and fails when nobody parsed them
        # (library use outside absl.app, e.g. notebooks and tests): use their defaults.
        flags.FLAGS.mark_as_parsed()
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
    self._it = iter(it_ds)

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    if self._it is None:
      self._start()
    batch = next(self._it)
    self._next_batch += 1
    return batch

  def get_state(self) -> Dict[str, Any]:
    return {**self._meta, "next_batch": self._next_batch}

  def set_state(self, state: Dict[str, Any]):
    # Checkpoint formats may hand back numpy scalars / 0-d arrays for the ints.
    position = np.asarray(state.get("next_batch") if isinstance(state, dict) else None)
    if position.ndim or position.dtype.kind not in "iu" or position < 0:
      raise ValueError(f"not a training-iterator state: {state!r}")
    diff = {k: (state.get(k), v) for k, v in self._meta.items() if state.get(k) != v}
    if diff:
      raise ValueError("cannot restore the input pipeline: the saved state belongs to another "
                       "data stream (saved vs now): " +
                       ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
    self.close()
    self._next_batch = int(position)

  def close(self):
    """Stops grain's background threads and worker processes (next() starts them again)."""
    if self._it is not None:
      self._it.close()
      self._it = None


# ---------------------------------------------------------------------------------------------
# create_datasets.
# ---------------------------------------------------------------------------------------------

class Datasets:
  """What `create_datasets` returns: the training iterator, eval/reference images and info."""

  def __init__(self, train_iter: TrainIterator, train_source, test_source, info: Dict[str, Any],
               process_index: int, process_count: int):
    self.train_iter = train_iter
    self.info = info
    self._train, self._test = train_source, test_source
    self._process_index, self._process_count = process_index, process_count

  def eval_images(self, num: int) -> np.ndarray:
    """This process's share of the first `num` test images: uint8 [num // P, S, S, C].

    Process p gets test images [p * num // P, (p + 1) * num // P): disjoint across processes.
    """
    num = int(num)
    if not 0 <= num <= len(self._test):
      raise ValueError(f"eval_images({num}): the {self.info['dataset']} eval split has "
                       f"{len(self._test)} images; ask for at most that many "
                       "(eval.bpd_num_images)")
    share = num // self._process_count
    start = self._process_index * share
    return _read_images(self._test, range(start, start + share), self.info)

  def reference_images(self, num: int) -> np.ndarray:
    """`num` training images for FID reference statistics: uint8 [num, S, S, C].

    A fixed (seed-independent) uniformly random subset, the same on every process.
    """
    return np.concatenate(list(self.iter_reference_images(num, max(1, int(num)))))

  def iter_reference_images(self, num: int, batch_size: int) -> Iterator[np.ndarray]:
    """The images of `reference_images(num)` in order, as uint8 [<= batch_size, S, S, C]
    chunks (for reference sets too large to hold in memory, e.g. 50k LSUN images)."""
    num, batch_size = int(num), int(batch_size)
    if not 0 <= num <= len(self._train):
      raise ValueError(f"reference_images({num}): the {self.info['dataset']} training split "
                       f"has {len(self._train)} images; ask for at most that many")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    order = grain.MapDataset.range(len(self._train)).shuffle(seed=_REFERENCE_SEED)
    if num == 0:
      yield _read_images(self._train, [], self.info)
    for start in range(0, num, batch_size):
      indices = [order[i] for i in range(start, min(num, start + batch_size))]
      yield _read_images(self._train, indices, self.info)


def _read_images(source, indices: Sequence[int], info) -> np.ndarray:
  """source[i] images for i in indices, read in threads -> uint8 [len(indices), S, S, C]."""
  out = np.zeros((len(indices), info["image_size"], info["image_size"], info["channels"]),
                 np.uint8)
  if len(indices) == 0:
    return out
  ds = grain.MapDataset.source(list(indices)).map(lambda i: source[int(i)][0])
  threads = max(1, min(16, os.cpu_count() or 1))
  for k, image in enumerate(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=4 * threads))):
    out[k] = image
  return out


def create_datasets(config, seed: int = 0, process_index: Optional[int] = None,
                    process_count: Optional[int] = None) -> Datasets:
  """Builds the training iterator, eval images and info for `config.data`.

  Args:
    config: the experiment config, validated (`config_validation.validate_config`: channels,
      image size and the batch size's divisibility by the devices are checked there); uses
      config.data.* and config.training.batch_size, the global batch size.
    seed: seed of the shuffling and flips (>= 0).
    process_index, process_count: default to jax.process_index() / jax.process_count(); pass
      them to simulate several hosts.
  Returns:
    a `Datasets` with `train_iter`, `eval_images(num)`, `reference_images(num)` and `info`
    (num_train, num_test, num_classes, image_size, channels, dataset).
  Raises:
    ValueError: naming the bad config key (dataset, num_classes, path, ...).
    FileNotFoundError: for a missing image folder; DatasetNotPreparedError (a UserError and a
      FileNotFoundError) for an unprepared TFDS dataset.
  """
  data = config.data
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  if config.training.batch_size % process_count:  # process_count may be simulated (tests)
    raise ValueError(f"training.batch_size={config.training.batch_size} is not divisible by "
                     f"the {process_count} processes; use a multiple of {process_count}")
  if seed < 0:
    raise ValueError(f"seed={seed} must be >= 0")
  if data.num_workers < 0:
    raise ValueError(f"data.num_workers={data.num_workers} must be >= 0")

  name = data.dataset
  base = name.split(":")[0]  # allow a pinned TFDS version, e.g. mnist:3.0.1
  if name == "digits":
    train, test = _digits_sources(data.image_size, data.channels)
    num_classes = 10
  elif name == "folder":
    if not data.path:
      raise ValueError("data.path must name a folder of images when data.dataset='folder'")
    train = FolderSource(os.path.expanduser(data.path), data.image_size, data.channels)
    test, num_classes = train, 0
  elif base in TFDS_DATASETS:
    train, test, num_classes = _tfds_sources(name, data.tfds_data_dir, data.image_size,
                                             data.channels)
  else:
    raise ValueError(f"data.dataset={name!r} is not supported; choose one of "
                     f"{', '.join(SUPPORTED_DATASETS)}")
  if data.num_classes and data.num_classes != num_classes:
    have = f"has {num_classes} classes" if num_classes else "has no labels"
    raise ValueError(f"data.num_classes={data.num_classes} but {name} {have}; set "
                     f"data.num_classes={num_classes}")
  if len(train) < config.training.batch_size:
    logging.warning("%s has %d training images, fewer than training.batch_size=%d: batches "
                    "repeat images.", name, len(train), config.training.batch_size)

  info = {"dataset": name, "num_train": len(train), "num_test": len(test),
          "num_classes": num_classes, "image_size": data.image_size,
          "channels": data.channels}
  train_iter = TrainIterator(train, dataset=name, global_batch_size=config.training.batch_size,
                             process_index=process_index, process_count=process_count,
                             seed=int(seed), random_flip=bool(data.random_flip),
                             num_workers=int(data.num_workers))
  logging.info("Input pipeline %s: %d train / %d eval images, %dx%dx%d, %d classes, process "
               "%d/%d reads %d of every %d images per batch.", name, len(train), len(test),
               data.image_size, data.image_size, data.channels, num_classes, process_index,
               process_count, train_iter.local_batch_size, config.training.batch_size)
  return Datasets(train_iter, train, test, info, process_index, process_count)

