"""gs:// workdirs end to end against a local Cloud Storage emulator (scripts/gcs_emulator.py).

launch.py runs configs/tiny.py (8 steps) in subprocesses whose working directory is an empty
temporary folder, with --workdir=gs://bucket/...: a sweep (train + eval of one variant: the
uninterrupted reference), a training run stopped by SIGTERM and resumed (bitwise equal to the
reference), sampling and evaluation. The test lists the bucket and checks that nothing was written
locally. The subprocesses share one persistent XLA compilation cache.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bucket"
STEPS = 8

CONFIG = textwrap.dedent(f"""
    from configs import tiny

    def get_config():
      c = tiny.get_config()
      c.training.num_train_steps = {STEPS}
      c.variants = {{"base": {{}}}}
      return c
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """(env for subprocesses, fsspec filesystem of the emulator, local temp cwd, config path)."""
  port = _free_port()
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "gcs_emulator.py"),
                           "--port", str(port), "--bucket", BUCKET],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  line = proc.stdout.readline()
  assert line.startswith("ready"), line + proc.stdout.read() if proc.poll() is not None else line
  url = f"http://127.0.0.1:{port}"
  env_vars = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
              "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  old = {k: os.environ.get(k) for k in env_vars}
  os.environ.update(env_vars)  # for this process's reads of the bucket (gcsfs, Orbax)
  import gcsfs
  fs = gcsfs.GCSFileSystem(endpoint_url=url, token="anon")
  cwd = tmp_path_factory.mktemp("cwd")
  config = tmp_path_factory.mktemp("config") / "gcs_tiny.py"
  config.write_text(CONFIG)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or
             str(tmp_path_factory.mktemp("xla_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)  # one CPU device per subprocess
  yield env, fs, cwd, str(config)
  proc.kill()
  proc.wait()
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def _launch(emulator, *args, timeout=600):
  env, _, cwd, config = emulator
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), f"--config={config}",
                         *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _ok(out):
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def _objects(fs, prefix):
  fs.invalidate_cache()
  return sorted(p[len(f"{BUCKET}/{prefix}/"):] for p in fs.find(f"{BUCKET}/{prefix}"))


def _final_params(workdir, step):
  """Arrays of the checkpoint `step` of a gs:// workdir, restored as numpy, by key path."""
  import orbax.checkpoint as ocp
  from ddpm import checkpointing
  mngr = checkpointing.create_manager(f"{workdir}/checkpoints", read_only=True)
  restored = mngr.restore(step, args=ocp.args.Composite(
      **{checkpointing.STATE_ITEM: ocp.args.StandardRestore()}))
  leaves = jax.tree_util.tree_flatten_with_path(restored[checkpointing.STATE_ITEM])[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


@pytest.fixture(scope="module")
def preempted_run(emulator):
  """gs://bucket/run: SIGTERM once the step-2 checkpoint is being saved, then resumed."""
  env, _, cwd, config = emulator
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), f"--config={config}",
                           "--workdir=gs://bucket/run"], cwd=cwd, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  log = []
  for line in proc.stderr:
    log.append(line)
    if "Saving checkpoint step 2 " in line:
      proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=600)
  first = "".join(log)
  assert proc.returncode == 0, first[-4000:]
  resumed = _ok(_launch(emulator, "--workdir=gs://bucket/run"))
  return first, resumed.stderr


@pytest.fixture(scope="module")
def sweep_run(emulator):
  return _ok(_launch(emulator, "--workdir=gs://bucket/sweep", "--mode=sweep"))


