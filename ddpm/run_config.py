"""The config travels with the run: workdir/config.json, checked on resume, used by sample/eval.

The first training start writes `workdir/config.json` (every checkpoint records it too, in its
'meta' item). Keys that define what was trained -- `DEFINING` below: the model, the diffusion and
the data's shape -- cannot change afterwards:
  * a resumed training with a different value stops with one line listing
    `key: checkpoint value -> given value`, unless `allow_change` (`--allow_config_change`, for
    fine-tuning) is given;
  * `--mode=sample` and `--mode=eval` take these keys from the record; a command-line override
    that differs from the recorded value is refused with the same line.
Every other key (training length, learning rate, log/checkpoint periods, sampling.*, eval.*, ...)
may change on resume; config.json is rewritten with the values of the latest start.
"""
import json
import os
from typing import Dict, List, Mapping, Optional, Tuple

import jax
import ml_collections
from absl import logging
from etils import epath

from ddpm.errors import UserError

CONFIG_FILE = "config.json"
# Keys (dotted) or groups (ending in '.') that define what a checkpoint holds.
DEFINING = ("model.", "diffusion.", "data.dataset", "data.image_size", "data.channels",
            "data.num_classes")
# Model keys that change how it is computed, not what it is.
_COMPUTE_ONLY = ("model.remat", "model.cpu_kernels")


class ConfigMismatchError(UserError):
  """The given config differs from the run's recorded one in keys that define the model."""


def is_defining(key: str) -> bool:
  if key in _COMPUTE_ONLY:
    return False
  return any(key.startswith(k) if k.endswith(".") else key == k for k in DEFINING)


def as_dict(config) -> dict:
  """A JSON-normal plain dict (tuples as lists) of a ConfigDict or dict."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=str))


def flatten(config, prefix: str = "") -> Dict[str, object]:
  """{'model.ch': 8, ...} of a (nested) config, values JSON-normal."""
  out = {}
  for key, value in as_dict(config).items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def path(workdir) -> epath.Path:
  return epath.Path(workdir) / CONFIG_FILE


def read(workdir) -> Optional[dict]:
  """The recorded config of `workdir` as a nested dict, or None if there is none."""
  p = path(workdir)
  if not p.exists():
    return None
  try:
    return json.loads(p.read_text())
  except ValueError as e:
    raise UserError(f"{p} is not valid JSON ({e}); restore it or delete it to record the "
                    "given config") from None


def write(config, workdir) -> None:
  """Writes workdir/config.json (process 0; atomically where the filesystem allows)."""
  if jax.process_index() != 0:
    return
  p = path(workdir)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / f".{CONFIG_FILE}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(as_dict(config), indent=2, sort_keys=True) + "\n")
  tmp.replace(p)


def defining_changes(recorded, given) -> List[Tuple[str, object, object]]:
  """[(key, recorded value, given value)] for the defining keys whose values differ."""
  old, new = flatten(recorded), flatten(given)
  return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if is_defining(k) and old.get(k) != new.get(k)]


def format_changes(changes) -> str:
  return "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in changes)


def _show(value) -> str:
  if isinstance(value, list):
    value = tuple(value)
  return repr(value)


def check_and_record(config, workdir, allow_change: bool = False) -> None:
  """Training start: compares `config` with the workdir's record, then records `config`.

  Raises:
    ConfigMismatchError: a defining key differs and not `allow_change`.
  """
  check(config, workdir, allow_change)
  write(config, workdir)


def check(config, workdir, allow_change: bool = False) -> None:
  """Raises ConfigMismatchError if `config` differs from the workdir's record in a defining
  key (unless `allow_change`: then logs the changes); writes nothing."""
  recorded = read(workdir)
  if recorded is not None:
    changes = defining_changes(recorded, config)
    if changes and not allow_change:
      raise ConfigMismatchError(
          f"the config differs from the one {path(workdir)} was trained with: "
          f"{format_changes(changes)} (resume with the recorded values, use another workdir, "
          "or pass --allow_config_change to fine-tune)")
    if changes:
      logging.warning("--allow_config_change: continuing %s with %s", workdir,
                      format_changes(changes))


def apply_recorded(config, workdir, overrides: Mapping[str, object]):
  """Sample/eval: `config` with the defining keys taken from the workdir's record.

  Args:
    config: the given config (config file plus command-line overrides).
    workdir: the run's workdir.
    overrides: the command-line overrides ({'diffusion.model_mean_type': 'v'}); one that
      differs from the recorded value is refused.
  Returns:
    A copy of `config` (or `config` itself if the workdir has no record, e.g. older runs).
  Raises:
    ConfigMismatchError: an override of a defining key differs from the recorded value.
  """
  recorded = read(workdir)
  if recorded is None:
    logging.info("No %s: using the given config as it is.", path(workdir))
    return config
  old = flatten(recorded)
  given = flatten(overrides)
  conflicts = [(k, old[k], given[k]) for k in sorted(given)
               if is_defining(k) and k in old and old[k] != given[k]]
  if conflicts:
    raise ConfigMismatchError(
        f"the override differs from the config {path(workdir)} was trained with: "
        f"{format_changes(conflicts)} (drop the override: model and diffusion come from the "
        "record)")
  out = config.copy_and_resolve_references()
  current = flatten(out)
  with out.unlocked():
    for key, value in old.items():
      if is_defining(key) and key in current and current[key] != value:
        group, name = key.rsplit(".", 1)
        parent = out
        for part in group.split("."):
          parent = parent[part]
        parent[name] = tuple(value) if isinstance(parent[name], tuple) else value
        logging.info("config.%s = %r (from %s)", key, parent[name], path(workdir))
  return out
