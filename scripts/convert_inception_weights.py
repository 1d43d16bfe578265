"""Converts pytorch-fid's FID Inception weights (.pth) into the .npz that ddpm-jax reads.

One-off, and the only place PyTorch is needed (it is not a ddpm-jax dependency):
  .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu   # temporarily
  .venv/bin/python scripts/convert_inception_weights.py \
      --input=pt_inception-2015-12-05-6726825d.pth
writes ~/.cache/ddpm_jax/pt_inception-2015-12-05-6726825d.npz, where `inception.get_weights_path`
finds it (or pass --output and point config.eval.inception_weights at it).

The .npz keeps the PyTorch state_dict names and layouts ('Conv2d_1a_3x3.conv.weight' as OIHW);
`inception.load_params` converts them to Flax. The input's SHA-256 is checked against the prefix
in its published file name, and the result is checked to load into the Flax network.
With --compare_with_pytorch_fid (needs `pip install pytorch-fid`), pytorch-fid's network and the
Flax one are also run on random images with these weights and their features compared.
"""
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm import inception  # pylint: disable=g-import-not-at-top,wrong-import-position

_INPUT = flags.DEFINE_string("input", None, f"pytorch-fid's {inception.FID_WEIGHTS_FILENAME}.")
_OUTPUT = flags.DEFINE_string(
    "output", os.path.join(inception.DEFAULT_CACHE_DIR, inception.CONVERTED_WEIGHTS_FILENAME),
    "Where to write the .npz.")
_SKIP_HASH_CHECK = flags.DEFINE_bool(
    "skip_hash_check", False, "Convert a file that is not the published one (e.g. own weights "
    "with the same architecture); its names and shapes are still checked.")
_COMPARE = flags.DEFINE_bool(
    "compare_with_pytorch_fid", False,
    "Also run pytorch-fid's network and the Flax one on random images and compare features.")
flags.mark_flag_as_required("input")


def _compare_with_pytorch_fid(state_dict, variables, num_images=4, size=64, seed=0):
  """Max relative differences (pool3, logits) of Flax vs pytorch-fid on random uint8 images."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  try:
    from pytorch_fid import inception as pfi  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit("--compare_with_pytorch_fid needs pytorch-fid: pip install pytorch-fid")
  # pytorch-fid's fid_inception_v3() without its download: the same blocks, our weights.
  net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # pylint: disable=protected-access
  net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = pfi.FIDInceptionE_1(1280)
  net.Mixed_7c = pfi.FIDInceptionE_2(2048)
  net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()},
                      strict=False)
  net.eval()
  images = np.random.default_rng(seed).integers(0, 256, (num_images, size, size, 3), np.uint8)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid's input
    x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                 "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
                 "Mixed_7c", "avgpool"):
      x = getattr(net, name)(x)
    pool_t = x.flatten(1)
    logits_t = pool_t @ net.fc.weight.T
  pool_j, logits_j = jax.jit(inception.InceptionV3().apply)(variables, images)
  rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - b.numpy())) / np.max(np.abs(b.numpy())))
  return rel(pool_j, pool_t), rel(logits_j, logits_t)


def main(argv):
  del argv
  try:
    _convert()
  except inception.InceptionWeightsError as e:
    sys.exit(f"convert_inception_weights.py: {e}")


def _convert():
  import numpy as np  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(_INPUT.value)
  if not os.path.isfile(path):
    sys.exit(f"--input={path}: no such file. Download it from {inception.FID_WEIGHTS_URL}")
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    sys.exit("convert_inception_weights.py needs PyTorch to read .pth files, and torch is not "
             "installed (it is not a ddpm-jax dependency). Install it for this one conversion, "
             "e.g. `.venv/bin/pip install torch --index-url "
             "https://download.pytorch.org/whl/cpu`, or run this script anywhere torch and the "
             "ddpm-jax requirements are installed, then copy the .npz.")
  if _SKIP_HASH_CHECK.value:
    print(f"not checking the SHA-256 of {path} (--skip_hash_check)")
  else:
    inception.verify_sha256(path, inception.FID_WEIGHTS_SHA256_PREFIX)
    print(f"SHA-256 of {path} starts with {inception.FID_WEIGHTS_SHA256_PREFIX}: ok")

  state_dict = inception.read_torch_state_dict(path)
  # Fails naming the key if anything is missing, extra or of the wrong shape.
  variables = inception.variables_from_state_dict(state_dict, source=path)
  arrays = {k: v for k, v in state_dict.items()
            if not k.endswith(inception._IGNORED_TORCH_SUFFIXES)}  # pylint: disable=protected-access

  output = os.path.expanduser(_OUTPUT.value)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = output + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, output)  # atomic: get_weights_path never sees a partial file
  inception.load_params(output)  # the written file reads back through the normal path
  print(f"wrote {output}: {len(arrays)} arrays, "
        f"{sum(int(np.prod(v.shape)) for v in arrays.values()):,} values")

  if _COMPARE.value:
    pool_rel, logits_rel = _compare_with_pytorch_fid(state_dict, variables)
    print(f"Flax vs pytorch-fid on random images: max relative difference pool3 {pool_rel:.2e}, "
          f"logits {logits_rel:.2e}")
    if max(pool_rel, logits_rel) > 1e-4:
      sys.exit("the Flax network disagrees with pytorch-fid: do not use these FIDs")


if __name__ == "__main__":
  app.run(main)