def test_preempted_run_resumes_bitwise_like_an_uninterrupted_one(emulator, preempted_run,
                                                                 sweep_run):
  _, fs, _, _ = emulator
  first, resumed = preempted_run
  assert "Preemption" in first
  stopped = [int(s) for s in re.findall(r"Saving checkpoint step (\d+) ", first)]
  assert stopped[-1] < STEPS, first[-3000:]  # the SIGTERM stopped training early
  assert f"Resumed from checkpoint at step {stopped[-1]}" in resumed
  reference = _final_params(f"gs://{BUCKET}/sweep/base", STEPS)
  params = _final_params(f"gs://{BUCKET}/run", STEPS)
  assert reference.keys() == params.keys() and len(params) > 100
  for k in reference:
    np.testing.assert_array_equal(params[k], reference[k], err_msg=k)
  # metrics.jsonl in the bucket: each log step once, although steps were logged twice.
  rows = [json.loads(line) for line in fs.cat(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()]
  assert [r["step"] for r in rows] == list(range(2, STEPS + 1, 2))
  objects = _objects(fs, "run")
  assert f"checkpoints/{STEPS}/state/manifest.ocdbt" in objects
  assert any(o.startswith("tensorboard/events.out.tfevents.") for o in objects)
  assert not [o for o in objects if "probe" in o or ".tmp" in o]


def test_sweep_writes_tables_and_eval_to_the_bucket(emulator, sweep_run):
  _, fs, _, _ = emulator
  objects = _objects(fs, "sweep")
  for name in ("results.csv", "results.md", "base/result.json", "base/metrics.jsonl",
               f"base/eval/eval_{STEPS}.json", f"base/checkpoints/{STEPS}/commit_success.txt"):
    assert name in objects, objects
  result = json.loads(fs.cat(f"{BUCKET}/sweep/base/result.json"))
  assert result["steps"] == STEPS and np.isfinite(result["bpd"])
  assert "| base |" in fs.cat(f"{BUCKET}/sweep/results.md").decode()


def test_sample_and_eval_modes_write_to_the_bucket(emulator, preempted_run):
  _, fs, _, _ = emulator
  out = _ok(_launch(emulator, "--workdir=gs://bucket/run", "--mode=sample"))
  assert f"npz: gs://{BUCKET}/run/samples/samples_{STEPS}.npz" in out.stdout
  _ok(_launch(emulator, "--workdir=gs://bucket/run", "--mode=eval"))
  objects = _objects(fs, "run")
  for name in (f"samples/samples_{STEPS}.npz", f"samples/samples_{STEPS}.png",
               f"samples/progression_{STEPS}.gif", f"eval/eval_{STEPS}.json"):
    assert name in objects, objects
  with fs.open(f"{BUCKET}/run/samples/samples_{STEPS}.npz", "rb") as f:
    assert np.load(f)["images"].shape == (8, 8, 8, 1)
  results = json.loads(fs.cat(f"{BUCKET}/run/eval/eval_{STEPS}.json"))
  assert results["step"] == STEPS and np.isfinite(results["bpd"])


def test_nothing_is_written_locally(emulator, preempted_run, sweep_run):
  _, _, cwd, _ = emulator
  assert os.listdir(cwd) == []  # no 'gs:' folder, no stray files


def test_missing_bucket_fails_in_one_line_before_compiling(emulator):
  _, _, cwd, _ = emulator
  start = time.perf_counter()
  out = _launch(emulator, "--workdir=gs://no-such-bucket/run")
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("launch.py: workdir gs://no-such-bucket/run: bucket "
                         "gs://no-such-bucket does not exist"), out.stderr[-2000:]
  assert "Traceback" not in out.stderr and "Model:" not in out.stderr
  assert os.listdir(cwd) == [] and time.perf_counter() - start < 120


@pytest.mark.slow
def test_two_processes_train_on_one_gcs_workdir(emulator):
  """jax.distributed over loopback, both processes on gs://bucket/multi; process 0 writes."""
  env, fs, cwd, config = emulator
  port = _free_port()
  env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), f"--config={config}",
                             "--workdir=gs://bucket/multi", f"--coordinator_address=127.0.0.1:{port}",
                             "--num_processes=2", f"--process_id={i}"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-4000:]
  objects = _objects(fs, "multi")
  assert f"checkpoints/{STEPS}/commit_success.txt" in objects, objects
  rows = fs.cat(f"{BUCKET}/multi/metrics.jsonl").decode().splitlines()
  assert [json.loads(r)["step"] for r in rows] == list(range(2, STEPS + 1, 2))
  assert os.listdir(cwd) == []
