"""The sample and eval modes end to end on configs/tiny.py (2 training steps)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from ddpm import evaluation, train


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
def workdir(tmp_path_factory):
  w = str(tmp_path_factory.mktemp("eval"))
  train.train_and_evaluate(_config(), w)
  return w


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
