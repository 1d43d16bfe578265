"""Base configuration: the defaults live in the package, `ddpm/default_config.py`.

Experiment configs build on `default.get_config()`; see ddpm/default_config.py for every key.
"""
from ddpm.default_config import get_config  # noqa: F401  (re-exported)
