"""Builds one TFDS dataset of the configs as array_record files (run by scripts/prepare_data.sh).

  python scripts/prepare_data.py NAME [--data_dir=DIR] [--manual_dir=DIR] [--check]

`--check` (any python3, standard library only; the shell script runs it before installing
anything) validates NAME and the flags, and for the datasets TFDS builds only from files you
download yourself, that those files are in the manual dir. Without `--check` (in the preparation
env of scripts/requirements-prepare.txt, which has TensorFlow) it runs TFDS's own builder with
file_format='array_record', opens every split the way the input pipeline does
(`tfds.data_source`) and prints the `--config.data.tfds_data_dir=...` flag to train with.

Directories follow TFDS: DIR defaults to $TFDS_DATA_DIR, else ~/tensorflow_datasets; the manual dir
defaults to DIR/downloads/manual. A file TFDS would download can also be put in the manual dir
under its original file name (e.g. cifar-10-binary.tar.gz): TFDS then uses it instead of
downloading, after checking its sha256.
"""
import os
import sys

USAGE = "usage: bash scripts/prepare_data.sh NAME [--data_dir=DIR] [--manual_dir=DIR]"
PROG = "prepare_data.sh"

# Every TFDS dataset the configs name (ddpm.input_pipeline.TFDS_DATASETS; a test keeps them equal).
DATASETS = ("mnist", "fashion_mnist", "cifar10", "celeb_a", "celeb_a_hq/256",
            "lsun/church_outdoor", "lsun/bedroom", "downsampled_imagenet/32x32",
            "downsampled_imagenet/64x64")

_IMAGENET_SMALL = ("the original Downsampled ImageNet archives of van den Oord et al. 2016, "
                   "which image-net.org/small no longer serves; TFDS issue #4662 points to a "
                   "torrent; TFDS checks their sha256")
# Datasets TFDS builds only from files downloaded by hand: {name: (file names, what they are)}.
MANUAL_FILES = {
    "celeb_a_hq/256": (("data256x256.tar",),
                       "a tar archive of the 30,000 CelebA-HQ images as 256x256 RGB PNG files; "
                       "make CelebA-HQ as https://github.com/tkarras/progressive_growing_of_gans"
                       "#preparing-datasets-for-training describes"),
    "downsampled_imagenet/32x32": (("train_32x32.tar", "valid_32x32.tar"), _IMAGENET_SMALL),
    "downsampled_imagenet/64x64": (("train_64x64.tar", "valid_64x64.tar"), _IMAGENET_SMALL),
}


class UsageError(Exception):
  """A bad argument or a missing manual file: printed as `prepare_data.sh: <message>`."""


