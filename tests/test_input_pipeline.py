"""Tests of ddpm/input_pipeline.py: digits, image folders, TFDS (mock data), sharding, resumption
(device prefetch: test_prefetch.py).

Expected values come from closed forms (level mapping, padding, crops, luma), from independent
reads of the raw data (scikit-learn, tfds.data_source) or from invariants (permutations,
disjointness, equality across process counts). Everything is tiny: 8x8..32x32 images.
"""
import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from configs import default
from ddpm import input_pipeline


def make_config(**data):
  config = default.get_config()
  config.training.batch_size = data.pop("batch_size", 16)
  for key, value in data.items():
    config.data[key] = value
  return config


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    np.testing.assert_array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    np.testing.assert_array_equal(np.asarray(x["label"]), np.asarray(y["label"]))


def to_uint8(images):
  """[-1, 1] float batch -> uint8, exact for images that came from uint8."""
  return np.round((np.asarray(images) + 1.0) * 127.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits8():
  """Digits at their native 8x8, global batch 16."""
  return input_pipeline.create_datasets(make_config(dataset="digits", image_size=8), seed=0,
                                        process_index=0, process_count=1)


def sklearn_digits_uint8():
  from sklearn.datasets import load_digits
  d = load_digits()
  return np.round(d.images * 255.0 / 16.0).astype(np.uint8), d.target


def test_digits_shapes_ranges_and_all_1797_images(digits8):
  info = digits8.info
  assert info["num_train"] + info["num_test"] == 1797
  assert (info["num_classes"], info["image_size"], info["channels"]) == (10, 8, 1)
  batch = next(digits8.train_iter)
  assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  # Values lie on the uint8 grid mapped affinely to [-1, 1].
  np.testing.assert_allclose(to_uint8(batch["image"]) / 127.5 - 1.0, batch["image"], atol=1e-6)
  assert batch["label"].min() >= 0 and batch["label"].max() <= 9

  test = digits8.eval_images(info["num_test"])
  train = digits8.reference_images(info["num_train"])
  assert test.dtype == np.uint8 and test.shape == (info["num_test"], 8, 8, 1)
  # Train and test together are exactly scikit-learn's images with 0..16 -> round(v*255/16).
  expected, _ = sklearn_digits_uint8()
  got = sorted(im.tobytes() for im in np.concatenate([train, test])[..., 0])
  assert got == sorted(im.tobytes() for im in expected)
  assert not {im.tobytes() for im in train} & {im.tobytes() for im in test}


def test_digits_split_is_stratified_and_seed_independent(digits8):
  _, labels = sklearn_digits_uint8()
  other = input_pipeline.create_datasets(make_config(dataset="digits", image_size=8), seed=7,
                                         process_index=0, process_count=1)
  n = digits8.info["num_test"]
  np.testing.assert_array_equal(other.eval_images(n), digits8.eval_images(n))
  assert abs(n / 1797 - 0.2) < 0.01
  # One epoch of the training stream is a permutation of the train split: its labels show the
  # class balance (each digit ~10%).
  config = make_config(dataset="digits", image_size=8, batch_size=64)
  ds = input_pipeline.create_datasets(config, seed=0, process_index=0, process_count=1)
  num_batches = -(-ds.info["num_train"] // 64)
  epoch = np.concatenate([b["label"] for b in take(ds.train_iter, num_batches)])
  epoch = epoch[:ds.info["num_train"]]
  counts = np.bincount(epoch, minlength=10)
  np.testing.assert_array_equal(np.sort(counts), np.sort(
      np.bincount(labels, minlength=10) - np.bincount(labels, minlength=10) // 5))
  assert np.all(np.abs(counts / counts.sum() - 0.1) < 0.012)


def test_digits_upsampled_and_rgb():
  ds = input_pipeline.create_datasets(make_config(dataset="digits", image_size=16, channels=3),
                                      seed=0, process_index=0, process_count=1)
  images = ds.eval_images(32)
  assert images.shape == (32, 16, 16, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[..., 0], images[..., 1])
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  # Bicubic upsampling of an all-zero border keeps the border black.
  assert images[:, 0, 0].max() == 0
  assert next(ds.train_iter)["image"].shape == (16, 16, 16, 3)


# ---------------------------------------------------------------------------------------------
# Sharding over processes, shuffling, state.
# ---------------------------------------------------------------------------------------------

def test_two_processes_read_disjoint_halves_of_the_global_batch():
  config = make_config(dataset="digits", image_size=8, batch_size=32)
  whole = input_pipeline.create_datasets(config, seed=3, process_index=0, process_count=1)
  parts = [input_pipeline.create_datasets(config, seed=3, process_index=p, process_count=2)
           for p in range(2)]
  for _ in range(3):
    b0, b1, b = next(parts[0].train_iter), next(parts[1].train_iter), next(whole.train_iter)
    assert b0["image"].shape == (16, 8, 8, 1)
    np.testing.assert_array_equal(np.concatenate([b0["image"], b1["image"]]), b["image"])
    np.testing.assert_array_equal(np.concatenate([b0["label"], b1["label"]]), b["label"])
    assert not {x.tobytes() for x in b0["image"]} & {x.tobytes() for x in b1["image"]}
  # Eval shares: disjoint, together the first `num` test images.
  shares = [p.eval_images(10) for p in parts]
  assert shares[0].shape == (5, 8, 8, 1)
  np.testing.assert_array_equal(np.concatenate(shares), whole.eval_images(10))
  np.testing.assert_array_equal(parts[1].reference_images(4), whole.reference_images(4))
  chunks = list(whole.iter_reference_images(10, 4))
  assert [len(c) for c in chunks] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate(chunks), whole.reference_images(10))


def test_state_restores_exactly_also_in_a_new_pipeline_and_on_another_process_count():
  config = make_config(dataset="digits", image_size=8, batch_size=16, random_flip=True)
  ds = input_pipeline.create_datasets(config, seed=1, process_index=0, process_count=1)
  take(ds.train_iter, 2)
  state = ds.train_iter.get_state()
  state = json.loads(json.dumps(state))  # JSON-serialisable
  after = take(ds.train_iter, 3)
  ds.train_iter.set_state(state)
  assert_batches_equal(take(ds.train_iter, 3), after)

  fresh = input_pipeline.create_datasets(config, seed=1, process_index=0, process_count=1)
  fresh.train_iter.set_state(state)
  assert_batches_equal(take(fresh.train_iter, 3), after)

  halves = [input_pipeline.create_datasets(config, seed=1, process_index=p, process_count=2)
            for p in range(2)]
  for h in halves:
    h.train_iter.set_state(state)
  for b in after:
    np.testing.assert_array_equal(
        np.concatenate([next(h.train_iter)["image"] for h in halves]), b["image"])

  other_seed = input_pipeline.create_datasets(config, seed=2, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="seed"):
    other_seed.train_iter.set_state(state)
  with pytest.raises(ValueError, match="state"):
    other_seed.train_iter.set_state({"next_batch": "x"})


def test_flip_flips_when_on_and_not_when_off():
  images = {}
  for flip in (False, True):
    config = make_config(dataset="digits", image_size=8, batch_size=64, random_flip=flip)
    ds = input_pipeline.create_datasets(config, seed=5, process_index=0, process_count=1)
    images[flip] = np.concatenate([b["image"] for b in take(ds.train_iter, 2)])
    train = {im.tobytes() for im in ds.reference_images(ds.info["num_train"])}
  # Off: every image is a training image as stored.
  assert all(im.tobytes() in train for im in to_uint8(images[False]))
  # On: the same stream, each image either as is or mirrored left-right; both happen.
  same = np.all(images[True] == images[False], axis=(1, 2, 3))
  mirrored = np.all(images[True] == images[False][:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert 0.25 < np.mean(mirrored & ~same) < 0.75


def test_epochs_are_reshuffled_permutations_and_deterministic_given_seed(folder):
  config = make_config(dataset="folder", path=folder, image_size=8, channels=3, batch_size=8)
  ds = input_pipeline.create_datasets(config, seed=0, process_index=0, process_count=1)
  n = ds.info["num_train"]
  stream = to_uint8(np.concatenate([b["image"] for b in take(ds.train_iter, n)]))
  all_images = ds.reference_images(n)
  ids = {im.tobytes(): i for i, im in enumerate(all_images)}
  order = np.asarray([ids[im.tobytes()] for im in stream]).reshape(8, n)  # 8 epochs
  for epoch in order:
    assert sorted(epoch) == list(range(n))
  assert len({tuple(e) for e in order}) > 1
  again = input_pipeline.create_datasets(config, seed=0, process_index=0, process_count=1)
  stream_again = to_uint8(np.concatenate([b["image"] for b in take(again.train_iter, n)]))
  np.testing.assert_array_equal(stream_again, stream)
  other = input_pipeline.create_datasets(config, seed=1, process_index=0, process_count=1)
  assert not np.array_equal(
      to_uint8(np.concatenate([b["image"] for b in take(other.train_iter, n)])), stream)


def test_batch_size_must_divide_over_processes():
  # (Divisibility by the devices, channels and image size: config_validation checks them.)
  with pytest.raises(ValueError, match=r"training\.batch_size=16 .*3 processes"):
    input_pipeline.create_datasets(make_config(batch_size=16), process_index=0, process_count=3)


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="data.num_classes=5"):
    input_pipeline.create_datasets(make_config(num_classes=5), process_index=0, process_count=1)
  with pytest.raises(ValueError, match="data.dataset='imagenette'.*folder.*cifar10.*lsun/bedroom"):
    input_pipeline.create_datasets(make_config(dataset="imagenette"), process_index=0,
                                   process_count=1)


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------

def _save(path, image, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, **kwargs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """7 readable images (odd sizes, modes, nested, mixed-case extensions), 2 broken, 1 text."""
  root = str(tmp_path_factory.mktemp("images"))
  rng = np.random.default_rng(0)
  # 30x20 RGB: green 5-pixel margins left and right of a blue 20x20 centre.
  wide = np.zeros((20, 30, 3), np.uint8)
  wide[:, :, 1] = 255
  wide[:, 5:25] = (0, 0, 255)
  _save(os.path.join(root, "a", "wide.png"), Image.fromarray(wide))
  # RGBA: left half opaque black, right half fully transparent (with red hidden under it).
  rgba = np.zeros((12, 12, 4), np.uint8)
  rgba[:, :6, 3] = 255
  rgba[:, 6:] = (255, 0, 0, 0)
  _save(os.path.join(root, "a", "rgba.png"), Image.fromarray(rgba, "RGBA"))
  # Greyscale JPEG in a nested folder.
  grey = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
  _save(os.path.join(root, "b", "c", "grey.jpg"), Image.fromarray(grey, "L"), quality=95)
  # 16-bit greyscale PNG: 65535 -> 255 and 0 -> 0.
  deep = np.zeros((10, 10), np.uint16)
  deep[:, 5:] = 65535
  _save(os.path.join(root, "b", "deep16.png"), Image.fromarray(deep))
  _save(os.path.join(root, "b", "c", "UPPER.JPEG"),
        Image.fromarray(rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)))
  _save(os.path.join(root, "x.webp"),
        Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)), lossless=True)
  _save(os.path.join(root, "y.BMP"),
        Image.fromarray(rng.integers(0, 256, (40, 11, 3), dtype=np.uint8)))
  with open(os.path.join(root, "a", "broken.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
  with open(os.path.join(root, "b", "truncated.jpg"), "wb") as f:
    f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
  with open(os.path.join(root, "notes.txt"), "w") as f:
    f.write("not an image")
  return root


@pytest.fixture(scope="module")
def folder_source(folder):
  return input_pipeline.FolderSource(folder, 8, 3)


def _image_named(source, name):
  return source[[os.path.basename(p) for p in source.paths].index(name)][0]


def test_folder_skips_unreadable_files_with_a_warning(folder, caplog):
  caplog.set_level(logging.INFO)
  source = input_pipeline.FolderSource(folder, 8, 3)
  assert sorted(os.path.basename(p) for p in source.paths) == sorted(
      ["wide.png", "rgba.png", "grey.jpg", "deep16.png", "UPPER.JPEG", "x.webp", "y.BMP"])
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert sum("broken.png" in w for w in warnings) == 1
  assert sum("truncated.jpg" in w for w in warnings) == 1
  assert any("2 unreadable file(s) skipped" in r.getMessage() for r in caplog.records)
  assert source.num_skipped == 2


def test_folder_preprocessing(folder_source):
  for i in range(len(folder_source)):
    image, label = folder_source[i]
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and label == 0
  # Centre crop removes the green margins: a constant blue square stays constant blue.
  np.testing.assert_array_equal(_image_named(folder_source, "wide.png"),
                                np.broadcast_to(np.uint8([0, 0, 255]), (8, 8, 3)))
  # Transparent pixels become white, opaque black stays black.
  rgba = _image_named(folder_source, "rgba.png").astype(int)
  assert rgba[:, 0].max() <= 1 and rgba[:, -1].min() >= 254
  # Greyscale becomes R = G = B; 16-bit levels are scaled, not clipped.
  grey = _image_named(folder_source, "grey.jpg")
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  deep = _image_named(folder_source, "deep16.png").astype(int)
  assert deep[:, 0].max() <= 1 and deep[:, -1].min() >= 254


def test_folder_greyscale_and_uncached_reads_match(folder, folder_source):
  uncached = input_pipeline.FolderSource(folder, 8, 3, cache_bytes=0)
  assert uncached.images is None
  for i in range(len(folder_source)):
    np.testing.assert_array_equal(uncached[i][0], folder_source[i][0])
  grey = input_pipeline.FolderSource(folder, 8, 1)
  rgb = _image_named(folder_source, "y.BMP").astype(np.float64)
  luma = rgb @ np.asarray([0.299, 0.587, 0.114])  # ITU-R 601-2, as PIL's RGB -> L
  got = _image_named(grey, "y.BMP")
  assert got.shape == (8, 8, 1)
  # Conversion happens before the resize; both are linear up to rounding and clipping.
  np.testing.assert_allclose(got[..., 0], luma, atol=3)


def test_folder_dataset_end_to_end(folder):
  config = make_config(dataset="folder", path=folder, image_size=8, channels=3, batch_size=8)
  ds = input_pipeline.create_datasets(config, seed=0, process_index=0, process_count=1)
  assert ds.info["num_train"] == ds.info["num_test"] == 7 and ds.info["num_classes"] == 0
  batch = next(ds.train_iter)
  assert batch["image"].shape == (8, 8, 8, 3)
  np.testing.assert_array_equal(batch["label"], np.zeros(8, np.int32))
  assert ds.eval_images(7).shape == (7, 8, 8, 3)
  with pytest.raises(ValueError, match="eval_images\\(8\\).*7"):
    ds.eval_images(8)


def test_folder_errors(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope.*\\.png"):
    input_pipeline.create_datasets(make_config(dataset="folder", path=missing),
                                   process_index=0, process_count=1)
  empty = tmp_path / "empty"
  (empty / "sub").mkdir(parents=True)
  (empty / "readme.txt").write_text("no images here")
  with pytest.raises(ValueError, match="empty.*\\.png, \\.jpg, \\.jpeg, \\.webp, \\.bmp"):
    input_pipeline.create_datasets(make_config(dataset="folder", path=str(empty)),
                                   process_index=0, process_count=1)
  (empty / "sub" / "bad.jpg").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="none of the 1 image file"):
    input_pipeline.create_datasets(make_config(dataset="folder", path=str(empty)),
                                   process_index=0, process_count=1)


def test_folder_palette_transparency_and_symlink_loop(tmp_path):
  # A palette PNG whose index 0 is transparent: composited on white like RGBA.
  pal = Image.fromarray(np.tile(np.uint8([0, 1]), (4, 2)), "P")
  pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
  pal.info["transparency"] = 0
  _save(str(tmp_path / "pal.png"), pal, transparency=0)
  os.symlink(str(tmp_path), str(tmp_path / "loop"))  # a cycle: walked once
  source = input_pipeline.FolderSource(str(tmp_path), 4, 3)
  assert len(source) == 1
  image = source[0][0].astype(int)
  assert image[:, 0].min() >= 254  # transparent red -> white
  assert image[:, -1, 2].min() >= 250 and image[:, -1, :2].max() <= 5  # opaque blue stays


# ---------------------------------------------------------------------------------------------
# TFDS (mock data: no files, no network, no TensorFlow)
# ---------------------------------------------------------------------------------------------

tfds = pytest.importorskip("tensorflow_datasets")


def test_tfds_mnist_padded_to_32_with_labels():
  with tfds.testing.mock_data(num_examples=24):
    ds = input_pipeline.create_datasets(make_config(dataset="mnist", image_size=32, channels=1),
                                        seed=0, process_index=0, process_count=1)
    assert ds.info["num_classes"] == 10 and ds.info["num_train"] == 24
    batch = next(ds.train_iter)
    assert batch["image"].shape == (16, 32, 32, 1) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["label"].min() >= 0 and batch["label"].max() < 10
    raw = tfds.data_source("mnist", split="test")
    expected = np.stack([np.pad(raw[i]["image"], ((2, 2), (2, 2), (0, 0))) for i in range(4)])
    np.testing.assert_array_equal(ds.eval_images(4), expected)


def test_tfds_cifar10_greyscale_is_luma():
  with tfds.testing.mock_data(num_examples=16):
    ds = input_pipeline.create_datasets(make_config(dataset="cifar10", image_size=32,
                                                    channels=1), seed=0,
                                        process_index=0, process_count=1)
    raw = tfds.data_source("cifar10", split="test")
    rgb = np.stack([raw[i]["image"] for i in range(3)]).astype(np.float64)
    luma = rgb @ np.asarray([0.299, 0.587, 0.114])
    np.testing.assert_allclose(ds.eval_images(3)[..., 0], luma, atol=1.0)
    assert ds.info["num_classes"] == 10


def test_tfds_celeb_a_centre_crop_140():
  with tfds.testing.mock_data(num_examples=8):
    ds = input_pipeline.create_datasets(make_config(dataset="celeb_a", image_size=140,
                                                    channels=3, batch_size=8), seed=0,
                                        process_index=0, process_count=1)
    raw = tfds.data_source("celeb_a", split="test")[0]["image"]
    assert raw.shape == (218, 178, 3)
    np.testing.assert_array_equal(ds.eval_images(1)[0], raw[39:179, 19:159])
    assert ds.info["num_classes"] == 0
    np.testing.assert_array_equal(next(ds.train_iter)["label"], np.zeros(8, np.int32))


@pytest.mark.parametrize("name", ["lsun/church_outdoor", "downsampled_imagenet/64x64",
                                  "celeb_a_hq/256", "fashion_mnist"])
def test_tfds_other_datasets_square_crop_and_resize(name):
  with tfds.testing.mock_data(num_examples=8):
    ds = input_pipeline.create_datasets(make_config(dataset=name, image_size=16, channels=3,
                                                    batch_size=8), seed=0,
                                        process_index=0, process_count=1)
    batch = next(ds.train_iter)
    assert batch["image"].shape == (8, 16, 16, 3)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert ds.eval_images(2).shape == (2, 16, 16, 3)


# ---------------------------------------------------------------------------------------------
# Slow: grain worker processes, and two real JAX processes.
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_grain_worker_processes_give_the_same_stream_and_state():
  config = make_config(dataset="digits", image_size=8, batch_size=16, random_flip=True)
  inline = input_pipeline.create_datasets(config, seed=2, process_index=0, process_count=1)
  expected = take(inline.train_iter, 6)
  config.data.num_workers = 2
  ds = input_pipeline.create_datasets(config, seed=2, process_index=0, process_count=1)
  try:
    assert_batches_equal(take(ds.train_iter, 3), expected[:3])
    state = ds.train_iter.get_state()
    assert_batches_equal(take(ds.train_iter, 3), expected[3:])
    inline.train_iter.set_state(state)  # states are the same with and without workers
    assert_batches_equal(take(inline.train_iter, 3), expected[3:])
  finally:
    ds.train_iter.close()


_TWO_PROCESS_SCRIPT = r"""
import os, sys
process_id, port = int(sys.argv[1]), sys.argv[2]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address="127.0.0.1:" + port, num_processes=2,
                           process_id=process_id)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from configs import default
from ddpm import input_pipeline, prefetch

config = default.get_config()
config.data.dataset, config.data.image_size, config.data.random_flip = "digits", 8, True
config.training.batch_size = 16
mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
ds = input_pipeline.create_datasets(config, seed=3)  # process index/count from JAX
with prefetch.prefetch_to_mesh(ds.train_iter, NamedSharding(mesh, P(None, "data")),
                               stack=2) as batches:
  got = [multihost_utils.process_allgather(next(batches)["image"], tiled=True)
         for _ in range(2)]
whole = input_pipeline.create_datasets(config, seed=3, process_index=0, process_count=1)
raw = [next(whole.train_iter)["image"] for _ in range(4)]
assert got[0].shape == (2, 16, 8, 8, 1), got[0].shape
np.testing.assert_array_equal(np.concatenate(got), np.stack(raw))
print("OK", process_id, ds.train_iter.local_batch_size)
"""


@pytest.mark.slow
def test_two_jax_processes_feed_one_global_batch(tmp_path):
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  script = tmp_path / "two_process.py"
  script.write_text(_TWO_PROCESS_SCRIPT)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=root)
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out[-3000:]
    assert f"OK {i} 8" in out
