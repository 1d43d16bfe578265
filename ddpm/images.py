"""Writing images: uint8 conversion, sample grids (PNG), progression animations (GIF), npz.

Images are NHWC; float images are in [-1, 1] (the model's data space), uint8 ones in [0, 255].
All writers write the whole file at once through `ddpm.workdir.write_bytes` (locally a temporary
file renamed into place, creating parent directories; on gs:// / s3:// one object), so a reader
never sees half a file, and return the path. They write from the calling process
only: in multi-process runs call them on process 0.
"""
import io
import math
from typing import Optional

import jax.numpy as jnp
import numpy as np
from PIL import Image

from ddpm import workdir


def to_uint8(x) -> np.ndarray:
  """[-1, 1] floats -> uint8 in [0, 255], rounding to nearest and clipping out-of-range values.

  Args:
    x: float array [..., H, W, C] (numpy or jax).
  Returns:
    uint8 numpy array of the same shape; -1 -> 0, 1 -> 255, 0 -> 128 (127.5 rounds to even).
  """
  x = np.asarray(x)
  if not _is_float(x.dtype):
    raise ValueError(f"to_uint8 expects floats in [-1, 1], got dtype {x.dtype}")
  # float64 (exact for every float32/float16/bfloat16 value) so all dtypes round alike.
  x = x.astype(np.float64)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"to_uint8: {int(np.sum(~np.isfinite(x)))} non-finite value(s) in the "
                     f"images of shape {x.shape}")
  return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _is_float(dtype) -> bool:
  # jnp.issubdtype also knows the ml_dtypes floats (bfloat16) that numpy's does not.
  return bool(jnp.issubdtype(dtype, jnp.floating))


def _as_uint8_images(x, name: str = "x") -> np.ndarray:
  """uint8 input unchanged, float input through `to_uint8`; anything else is an error."""
  x = np.asarray(x)
  if x.dtype == np.uint8:
    return x
  if _is_float(x.dtype):
    return to_uint8(x)
  raise ValueError(f"{name} must be uint8 in [0, 255] or float in [-1, 1], got dtype {x.dtype}")


def _check_ncol(ncol, n: int) -> int:
  if ncol is None:
    return max(1, math.ceil(math.sqrt(n)))
  if isinstance(ncol, bool) or not isinstance(ncol, (int, np.integer)) or ncol < 1:
    raise ValueError(f"ncol must be a positive int or None, got {ncol!r}")
  return int(ncol)


