"""gs:// workdirs end to end against a local Cloud Storage emulator (scripts/gcs_emulator.py).

launch.py runs configs/tiny.py (8 steps) in subprocesses whose working directory is an empty
temporary folder, with --workdir=gs://bucket/...: a sweep (train + eval of one variant: the
uninterrupted reference), a training run stopped by SIGTERM and resumed (bitwise equal to the
reference), sampling and evaluation. The test lists the bucket and checks that nothing was written
locally. The subprocesses share one persistent XLA compilation cache.
"""
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest

from conftest import clear_gcs_clients

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")  # a requirement; the emulator is in requirements-test.txt

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
  """(env for subprocesses, Bucket reader, the empty local working directory, config path)."""
  port = _free_port()
  log = tmp_path_factory.mktemp("emulator") / "log.txt"
  with open(log, "w") as f:  # a file, not a pipe: the emulator logs every missing object
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "gcs_emulator.py"),
                             "--port", str(port), "--bucket", BUCKET], stdout=f,
                            stderr=subprocess.STDOUT)
  deadline = time.time() + 60
  while "ready" not in log.read_text():
    assert proc.poll() is None and time.time() < deadline, log.read_text()
    time.sleep(0.1)
  url = f"http://127.0.0.1:{port}"
  env_vars = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
              "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  old = {k: os.environ.get(k) for k in env_vars}
  os.environ.update(env_vars)  # for this process's reads of the bucket (gcsfs, Orbax)
  clear_gcs_clients()
  bucket = Bucket(url)
  cwd = tmp_path_factory.mktemp("cwd")
  config = tmp_path_factory.mktemp("config") / "gcs_tiny.py"
  config.write_text(CONFIG)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or
             str(tmp_path_factory.mktemp("xla_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)  # one CPU device per subprocess
  yield env, bucket, cwd, str(config)
  proc.kill()
  proc.wait()
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  clear_gcs_clients()


def _launch(emulator, name, *args):
  """launch.py with the test config in the empty working directory; output to log files."""
  env, _, cwd, config = emulator
  logs = os.path.join(os.path.dirname(config), name)
  with open(logs + ".out", "w") as out, open(logs + ".err", "w") as err:
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"),
                             f"--config={config}", *args], cwd=cwd, env=env, stdout=out,
                            stderr=err)
  proc.logs = logs
  return proc


def _stderr(proc):
  with open(proc.logs + ".err") as f:
    return f.read()


def _finish(proc, timeout=900, returncode=0):
  proc.wait(timeout=timeout)
  assert proc.returncode == returncode, _stderr(proc)[-4000:]
  with open(proc.logs + ".out") as f:
    return f.read(), _stderr(proc)


class Bucket:
  """Reads the emulator's bucket through the Cloud Storage JSON API (urllib, not the code under
  test): object names under a prefix, and object contents."""

  def __init__(self, url):
    self.url = url

  def list(self, prefix):
    names, token = [], ""
    while True:
      query = urllib.parse.urlencode({"prefix": prefix + "/", "pageToken": token})
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o?{query}") as r:
        page = json.load(r)
      names += [o["name"][len(prefix) + 1:] for o in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, name):
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as r:
      return r.read()


# Restores the newest checkpoints of two workdirs (in its own process, as a user would) and
# prints whether every array of the train state is bitwise equal.
COMPARE = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from configs import tiny
    from ddpm import checkpointing, experiment
    config = tiny.get_config()
    _, _, _, _, init_fn = experiment.setup(config)
    abstract = jax.eval_shape(init_fn, experiment.initial_rng(config))
    def newest(workdir):
      mngr = checkpointing.create_manager(workdir + "/checkpoints", read_only=True)
      state, _, step = checkpointing.restore_latest(mngr, abstract)
      return step, jax.tree.leaves(jax.device_get(state))
    (step_a, a), (step_b, b) = newest(sys.argv[1]), newest(sys.argv[2])
    print(step_a, step_b, len(a), all(np.array_equal(x, y) for x, y in zip(a, b)))
""")


@pytest.fixture(scope="module")
def runs(emulator):
  """stderr of each run, in three rounds of concurrent subprocesses (2 cores):
  1. gs://bucket/run trained and stopped by SIGTERM once the step-2 checkpoint is being saved,
     while --mode=sweep trains and evaluates its one variant (the uninterrupted reference) in
     gs://bucket/sweep;
  2. gs://bucket/run resumed to the end;
  3. --mode=sample and --mode=eval of gs://bucket/run."""
  logs = {}
  preempted = _launch(emulator, "preempted", "--workdir=gs://bucket/run")
  sweep = _launch(emulator, "sweep", "--workdir=gs://bucket/sweep", "--mode=sweep")
  deadline = time.time() + 900
  while "Saving checkpoint step 2 " not in _stderr(preempted):
    assert preempted.poll() is None and time.time() < deadline, _stderr(preempted)[-4000:]
    time.sleep(0.05)
  preempted.send_signal(signal.SIGTERM)
  _, logs["preempted"] = _finish(preempted)
  _, logs["sweep"] = _finish(sweep)
  _, logs["resumed"] = _finish(_launch(emulator, "resumed", "--workdir=gs://bucket/run"))
  sample = _launch(emulator, "sample", "--workdir=gs://bucket/run", "--mode=sample")
  evaluate = _launch(emulator, "eval", "--workdir=gs://bucket/run", "--mode=eval")
  logs["sample_stdout"], logs["sample"] = _finish(sample)
  _, logs["eval"] = _finish(evaluate)
  return logs


