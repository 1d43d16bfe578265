"""Tests of ddpm/images.py: uint8 conversion, grid layout, PNG/GIF/npz files re-read."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm import images


def _distinct_uint8(n, h, w, c, seed=0):
  """Images whose every pixel encodes (image, row, col, channel) modulo 256: easy to trace."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def test_to_uint8_endpoints_and_clipping():
  x = np.array([-1.0, 0.0, 1.0, -3.0, 2.5, 1.0 / 127.5 - 1.0, 0.999], np.float32)
  got = images.to_uint8(x)
  assert got.dtype == np.uint8
  # Independent float64 reference: round((x + 1) * 255 / 2), clipped to [0, 255].
  want = np.clip(np.round((x.astype(np.float64) + 1.0) * 255.0 / 2.0), 0, 255)
  np.testing.assert_array_equal(got, want.astype(np.uint8))
  assert got[0] == 0 and got[2] == 255 and got[3] == 0 and got[4] == 255 and got[5] == 1
  assert got[1] in (127, 128)  # 127.5 is a tie


def test_to_uint8_dtypes_and_shape():
  x = jnp.linspace(-1, 1, 2 * 3 * 4 * 1).reshape(2, 3, 4, 1)
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    got = images.to_uint8(x.astype(dtype))
    assert got.shape == (2, 3, 4, 1) and got.dtype == np.uint8
    assert got.min() == 0 and got.max() == 255
    assert np.all(np.diff(got.reshape(-1).astype(int)) >= 0)  # monotone in x


def test_to_uint8_rejects_bad_input():
  with pytest.raises(ValueError, match="uint8"):
    images.to_uint8(np.zeros((2, 2), np.uint8))
  with pytest.raises(ValueError, match="non-finite"):
    images.to_uint8(np.array([0.0, np.nan]))


@pytest.mark.parametrize("n,ncol,padding", [(7, 3, 2), (4, None, 1), (5, 8, 0), (1, None, 3)])
def test_make_grid_layout(n, ncol, padding):
  h, w, c = 5, 4, 3
  x = _distinct_uint8(n, h, w, c, seed=n)
  grid = images.make_grid(x, ncol=ncol, padding=padding, pad_value=7)
  cols = min(ncol or int(np.ceil(np.sqrt(n))), n)
  rows = -(-n // cols)
  assert grid.shape == (rows * (h + padding) + padding, cols * (w + padding) + padding, c)
  covered = np.zeros(grid.shape[:2], bool)
  for i in range(n):
    top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
    np.testing.assert_array_equal(grid[top:top + h, left:left + w], x[i])
    covered[top:top + h, left:left + w] = True
  # Everything that is not an image (borders, gaps, empty cells of the last row) is padding.
  assert np.all(grid[~covered] == 7)


def test_make_grid_rejects_bad_input():
  with pytest.raises(ValueError, match="uint8"):
    images.make_grid(np.zeros((2, 4, 4, 1), np.float32))
  with pytest.raises(ValueError, match="shape"):
    images.make_grid(np.zeros((4, 4, 1), np.uint8))
  with pytest.raises(ValueError, match="ncol"):
    images.make_grid(np.zeros((2, 4, 4, 1), np.uint8), ncol=0)
  with pytest.raises(ValueError, match="pad_value"):
    images.make_grid(np.zeros((2, 4, 4, 1), np.uint8), pad_value=300)


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_save_grid_png_round_trip(tmp_path, channels, mode):
  x = np.random.default_rng(channels).uniform(-1.2, 1.2, size=(6, 8, 8, channels))
  path = images.save_grid(tmp_path / "a" / "b" / "grid.png", x, ncol=3)
  assert path == str(tmp_path / "a" / "b" / "grid.png")
  with Image.open(path) as im:
    assert im.format == "PNG" and im.mode == mode
    got = np.asarray(im)
  want = images.make_grid(images.to_uint8(x), ncol=3)
  np.testing.assert_array_equal(got.reshape(want.shape), want)
  # uint8 input is written as is.
  u = _distinct_uint8(3, 8, 8, channels)
  with Image.open(images.save_grid(tmp_path / "u.png", u)) as im:
    np.testing.assert_array_equal(np.asarray(im).reshape(-1), images.make_grid(u).reshape(-1))
  assert sorted(os.listdir(tmp_path)) == ["a", "u.png"]  # no temporary files left behind


def test_save_gif_frames_and_durations(tmp_path):
  f, n = 5, 4
  # Greyscale frames that all differ (Pillow merges identical consecutive frames).
  frames = np.stack([_distinct_uint8(n, 8, 8, 1, seed=s) for s in range(f)])
  path = images.save_gif(tmp_path / "p.gif", frames, duration_ms=40, ncol=2, hold_last_ms=900)
  with Image.open(path) as im:
    assert im.format == "GIF" and im.n_frames == f
    durations, decoded = [], []
    for i in range(f):
      im.seek(i)
      durations.append(im.info["duration"])
      decoded.append(np.asarray(im.convert("L")))
  assert durations == [40] * (f - 1) + [900]
  for i in range(f):  # greyscale GIF frames are exact
    np.testing.assert_array_equal(decoded[i], images.make_grid(frames[i], ncol=2)[..., 0])


def test_save_gif_float_rgb_and_bad_shape(tmp_path):
  frames = np.random.default_rng(0).uniform(-1, 1, size=(3, 2, 8, 8, 3)).astype(np.float32)
  with Image.open(images.save_gif(tmp_path / "rgb.gif", frames)) as im:
    assert im.n_frames == 3
    assert im.size == images.make_grid(images.to_uint8(frames[0])).shape[1::-1]
  with pytest.raises(ValueError, match=r"\[F, N, H, W, C\]"):
    images.save_gif(tmp_path / "bad.gif", frames[0])


def test_save_npz_round_trip(tmp_path):
  x = _distinct_uint8(5, 8, 8, 3)
  labels = np.arange(5, dtype=np.int32)
  path = images.save_npz(tmp_path / "s" / "samples.npz", x, labels=labels)
  with np.load(path) as data:
    assert sorted(data.files) == ["images", "labels"]
    assert data["images"].dtype == np.uint8
    np.testing.assert_array_equal(data["images"], x)
    np.testing.assert_array_equal(data["labels"], labels)
  assert os.listdir(tmp_path / "s") == ["samples.npz"]
  with pytest.raises(ValueError, match="uint8"):
    images.save_npz(tmp_path / "f.npz", x.astype(np.float32))
  with pytest.raises(ValueError, match="images"):
    images.save_npz(tmp_path / "f.npz", x, images=x)
