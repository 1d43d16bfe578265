"""The sweep mode end to end on configs/tiny.py: tables, preemption and resume, variant errors."""
import csv
import os

import numpy as np
import pytest

from configs import tiny
from ddpm import checkpointing, sweep


def _config():
  c = tiny.get_config()
  c.training.num_train_steps = 2
  c.training.log_every = 2
  c.training.checkpoint_every = 2
  c.sampling.num_samples = 10
  c.sampling.method = "ddim"
  c.sampling.num_steps = 5
  return c


def test_sweep_writes_csv_and_markdown_and_resumes(tmp_path, sigterm_at_step):
  """A SIGTERM stops the sweep after saving; the rerun resumes it; a third run skips both."""
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
