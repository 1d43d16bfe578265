"""Tests of ddpm/inception.py: the FID Inception-v3's architecture, weight loading and weight files.

The expected PyTorch state_dict (names and shapes) is written out below independently of the
Flax code, from torchvision's Inception3 with pytorch-fid's FID blocks; a random .npz made from it
must load exactly, and the network run on it must give features of the right shapes.
"""
import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm import inception

# pytorch-fid 0.3.0's FID Inception (torch 2.14, measured on this machine): sum of
# .parameters() = 23,850,960; its batch-norm running means and variances add 34,432 values,
# 23,885,392 in all (the number usually quoted for the network).
NUM_PARAMETERS = 23_850_960
NUM_PARAMETERS_AND_BN_STATS = 23_885_392


# ---- the PyTorch state_dict of pytorch-fid's fid_inception_v3(), written out independently ----
def _conv(name, cin, cout, kh, kw):
  return {f"{name}.conv.weight": (cout, cin, kh, kw), f"{name}.bn.weight": (cout,),
          f"{name}.bn.bias": (cout,), f"{name}.bn.running_mean": (cout,),
          f"{name}.bn.running_var": (cout,), f"{name}.bn.num_batches_tracked": ()}


def _block_a(name, cin, pool):
  convs = [("branch1x1", cin, 64, 1, 1), ("branch5x5_1", cin, 48, 1, 1),
           ("branch5x5_2", 48, 64, 5, 5), ("branch3x3dbl_1", cin, 64, 1, 1),
           ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3),
           ("branch_pool", cin, pool, 1, 1)]
  return {k: v for c in convs for k, v in _conv(f"{name}.{c[0]}", *c[1:]).items()}


def _block_c(name, c7):
  convs = [("branch1x1", 768, 192, 1, 1), ("branch7x7_1", 768, c7, 1, 1),
           ("branch7x7_2", c7, c7, 1, 7), ("branch7x7_3", c7, 192, 7, 1),
           ("branch7x7dbl_1", 768, c7, 1, 1), ("branch7x7dbl_2", c7, c7, 7, 1),
           ("branch7x7dbl_3", c7, c7, 1, 7), ("branch7x7dbl_4", c7, c7, 7, 1),
           ("branch7x7dbl_5", c7, 192, 1, 7), ("branch_pool", 768, 192, 1, 1)]
  return {k: v for c in convs for k, v in _conv(f"{name}.{c[0]}", *c[1:]).items()}


def _block_e(name, cin):
  convs = [("branch1x1", cin, 320, 1, 1), ("branch3x3_1", cin, 384, 1, 1),
           ("branch3x3_2a", 384, 384, 1, 3), ("branch3x3_2b", 384, 384, 3, 1),
           ("branch3x3dbl_1", cin, 448, 1, 1), ("branch3x3dbl_2", 448, 384, 3, 3),
           ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1),
           ("branch_pool", cin, 192, 1, 1)]
  return {k: v for c in convs for k, v in _conv(f"{name}.{c[0]}", *c[1:]).items()}


def torch_state_dict_shapes():
  shapes = {}
  for c in [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3),
            ("Conv2d_2b_3x3", 32, 64, 3, 3), ("Conv2d_3b_1x1", 64, 80, 1, 1),
            ("Conv2d_4a_3x3", 80, 192, 3, 3)]:
    shapes.update(_conv(*c))
  shapes.update(_block_a("Mixed_5b", 192, 32))
  shapes.update(_block_a("Mixed_5c", 256, 64))
  shapes.update(_block_a("Mixed_5d", 288, 64))
  for c in [("branch3x3", 288, 384, 3, 3), ("branch3x3dbl_1", 288, 64, 1, 1),
            ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3)]:
    shapes.update(_conv(f"Mixed_6a.{c[0]}", *c[1:]))
  for name, c7 in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)]:
    shapes.update(_block_c(name, c7))
  for c in [("branch3x3_1", 768, 192, 1, 1), ("branch3x3_2", 192, 320, 3, 3),
            ("branch7x7x3_1", 768, 192, 1, 1), ("branch7x7x3_2", 192, 192, 1, 7),
            ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3)]:
    shapes.update(_conv(f"Mixed_7a.{c[0]}", *c[1:]))
  shapes.update(_block_e("Mixed_7b", 1280))
  shapes.update(_block_e("Mixed_7c", 2048))
  shapes["fc.weight"] = (1008, 2048)
  shapes["fc.bias"] = (1008,)
  return shapes


