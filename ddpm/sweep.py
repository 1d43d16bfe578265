"""Ablation sweeps: named variants of one config, run one after another, summarised in a table.

A config declares its variants as nested overrides of its own fields:

  config.variants = {
      "linear": {},
      "cosine": {"diffusion": {"beta_schedule": "cosine"}},
      "v_pred": {"diffusion": {"model_mean_type": "v"}},
  }

`launch.py --mode=sweep` trains and evaluates each variant into `workdir/<variant>/` and writes
`workdir/results.csv` and `workdir/results.md`; `--variant=NAME` runs only that one (e.g. one per pod
slice), and the tables then list every variant whose `result.json` exists in the workdir.
"""
import copy
import csv
import io
import time
from typing import Dict, List, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from ddpm import config_validation
from ddpm import evaluation
from ddpm import locking
from ddpm import train
from ddpm import workdir as workdir_lib

COLUMNS = ("variant", "final_loss", "bpd", "fid", "images_per_s", "train_wall_s", "steps")


def variant_names(config) -> List[str]:
  return list(config.get("variants", {}).keys())


def _merge(config: ml_collections.ConfigDict, overrides, prefix: str):
  for key, value in overrides.items():
    name = f"{prefix}{key}"
    if key not in config:
      raise config_validation.ConfigError(f"config.{name}: unknown key in a variant override")
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      _merge(config[key], value, name + ".")
    else:
      config[key] = value


def variant_config(config, name: str) -> ml_collections.ConfigDict:
  """`config` with the overrides of variant `name` applied and `variants` removed; validated."""
  names = variant_names(config)
  if name not in names:
    raise config_validation.ConfigError(f"unknown variant {name!r}; this config defines: {', '.join(names) or 'none'}")
  out = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  overrides = out.variants[name]
  del out["variants"]
  _merge(out, overrides, "")
  return config_validation.validate_config(out, num_devices=jax.device_count())


def run_variant(config, workdir: str, allow_config_change: bool = False) -> Optional[Dict]:
  """Trains (or resumes) one variant in `workdir`, evaluates it, writes workdir/result.json.

  Returns the result, or None when training stopped early on a preemption signal (SIGTERM /
  SIGINT): the checkpoint is saved, nothing is evaluated, and rerunning resumes the variant.
  """
  start = time.perf_counter()
  state = train.train_and_evaluate(config, workdir, allow_config_change=allow_config_change)
  wall = time.perf_counter() - start
  trained = int(jax.device_get(state.step))
  if trained < config.training.num_train_steps:
    logging.warning("Variant in %s stopped at step %d of %d (preempted): not evaluated. Rerun "
                    "the same command to resume it.", workdir, trained,
                    config.training.num_train_steps)
    return None
  metrics = workdir_lib.read_metrics(workdir)
  result = {
      "final_loss": metrics[-1]["loss"] if metrics else float("nan"),
      "images_per_s": float(np.mean([m["images_per_s"] for m in metrics])) if metrics else float("nan"),
      "train_wall_s": wall,
      "steps": trained,
  }
  result.update(evaluation.evaluate(config, workdir))
  if jax.process_index() == 0:
    workdir_lib.write_json(workdir_lib.path(workdir, "result.json"), result)
  return result


def _finished(config, workdir: str) -> bool:
  """Whether workdir holds the result of a completed run of this variant (a rerun skips it)."""
  path = workdir_lib.path(workdir, "result.json")
  if not path.exists():
    return False
  return workdir_lib.read_json(path).get("steps") == config.training.num_train_steps


def run_sweep(config, workdir: str, only: Optional[str] = None,
              allow_config_change: bool = False) -> List[Dict]:
  """Runs every variant (or only `only`) and writes results.csv and results.md in `workdir`.

  Variants already finished in `workdir` (result.json for the configured number of steps) are
  not run again, so an interrupted sweep resumes where it stopped. A preemption signal stops
  the sweep after saving the running variant; the tables then list the finished variants.
  The sweep holds the lock of `workdir` throughout (each variant's training that of its own
  folder), so a second sweep of the same workdir stops at once.
  """
  with locking.workdir_lock(workdir):
    return _run_sweep(config, workdir, only, allow_config_change)


def _run_sweep(config, workdir: str, only: Optional[str], allow_config_change: bool) -> List[Dict]:
  names = variant_names(config)
  if not names:
    raise config_validation.ConfigError("--mode=sweep needs a config with `config.variants` (see ddpm/sweep.py)")
  todo = [only] if only else names
  variant_configs = {name: variant_config(config, name) for name in todo}  # fail before training
  for i, name in enumerate(todo):
    variant_dir = workdir_lib.path(workdir, name)
    if _finished(variant_configs[name], variant_dir):
      logging.info("=== sweep variant %d/%d: %s: finished earlier (%s), skipped ===", i + 1,
                   len(todo), name, variant_dir / "result.json")
      continue
    logging.info("=== sweep variant %d/%d: %s ===", i + 1, len(todo), name)
    if run_variant(variant_configs[name], variant_dir, allow_config_change) is None:
      logging.warning("Sweep stopped at variant %s; rerun the same command to continue.", name)
      break
  rows = collect_results(workdir, names)
  if jax.process_index() == 0:
    write_tables(workdir, rows)
    logging.info("Sweep results: %s and %s", workdir_lib.path(workdir, "results.csv"),
                 workdir_lib.path(workdir, "results.md"))
  return rows


def collect_results(workdir: str, names: List[str]) -> List[Dict]:
  rows = []
  for name in names:
    path = workdir_lib.path(workdir, name, "result.json")
    if path.exists():
      rows.append({"variant": name, **workdir_lib.read_json(path)})
  return rows


def write_tables(workdir: str, rows: List[Dict]):
  csv_text = io.StringIO(newline="")
  w = csv.DictWriter(csv_text, fieldnames=COLUMNS, extrasaction="ignore")
  w.writeheader()
  for row in rows:
    w.writerow({c: row.get(c, "") for c in COLUMNS})
  workdir_lib.write_text(workdir_lib.path(workdir, "results.csv"), csv_text.getvalue())
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for row in rows:
    lines.append("| " + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |")
  workdir_lib.write_text(workdir_lib.path(workdir, "results.md"), "\n".join(lines) + "\n")


def _fmt(value) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return "n/a" if np.isnan(value) else f"{value:.4g}"
  return str(value)
