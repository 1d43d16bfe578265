"""Tests of ddpm/run_config.py: the recorded config, refused changes on resume, sample/eval use
of the record."""
import json

import pytest

from configs import tiny
from ddpm import run_config


def test_first_start_records_then_same_config_passes(tmp_path):
  config = tiny.get_config()
  run_config.check_and_record(config, tmp_path)
  recorded = json.loads((tmp_path / "config.json").read_text())
  assert recorded["model"]["ch_mult"] == [1, 2] and recorded["diffusion"]["num_timesteps"] == 32
  run_config.check_and_record(config, tmp_path)  # an unchanged resume


def test_defining_change_is_refused_listing_every_key(tmp_path):
  run_config.check_and_record(tiny.get_config(), tmp_path)
  config = tiny.get_config()
  config.diffusion.beta_schedule = "cosine"
  config.model.ch_mult = (1, 1)
  config.training.num_train_steps = 99  # may change
  config.optim.lr = 5e-4               # may change
  with pytest.raises(run_config.ConfigMismatchError) as err:
    run_config.check_and_record(config, tmp_path)
  msg = str(err.value)
  assert "diffusion.beta_schedule: 'linear' -> 'cosine'" in msg
  assert "model.ch_mult: (1, 2) -> (1, 1)" in msg
  assert "num_train_steps" not in msg and "optim.lr" not in msg
  assert json.loads((tmp_path / "config.json").read_text())["diffusion"]["beta_schedule"] == (
      "linear")  # the record is unchanged
  run_config.check_and_record(config, tmp_path, allow_change=True)  # fine-tuning
  assert json.loads((tmp_path / "config.json").read_text())["diffusion"]["beta_schedule"] == (
      "cosine")


def test_non_defining_changes_update_the_record(tmp_path):
  run_config.check_and_record(tiny.get_config(), tmp_path)
  config = tiny.get_config()
  config.training.num_train_steps = 10
  config.sampling.method = "ddim"
  config.model.remat = True  # compute only
  run_config.check_and_record(config, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["training"]["num_train_steps"] == 10


def test_sample_takes_record_and_refuses_conflicting_override(tmp_path):
  trained = tiny.get_config()
  trained.diffusion.beta_schedule = "cosine"
  trained.model.ch = 16
  run_config.write(trained, tmp_path)
  given = tiny.get_config()
  given.sampling.num_samples = 3
  out = run_config.apply_recorded(given, tmp_path, {"sampling.num_samples": 3})
  assert out.diffusion.beta_schedule == "cosine" and out.model.ch == 16
  assert out.model.ch_mult == (1, 2) and isinstance(out.model.ch_mult, tuple)
  assert out.sampling.num_samples == 3
  # Overriding with the recorded value is fine; a different one is refused.
  run_config.apply_recorded(given, tmp_path, {"model.ch": 16})
  with pytest.raises(run_config.ConfigMismatchError,
                     match=r"diffusion.model_mean_type: 'eps' -> 'v'"):
    run_config.apply_recorded(given, tmp_path, {"diffusion.model_mean_type": "v"})


def test_without_record_config_is_used_as_given(tmp_path):
  given = tiny.get_config()
  assert run_config.apply_recorded(given, tmp_path, {}) is given