def random_state_dict(seed=0):
  """Random values of sensible scale (He-initialised convs, positive variances)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, shape in torch_state_dict_shapes().items():
    if name.endswith("num_batches_tracked"):
      sd[name] = np.array(7, np.int64)
    elif name.endswith("conv.weight"):
      sd[name] = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape).astype(np.float32)
    elif name.endswith(("running_var", "bn.weight")):
      sd[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif name.startswith("fc."):
      sd[name] = rng.normal(0, 0.02, shape).astype(np.float32)
    else:
      sd[name] = rng.normal(0, 0.1, shape).astype(np.float32)
  return sd


def flax_leaf(variables, torch_name):
  """The Flax array a PyTorch key must land in, by the naming rule (module path + leaf)."""
  *modules, suffix = torch_name.split(".")
  collection, leaf = {"weight": ("params", "scale" if modules[-1] == "bn" else "kernel"),
                      "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
                      "running_var": ("batch_stats", "var")}[suffix]
  node = variables[collection]
  for m in modules:
    node = node[m]
  return np.asarray(node[leaf])


@pytest.fixture(scope="module")
def state_dict():
  return random_state_dict()


@pytest.fixture(scope="module")
def weights_npz(state_dict, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("weights") / "random_fid_inception.npz")
  np.savez(path, **state_dict)
  return path


@pytest.fixture(scope="module")
def variables(weights_npz):
  return inception.load_params(weights_npz)


@pytest.fixture(scope="module")
def forward(variables):
  """(images, pool, logits) of one jitted call on two small grey uint8 images."""
  images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
  pool, logits = jax.jit(inception.InceptionV3().apply)(variables, images)
  return images, np.asarray(pool), np.asarray(logits)


# ---- architecture ------------------------------------------------------------------------------
def test_parameter_count_matches_pytorch_fid():
  shapes = inception.variable_shapes()
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  table = torch_state_dict_shapes()
  table_params = sum(int(np.prod(s)) for k, s in table.items()
                     if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
  assert count(shapes["params"]) == table_params == NUM_PARAMETERS
  assert count(shapes["params"]) + count(shapes["batch_stats"]) == NUM_PARAMETERS_AND_BN_STATS


def test_output_shapes_and_invariants(forward, state_dict):
  _, pool, logits = forward
  assert pool.shape == (2, inception.POOL_DIM) == (2, 2048)
  assert logits.shape == (2, inception.NUM_CLASSES) == (2, 1008)
  assert np.all(np.isfinite(pool)) and np.all(np.isfinite(logits))
  assert np.all(pool >= 0)  # the average of ReLU outputs
  # Logits are pool3 times the softmax weights without the bias, as in the original IS code.
  expected = pool.astype(np.float64) @ state_dict["fc.weight"].T.astype(np.float64)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_feature_fn_matches_direct_apply(variables, forward):
  from ddpm import fid
  images, pool, logits = forward
  features_fn = fid.inception_feature_fn(variables, batch_size=2, devices=jax.local_devices()[:1])
  f, l = features_fn(images)
  np.testing.assert_allclose(f, pool, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l, logits, rtol=1e-5, atol=1e-5)


def _torch_bilinear_resize(x, out_h, out_w):
  """float64 numpy of torch.nn.functional.interpolate(mode='bilinear', align_corners=False)."""
  def weights(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m
  rows = np.einsum("oh,bhwc->bowc", weights(x.shape[1], out_h), x.astype(np.float64))
  return np.einsum("pw,bowc->bopc", weights(x.shape[2], out_w), rows)


# Up- and down-sampling. Torch and JAX both compute the source coordinates in float32, so their
# interpolation weights are off from the exact (float64) ones by about size * 2^-24.
@pytest.mark.parametrize("size,atol", [((8, 12), 2e-6), ((300, 320), 2e-4)])
def test_preprocess_resizes_like_pytorch_fid(size, atol):
  images = np.random.default_rng(2).integers(0, 256, (1,) + size + (3,), dtype=np.uint8)
  out = np.asarray(inception.preprocess(jnp.asarray(images)))
  expected = _torch_bilinear_resize(images / 255.0, 299, 299) * 2 - 1
  assert out.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(out, expected, atol=atol)


def test_preprocess_grey_float_and_exact_size():
  grey = np.random.default_rng(3).integers(0, 256, (2, 10, 10, 1), dtype=np.uint8)
  from_grey = np.asarray(inception.preprocess(jnp.asarray(grey)))
  from_rgb = np.asarray(inception.preprocess(jnp.asarray(np.repeat(grey, 3, axis=-1))))
  from_float = np.asarray(inception.preprocess(jnp.asarray(grey / 127.5 - 1, jnp.float32)))
  np.testing.assert_array_equal(from_grey, from_rgb)
  np.testing.assert_allclose(from_float, from_grey, atol=1e-6)
  full = np.random.default_rng(4).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
  np.testing.assert_allclose(np.asarray(inception.preprocess(jnp.asarray(full))),
                             full / 127.5 - 1, atol=1e-6)  # no resampling at 299x299


@pytest.mark.parametrize("shape,dtype,match", [((2, 8, 8, 2), np.uint8, "1 or 3 channels"),
                                               ((8, 8, 3), np.uint8, r"\[B, H, W, C\]"),
                                               ((1, 8, 8, 3), np.int32, "int32")])
def test_preprocess_rejects_bad_images(shape, dtype, match):
  with pytest.raises(ValueError, match=match):
    inception.preprocess(jnp.zeros(shape, dtype))


# ---- weight loading ----------------------------------------------------------------------------
def test_npz_round_trips_exactly_into_flax_tree(variables, state_dict):
  n_leaves = 0
  for name, value in state_dict.items():
    if name.endswith("num_batches_tracked"):
      continue
    leaf = flax_leaf(variables, name)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)   # OIHW -> HWIO
    elif value.ndim == 2:
      value = value.T                       # [out, in] -> [in, out]
    np.testing.assert_array_equal(leaf, value, err_msg=name)
    n_leaves += 1
  assert n_leaves == len(jax.tree_util.tree_leaves(variables))
  shapes = inception.variable_shapes()
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(shapes)


def test_missing_key_is_named(state_dict):
  sd = dict(state_dict)
  del sd["Mixed_6c.branch7x7dbl_3.bn.running_var"]
  with pytest.raises(inception.InceptionWeightsError,
                     match=r"missing key 'Mixed_6c\.branch7x7dbl_3\.bn\.running_var'"):
    inception.variables_from_state_dict(sd)


def test_wrong_shape_is_named(state_dict):
  sd = dict(state_dict)
  sd["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)  # 7x1, not 1x7
  with pytest.raises(inception.InceptionWeightsError,
                     match=r"'Mixed_6b\.branch7x7_2\.conv\.weight' has shape \(128, 128, 7, 1\)"):
    inception.variables_from_state_dict(sd)


def test_unexpected_keys_are_named(state_dict):
  sd = dict(state_dict)
  sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)  # torchvision's ImageNet model
  with pytest.raises(inception.InceptionWeightsError, match=r"unexpected keys \['AuxLogits"):
    inception.variables_from_state_dict(sd)


def test_load_params_rejects_unknown_format_and_missing_file(tmp_path):
  bad = tmp_path / "weights.h5"
  bad.write_bytes(b"x")
  with pytest.raises(inception.InceptionWeightsError, match="unknown weights format '.h5'"):
    inception.load_params(str(bad))
  with pytest.raises(inception.InceptionWeightsError, match="does not exist"):
    inception.load_params(str(tmp_path / "nope.npz"))


def test_pth_without_torch_explains_conversion(tmp_path):
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("torch is installed here")
  except ImportError:
    pass
  pth = tmp_path / inception.FID_WEIGHTS_FILENAME
  pth.write_bytes(b"not read")
  with pytest.raises(inception.InceptionWeightsError, match="convert_inception_weights.py"):
    inception.load_params(str(pth))


# ---- finding the weights file ------------------------------------------------------------------
def test_verify_sha256(tmp_path):
  path = tmp_path / "blob.bin"
  data = b"FID weights stand-in" * 1000
  path.write_bytes(data)
  actual = hashlib.sha256(data).hexdigest()
  inception.verify_sha256(str(path), actual)
  inception.verify_sha256(str(path), actual[:8].upper())
  wrong = ("0" if actual[0] != "0" else "1") + actual[1:8]
  with pytest.raises(inception.InceptionWeightsError) as e:
    inception.verify_sha256(str(path), wrong)
  msg = str(e.value)
  assert "SHA-256 mismatch" in msg and str(path) in msg and wrong in msg and actual in msg
  with pytest.raises(ValueError, match="hex digits"):
    inception.verify_sha256(str(path), "abc")


def test_given_path_is_used_and_known_file_is_hash_checked(tmp_path):
  npz = tmp_path / "mine.npz"
  npz.write_bytes(b"anything")
  assert inception.get_weights_path(str(npz), cache_dir=str(tmp_path / "c")) == str(npz)
  pth = tmp_path / inception.FID_WEIGHTS_FILENAME
  pth.write_bytes(b"a truncated download")
  assert not hashlib.sha256(b"a truncated download").hexdigest().startswith(
      inception.FID_WEIGHTS_SHA256_PREFIX)
  with pytest.raises(inception.InceptionWeightsError, match="SHA-256 mismatch"):
    inception.get_weights_path(str(pth), cache_dir=str(tmp_path / "c"))
  with pytest.raises(inception.InceptionWeightsError, match="no such file"):
    inception.get_weights_path(str(tmp_path / "absent.npz"), cache_dir=str(tmp_path / "c"))


def test_missing_weights_error_explains_how_to_supply(tmp_path):
  cache = tmp_path / "cache"
  url = (tmp_path / "offline" / inception.FID_WEIGHTS_FILENAME).as_uri()  # fails, no network
  with pytest.raises(inception.InceptionWeightsError) as e:
    inception.get_weights_path("", cache_dir=str(cache), url=url)
  msg = str(e.value)
  for needle in ("inception_weights", url, inception.FID_WEIGHTS_URL, str(cache),
                 "convert_inception_weights.py", "feature_extractor=none"):
    assert needle in msg, needle
  assert not (cache / inception.FID_WEIGHTS_FILENAME).exists()


def test_download_is_hash_checked_and_cached(tmp_path):
  server = tmp_path / "server"
  server.mkdir()
  data = b"pretend weights"
  (server / "w.pth").write_bytes(data)
  url, cache = (server / "w.pth").as_uri(), tmp_path / "cache"
  good = hashlib.sha256(data).hexdigest()[:16]
  bad = ("0" if good[0] != "0" else "1") + good[1:]

  with pytest.raises(inception.InceptionWeightsError, match="SHA-256 mismatch"):
    inception.get_weights_path("", cache_dir=str(cache), url=url, sha256_prefix=bad)
  assert list(cache.iterdir()) == []  # nothing half-downloaded or corrupt is left behind

  path = inception.get_weights_path("", cache_dir=str(cache), url=url, sha256_prefix=good)
  assert path == str(cache / inception.FID_WEIGHTS_FILENAME)
  assert open(path, "rb").read() == data
  (server / "w.pth").unlink()  # cached now: no second download
  assert inception.get_weights_path("", cache_dir=str(cache), url=url, sha256_prefix=good) == path
  # A converted .npz in the cache is preferred (no torch needed to read it).
  (cache / inception.CONVERTED_WEIGHTS_FILENAME).write_bytes(b"npz")
  assert inception.get_weights_path("", cache_dir=str(cache), url=url).endswith(".npz")


def test_convert_script_without_torch_says_so(tmp_path):
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("torch is installed here")
  except ImportError:
    pass
  pth = tmp_path / inception.FID_WEIGHTS_FILENAME
  pth.write_bytes(b"not read")
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        "convert_inception_weights.py")
  result = subprocess.run([sys.executable, script, f"--input={pth}",
                           f"--output={tmp_path / 'out.npz'}"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode != 0
  assert "needs PyTorch" in result.stderr and "pip install torch" in result.stderr
  assert not (tmp_path / "out.npz").exists()