def test_preempted_run_resumes_bitwise_like_an_uninterrupted_one(emulator, runs):
  _, bucket, _, _ = emulator
  first, resumed = runs["preempted"], runs["resumed"]
  assert "Preemption" in first
  stopped = [int(s) for s in re.findall(r"Saving checkpoint step (\d+) ", first)]
  assert stopped[-1] < STEPS, first[-3000:]  # the SIGTERM stopped training early
  assert f"Resumed from checkpoint at step {stopped[-1]}" in resumed
  env, _, cwd, _ = emulator
  compare = subprocess.run([sys.executable, "-c", COMPARE, f"gs://{BUCKET}/sweep/base",
                            f"gs://{BUCKET}/run"], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=600)
  assert compare.returncode == 0, compare.stderr[-4000:]
  step_a, step_b, leaves, equal = compare.stdout.split()
  assert (int(step_a), int(step_b), equal) == (STEPS, STEPS, "True") and int(leaves) > 100
  # metrics.jsonl in the bucket: each log step once, although steps were logged twice.
  rows = [json.loads(line) for line in bucket.read("run/metrics.jsonl").splitlines()]
  assert [r["step"] for r in rows] == list(range(2, STEPS + 1, 2))
  objects = bucket.list("run")
  assert f"checkpoints/{STEPS}/state/manifest.ocdbt" in objects
  assert any(o.startswith("tensorboard/events.out.tfevents.") for o in objects)
  assert not [o for o in objects if "probe" in o or ".tmp" in o]


def test_sweep_writes_tables_and_eval_to_the_bucket(emulator, runs):
  _, bucket, _, _ = emulator
  objects = bucket.list("sweep")
  for name in ("results.csv", "results.md", "base/result.json", "base/metrics.jsonl",
               f"base/eval/eval_{STEPS}.json", f"base/checkpoints/{STEPS}/commit_success.txt"):
    assert name in objects, objects
  result = json.loads(bucket.read("sweep/base/result.json"))
  assert result["steps"] == STEPS and np.isfinite(result["bpd"])
  assert "| base |" in bucket.read("sweep/results.md").decode()


def test_sample_and_eval_modes_write_to_the_bucket(emulator, runs):
  _, bucket, _, _ = emulator
  assert f"npz: gs://{BUCKET}/run/samples/samples_{STEPS}.npz" in runs["sample_stdout"]
  objects = bucket.list("run")
  for name in (f"samples/samples_{STEPS}.npz", f"samples/samples_{STEPS}.png",
               f"samples/progression_{STEPS}.gif", f"eval/eval_{STEPS}.json"):
    assert name in objects, objects
  with np.load(io.BytesIO(bucket.read(f"run/samples/samples_{STEPS}.npz"))) as f:
    assert f["images"].shape == (8, 8, 8, 1) and f["images"].dtype == np.uint8
  results = json.loads(bucket.read(f"run/eval/eval_{STEPS}.json"))
  assert results["step"] == STEPS and np.isfinite(results["bpd"])


def test_statistics_and_npz_in_the_bucket(emulator):
  """In-process: FID statistics and sample rounds round-trip through gs:// (metrics.jsonl and
  TensorBoard events in the bucket are checked on the runs above)."""
  from ddpm import fid, images, workdir
  _, bucket, _, _ = emulator
  rng = np.random.default_rng(0)
  mu, a = rng.normal(size=3), rng.normal(size=(3, 3))
  fid.save_statistics(f"gs://{BUCKET}/unit/ref.npz", mu, a @ a.T)
  mu2, sigma2 = fid.load_statistics(f"gs://{BUCKET}/unit/ref.npz")
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, a @ a.T)
  x = rng.integers(0, 256, size=(2, 4, 4, 1), dtype=np.uint8)
  images.save_npz(f"gs://{BUCKET}/unit/round_00000.npz", x)
  with workdir.load_npz(f"gs://{BUCKET}/unit/round_00000.npz") as f:
    np.testing.assert_array_equal(f["images"], x)
  assert bucket.list("unit") == ["ref.npz", "round_00000.npz"]


def test_nothing_is_written_locally(emulator, runs):
  _, _, cwd, _ = emulator
  assert os.listdir(cwd) == []  # no 'gs:' folder, no stray files


def test_missing_bucket_fails_in_one_line_before_compiling(emulator):
  _, _, cwd, _ = emulator
  start = time.perf_counter()
  _, err = _finish(_launch(emulator, "nobucket", "--workdir=gs://no-such-bucket/run"),
                   timeout=300, returncode=1)
  last = err.strip().splitlines()[-1]
  assert last.startswith("launch.py: workdir gs://no-such-bucket/run: bucket "
                         "gs://no-such-bucket does not exist"), err[-2000:]
  assert "Traceback" not in err and "Model:" not in err
  assert os.listdir(cwd) == [] and time.perf_counter() - start < 120


@pytest.mark.slow
def test_two_processes_train_on_one_gcs_workdir(emulator):
  """jax.distributed over loopback, both processes on gs://bucket/multi; process 0 writes."""
  env, bucket, cwd, config = emulator
  port = _free_port()
  multi = (dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"), bucket, cwd, config)
  procs = [_launch(multi, f"multi{i}", "--workdir=gs://bucket/multi",
                   f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                   f"--process_id={i}") for i in range(2)]
  for p in procs:
    _finish(p)
  objects = bucket.list("multi")
  assert f"checkpoints/{STEPS}/commit_success.txt" in objects, objects
  rows = bucket.read("multi/metrics.jsonl").splitlines()
  assert [json.loads(r)["step"] for r in rows] == list(range(2, STEPS + 1, 2))
  assert os.listdir(cwd) == []
