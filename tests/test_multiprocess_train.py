"""Two local processes (jax.distributed over loopback, gloo CPU collectives) train like one.

Each process simulates 4 CPU devices; together they form the same 8-device mesh as the
single-process run in this test, and must end with the same parameters (float tolerance).
"""
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from configs import tiny
    from ddpm import distributed, train
    port, pid, nproc, workdir, out = sys.argv[1:6]
    if int(nproc) > 1:
      distributed.maybe_initialize(f"127.0.0.1:{port}", int(nproc), int(pid))
    assert jax.device_count() == 8, jax.device_count()
    c = tiny.get_config()
    c.training.num_train_steps = 2
    c.training.log_every = 2
    c.training.checkpoint_every = 2
    state = train.train_and_evaluate(c, workdir)
    # Parameters are replicated: each process's first local shard is the whole array.
    np.savez(out, *[np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)])
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(args, devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-c", WORKER, *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  procs = [_run([str(port), str(i), "2", str(tmp_path / "multi"), str(tmp_path / f"p{i}.npz")], 4)
           for i in range(2)]
  single = _run(["0", "0", "1", str(tmp_path / "single"), str(tmp_path / "single.npz")], 8)
  for p in procs + [single]:
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
  with np.load(tmp_path / "single.npz") as s, np.load(tmp_path / "p0.npz") as a, \
       np.load(tmp_path / "p1.npz") as b:
    assert len(s.files) == len(a.files) > 0
    for k in s.files:
      np.testing.assert_allclose(a[k], s[k], rtol=2e-4, atol=2e-6)
      np.testing.assert_array_equal(a[k], b[k])  # replicated: both processes agree
  # Only process 0 writes logs.
  assert (tmp_path / "multi" / "metrics.jsonl").exists()
  assert (tmp_path / "multi" / "checkpoints").exists()
