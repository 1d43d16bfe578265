"""The sample and eval modes end to end on configs/tiny.py (2 training steps)."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from ddpm import evaluation, input_pipeline, train


def _config():
  c = tiny.get_config()
  c.training.num_train_steps = 2
  c.training.log_every = 2
  c.training.checkpoint_every = 2
  c.sampling.num_samples = 10  # not a multiple of the batch: the last batch is trimmed
  c.sampling.method = "ddim"
  c.sampling.num_steps = 5
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  w = str(tmp_path_factory.mktemp("eval"))
  state = train.train_and_evaluate(_config(), w)
  return w, jax.device_get(state)


@pytest.fixture(scope="module")
def workdir(trained):
  return trained[0]


def test_load_ema_params_restores_the_ema_only(trained):
  workdir, state = trained
  params, step, _ = evaluation.load_ema_params(_config(), workdir)
  assert step == 2
  assert jax.tree.structure(params) == jax.tree.structure(state.ema_params)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params)):
    np.testing.assert_array_equal(np.asarray(got), want)
  # The EMA differs from the trained parameters after 2 steps: the right subtree was read.
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(state.ema_params),
                                            jax.tree.leaves(state.params)))


def test_sample_mode_writes_npz_grid_and_gif(workdir):
  out = evaluation.run_sampling(_config(), workdir)
  with np.load(out["npz"]) as f:
    images = f["images"]
  assert images.dtype == np.uint8 and images.shape == (10, 8, 8, 1)
  assert out["npz"].endswith("samples_2.npz")
  grid = Image.open(out["grid"])
  assert grid.size[0] > 8 and grid.mode == "L"
  gif = Image.open(out["gif"])
  assert gif.n_frames >= 2


def test_eval_mode_bits_per_dim(workdir):
  results = evaluation.run_eval(_config(), workdir)
  assert results["step"] == 2
  assert results["bpd_num_images"] == 8
  assert np.isfinite(results["bpd"]) and results["bpd"] > 0
  # The bound is the sum of the prior term and the T other terms, all non-negative.
  assert results["bpd"] >= results["prior_bpd"] >= 0
  with open(os.path.join(workdir, "eval", "eval_2.json")) as f:
    assert json.load(f)["bpd"] == pytest.approx(results["bpd"])


def test_sample_mode_without_checkpoint_says_train_first(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first"):
    evaluation.run_sampling(_config(), str(tmp_path))


def test_reference_statistics_use_their_own_size_and_are_keyed_by_the_weights(tmp_path):
  config = _config()
  dataset = input_pipeline.create_datasets(config, seed=0)
  weights = tmp_path / "weights.npz"
  weights.write_bytes(b"first weights")
  config.eval.inception_weights = str(weights)
  seen = []

  def features_fn(batch):  # stands in for Inception: 4 pixel values as "features"
    seen.append(batch.shape[0])
    return batch.reshape(batch.shape[0], -1)[:, :4].astype(np.float64), None

  cache = str(tmp_path / "cache")
  # eval.reference_num_images = 0: the whole training split, not eval.num_samples images.
  mu, sigma = evaluation.reference_statistics(config, features_fn, dataset, cache_dir=cache)
  assert sum(seen) == dataset.info["num_train"] != config.eval.num_samples
  whole = np.concatenate(list(dataset.iter_reference_images(dataset.info["num_train"], 512)))
  feats = whole.reshape(whole.shape[0], -1)[:, :4].astype(np.float64)
  np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-10)
  # Cached: the same settings do not compute again.
  seen.clear()
  evaluation.reference_statistics(config, features_fn, dataset, cache_dir=cache)
  assert seen == []
  # Other weights (same file name) or another size: new statistics, never the cached ones.
  weights.write_bytes(b"other weights")
  evaluation.reference_statistics(config, features_fn, dataset, cache_dir=cache)
  assert sum(seen) == dataset.info["num_train"]
  seen.clear()
  config.eval.reference_num_images = 100
  evaluation.reference_statistics(config, features_fn, dataset, cache_dir=cache)
  assert sum(seen) == 100
  assert len(os.listdir(cache)) == 3