def make_grid(x_uint8, ncol: Optional[int] = None, padding: int = 2,
              pad_value: int = 255) -> np.ndarray:
  """Tiles N images into one, row-major, with `padding` pixels around and between them.

  Args:
    x_uint8: uint8 [N, H, W, C].
    ncol: images per row (default ceil(sqrt(N))); the last row may be partly empty.
    padding: border width in pixels (also outside the first/last row and column).
    pad_value: uint8 value of the border and of empty cells.
  Returns:
    uint8 [rows * (H + padding) + padding, ncol * (W + padding) + padding, C], where
    rows = ceil(N / ncol); image i has its top-left pixel at
    (padding + (i // ncol) * (H + padding), padding + (i % ncol) * (W + padding)).
  """
  x = np.asarray(x_uint8)
  if x.dtype != np.uint8:
    raise ValueError(f"make_grid expects uint8 images (use to_uint8 first), got dtype {x.dtype}")
  if x.ndim != 4 or x.shape[0] == 0:
    raise ValueError(f"make_grid expects [N, H, W, C] with N >= 1, got shape {x.shape}")
  if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
    raise ValueError(f"padding must be an int >= 0, got {padding!r}")
  if isinstance(pad_value, bool) or not isinstance(pad_value, (int, np.integer)) or not (
      0 <= pad_value <= 255):
    raise ValueError(f"pad_value must be an int in [0, 255], got {pad_value!r}")
  n, h, w, c = x.shape
  ncol = min(_check_ncol(ncol, n), n)
  nrow = math.ceil(n / ncol)
  grid = np.full((nrow * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value,
                 np.uint8)
  for i in range(n):
    top = padding + (i // ncol) * (h + padding)
    left = padding + (i % ncol) * (w + padding)
    grid[top:top + h, left:left + w] = x[i]
  return grid


def _to_pil(grid: np.ndarray) -> Image.Image:
  """uint8 [H, W, C] -> PIL image: C=1 'L', C=3 'RGB', C=4 'RGBA' (Pillow infers the mode)."""
  c = grid.shape[-1]
  if c not in (1, 3, 4):
    raise ValueError(f"images must have 1, 3 or 4 channels to be written, got {c}")
  return Image.fromarray(grid[..., 0] if c == 1 else grid)


def save_grid(path, x, ncol: Optional[int] = None, padding: int = 2) -> str:
  """Writes a grid of images as a PNG (C=1 as greyscale 'L', C=3 as RGB).

  Args:
    path: destination file (parent directories are created).
    x: [N, H, W, C] float in [-1, 1] or uint8.
    ncol: images per row (default ceil(sqrt(N))).
    padding: white border width in pixels.
  Returns:
    `path` as a string.
  """
  grid = make_grid(_as_uint8_images(x), ncol=ncol, padding=padding)
  buf = io.BytesIO()
  _to_pil(grid).save(buf, format="PNG")
  return workdir.write_bytes(path, buf.getvalue())


def save_gif(path, frames, duration_ms: int = 80, ncol: Optional[int] = None,
             hold_last_ms: int = 2000, padding: int = 2) -> str:
  """Writes an animation whose frame f is the grid of frames[f] (e.g. x_T ... x_0 of a sampler).

  As in the progression figures of Ho et al. (2020), the final frame (the samples) is held for
  `hold_last_ms`, and the animation loops. Note: Pillow merges consecutive identical frames into
  one longer frame, so a GIF may hold fewer frames than F (the total duration is unchanged).
  RGB frames are quantised to GIF's 256-colour palette; greyscale frames are exact.

  Args:
    path: destination .gif (parent directories are created).
    frames: [F, N, H, W, C] float in [-1, 1] or uint8.
    duration_ms: display time of every frame but the last.
    ncol: images per row of each grid.
    hold_last_ms: display time of the last frame.
    padding: border width of each grid.
  Returns:
    `path` as a string.
  """
  frames = _as_uint8_images(frames, "frames")
  if frames.ndim != 5 or frames.shape[0] == 0:
    raise ValueError(f"save_gif expects frames [F, N, H, W, C] with F >= 1, got shape "
                     f"{frames.shape} (a single image's progression is frames[:, None])")
  for name, value in (("duration_ms", duration_ms), ("hold_last_ms", hold_last_ms)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int (milliseconds), got {value!r}")
  images = [_to_pil(make_grid(f, ncol=ncol, padding=padding)) for f in frames]
  durations = [int(duration_ms)] * (len(images) - 1) + [int(hold_last_ms)]
  buf = io.BytesIO()
  images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                 duration=durations, loop=0)
  return workdir.write_bytes(path, buf.getvalue())


def save_npz(path, images_uint8, **extra) -> str:
  """Writes `images` (uint8 [N, H, W, C]) and `extra` arrays to an .npz file, atomically.

  The layout ('images' key, uint8 NHWC) is what FID tools expect of sample batches.
  Returns:
    `path` as a string (written as given: no '.npz' is appended).
  """
  x = np.asarray(images_uint8)
  if x.dtype != np.uint8 or x.ndim != 4:
    raise ValueError(f"save_npz expects uint8 images [N, H, W, C] (use to_uint8 first), got "
                     f"dtype {x.dtype} shape {x.shape}")
  if "images" in extra:
    raise ValueError("save_npz: 'images' is the key of the images argument; rename the extra "
                     "array")
  return workdir.write_bytes(path, workdir.npz_bytes(images=x, **{k: np.asarray(v) for k, v in
                                                                extra.items()}))
