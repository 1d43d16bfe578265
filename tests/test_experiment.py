"""experiment.py: the learning-rate schedule and the EMA decay (the train state: test_train.py)."""
import numpy as np
import pytest

from configs import tiny
from ddpm import experiment


def _tiny(**overrides):
  config = tiny.get_config()
  for dotted, value in overrides.items():
    group, key = dotted.split(".")
    config[group][key] = value
  return config


def test_learning_rate_warmup_then_constant():
  config = _tiny(**{"optim.lr": 1e-3, "optim.warmup": 10})
  lr = experiment.learning_rate_schedule(config)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(1000)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)


def test_learning_rate_cosine_decays_to_zero():
  config = _tiny(**{"optim.lr": 1e-3, "optim.warmup": 0, "optim.schedule": "cosine",
                    "training.num_train_steps": 100})
  lr = experiment.learning_rate_schedule(config)
  np.testing.assert_allclose([lr(0), lr(50), lr(100)], [1e-3, 5e-4, 0.0], atol=1e-9)


def test_ema_decay_warmup_formula():
  config = _tiny(**{"training.ema_decay": 0.9999, "training.ema_warmup": True})
  for n in (0, 5, 100, 10**6):
    assert float(experiment.ema_decay_at(config, n)) == pytest.approx(
        min(0.9999, (1 + n) / (10 + n)))