def default_data_dir() -> str:
  """TFDS's default data_dir: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")


def parse_args(argv):
  """argv (without the program) -> (name, data_dir, manual_dir, check); absolute paths."""
  name, values, check = None, {}, False
  args = list(argv)
  while args:
    arg = args.pop(0)
    if arg == "--check":
      check = True
    elif arg.startswith("--"):
      key, eq, value = arg[2:].partition("=")
      if key not in ("data_dir", "manual_dir"):
        raise UsageError(f"unknown flag {arg!r}; {USAGE}")
      if not eq:
        if not args:
          raise UsageError(f"--{key} needs a directory; {USAGE}")
        value = args.pop(0)
      if not value:
        raise UsageError(f"--{key} needs a directory; {USAGE}")
      values[key] = value
    elif name is None:
      name = arg
    else:
      raise UsageError(f"one dataset at a time, got {name!r} and {arg!r}; {USAGE}")
  if name is None:
    raise UsageError(f"which dataset? {USAGE}; NAME: one of {', '.join(DATASETS)}")
  if name.split(":")[0] not in DATASETS:  # NAME may pin a version, e.g. mnist:3.0.1
    raise UsageError(f"unknown dataset {name!r}; supported: {', '.join(DATASETS)}")
  data_dir = os.path.abspath(os.path.expanduser(values.get("data_dir") or default_data_dir()))
  manual_dir = os.path.abspath(os.path.expanduser(
      values.get("manual_dir") or os.path.join(data_dir, "downloads", "manual")))
  return name, data_dir, manual_dir, check


def check_manual_files(name: str, manual_dir: str):
  """Raises UsageError naming every manually downloaded file `name` needs and lacks."""
  files, what = MANUAL_FILES.get(name.split(":")[0], ((), ""))
  missing = [f for f in files if not os.path.isfile(os.path.join(manual_dir, f))]
  if missing:
    raise UsageError(
        f"{name} is built from files you download yourself, which TFDS cannot download: "
        f"{', '.join(missing)} ({what}) must be in {manual_dir}; put them there (or pass "
        "--manual_dir=DIR) and run this again")


def _provide_lmdb_reader():
  """Lets TFDS's LSUN builder read its LMDB files without tensorflow-io.

  The builder reads them with `tensorflow_io.IODataset.from_lmdb(path)`, but tensorflow-io's
  newest release (0.37.1) was built for TF 2.16 and its ops fail to load in TF 2.21 (undefined
  symbol). That one function is given here instead, with the same records: (key, value) byte
  strings in the LMDB's key order, as a tf.data.Dataset, read with the `lmdb` package.
  """
  try:
    import tensorflow_io  # noqa: F401  (a working install is used as it is)
    return
  except Exception:  # pylint: disable=broad-except
    pass
  import types
  import lmdb
  import tensorflow as tf

  def from_lmdb(path):
    def records():
      env = lmdb.open(os.path.dirname(path), readonly=True, lock=False, readahead=False)
      try:
        with env.begin() as txn:
          yield from txn.cursor()
      finally:
        env.close()
    spec = tf.TensorSpec([], tf.string)
    return tf.data.Dataset.from_generator(records, output_signature=(spec, spec))

  sys.modules["tensorflow_io"] = types.SimpleNamespace(
      IODataset=types.SimpleNamespace(from_lmdb=from_lmdb))


def build(name: str, data_dir: str, manual_dir: str):
  """Runs TFDS's builder of `name` into data_dir as array_record; returns {split: examples}."""
  import tensorflow_datasets as tfds  # the preparation env only
  if name.startswith("lsun/"):
    _provide_lmdb_reader()
  existing = tfds.builder(name, data_dir=data_dir)
  if existing.is_prepared() and existing.info.file_format.value != "array_record":
    # Prepared earlier by `tfds build` / `tfds.load` in the default tfrecord format, which
    # tfds.data_source cannot read (and TFDS will not rewrite in place).
    raise UsageError(f"{existing.data_dir} already holds {name} as "
                     f"{existing.info.file_format.value} files, which the input pipeline cannot "
                     "read: delete that folder (or pick another --data_dir) and run this again")
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  import requests  # a dependency of TFDS's downloader
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except (tfds.download.DownloadError, requests.RequestException) as e:
    url = getattr(getattr(e, "request", None), "url", None) or "a source file"
    reason = " ".join(str(e).split())[:300]
    raise UsageError(
        f"TFDS could not download {url} ({type(e).__name__}: {reason}). Without access to it, "
        f"download {name}'s source files elsewhere and put them into {manual_dir} under their "
        "original file names (TFDS uses them after checking their sha256), then run this "
        "again") from e
  counts = {}
  for split in builder.info.splits:
    # Read back exactly as ddpm.input_pipeline does (no TensorFlow involved).
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                              builder_kwargs={"file_format": "array_record"})
    counts[split] = len(source)
    if counts[split]:
      source[0]  # pylint: disable=pointless-statement
  return counts


def main(argv) -> int:
  if any(a in ("-h", "--help") for a in argv):
    print(f"{USAGE}\n  NAME: one of {', '.join(DATASETS)}")
    return 3 if "--check" in argv else 0  # 3: the shell script stops there, successfully
  try:
    name, data_dir, manual_dir, check = parse_args(argv)
    check_manual_files(name, manual_dir)
    if check:
      return 0
    print(f"[prepare_data] building {name} into {data_dir} (array_record; manual dir "
          f"{manual_dir})", flush=True)
    counts = build(name, data_dir, manual_dir)
  except UsageError as e:
    print(f"{PROG}: {e}", file=sys.stderr)
    return 1
  splits = ", ".join(f"{split} {n}" for split, n in sorted(counts.items()))
  print(f"[prepare_data] {name} is ready in {data_dir} ({splits} examples). Train with:")
  print(f"--config.data.tfds_data_dir={data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
