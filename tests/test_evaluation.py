"""The sample / eval / sweep modes end to end on configs/tiny.py (2 training steps)."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from ddpm import evaluation, sweep, train


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


def test_sweep_writes_csv_and_markdown_and_resumes(tmp_path, sigterm_at_step):
  """A SIGTERM stops the sweep after saving; the rerun resumes it; a third run skips both."""
  from ddpm import checkpointing
  c = _config()
  c.training.num_train_steps = 4
  c.eval.bpd_num_images = 0
  c.variants = {"base": {}, "cosine": {"diffusion": {"beta_schedule": "cosine"}}}
  disarm = sigterm_at_step(2)
  assert sweep.run_sweep(c, str(tmp_path)) == []
  assert checkpointing.latest_step(str(tmp_path / "base" / "checkpoints")) == 2
  assert not (tmp_path / "base" / "result.json").exists() and not (tmp_path / "cosine").exists()
  disarm()

  rows = sweep.run_sweep(c, str(tmp_path))
  assert [r["variant"] for r in rows] == ["base", "cosine"]
  assert [r["steps"] for r in rows] == [4, 4]
  with open(tmp_path / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["variant"] for r in table] == ["base", "cosine"]
  assert all(np.isfinite(float(r["final_loss"])) for r in table)
  md = (tmp_path / "results.md").read_text()
  assert "| cosine |" in md
  # The cosine variant really trained with its own schedule.
  assert (tmp_path / "cosine" / "checkpoints").exists()

  stamps = [os.stat(tmp_path / v / "result.json").st_mtime_ns for v in ("base", "cosine")]
  assert sweep.run_sweep(c, str(tmp_path)) == rows
  assert [os.stat(tmp_path / v / "result.json").st_mtime_ns for v in ("base", "cosine")] == stamps


def test_unknown_variant_is_named():
  c = _config()
  c.variants = {"base": {}}
  with pytest.raises(ValueError, match="unknown variant 'nope'"):
    sweep.variant_config(c, "nope")
  c.variants = {"bad": {"training": {"batchsize": 4}}}
  with pytest.raises(ValueError, match=r"config\.training\.batchsize"):
    sweep.variant_config(c, "bad")
