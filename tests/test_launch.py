"""launch.py as a user runs it: flags, help and config errors (subprocesses, no training)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_helpfull_documents_flags():
  out = _run("--helpfull")  # absl exits with status 1 after printing help
  for flag in ("--config", "--workdir", "--mode", "--coordinator_address", "--num_processes",
               "--process_id"):
    assert flag in out.stdout


def test_config_override_typo_fails_fast_naming_key(tmp_path):
  out = _run("--config=configs/tiny.py", f"--workdir={tmp_path}",
             "--config.training.batchsize=8")
  assert out.returncode != 0
  assert "training.batchsize" in out.stderr
  assert "batch_size" in out.stderr  # the suggestion
  assert "Traceback" not in out.stderr


def test_invalid_value_fails_before_compiling(tmp_path):
  out = _run("--config=configs/tiny.py", f"--workdir={tmp_path}",
             "--config.diffusion.beta_schedule=cosin")
  assert out.returncode != 0
  assert "config.diffusion.beta_schedule: 'cosin' is not one of" in out.stderr
  assert not os.listdir(tmp_path)  # nothing written


def test_missing_workdir_is_reported():
  out = _run("--config=configs/tiny.py")
  assert out.returncode != 0
  assert "workdir" in out.stderr


def test_wrong_type_override_is_named(tmp_path):
  out = _run("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.model.ch=abc")
  assert out.returncode != 0
  assert "--config.model.ch=abc" in out.stderr
  assert "Traceback" not in out.stderr


# ---- One line per failure: checks that need no compile (each run imports JAX, ~seconds) ------
import json  # noqa: E402
import signal  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402


def _fails_with_one_line(out, *fragments):
  assert out.returncode == 1, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith("launch.py: ")
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A workdir as training leaves it (config.json, a checkpoint), made without compiling."""
  import jax.numpy as jnp
  from configs import tiny
  from ddpm import checkpointing, run_config
  workdir = tmp_path_factory.mktemp("trained")
  run_config.write(tiny.get_config(), workdir)
  mngr = checkpointing.create_manager(workdir / "checkpoints", async_save=False)
  checkpointing.save(mngr, 4, {"step": jnp.int32(4)})
  return workdir


def test_missing_config_file_is_one_line(tmp_path):
  _fails_with_one_line(_run("--config=configs/nope.py", f"--workdir={tmp_path / 'w'}"),
                       "--config=configs/nope.py: no such file")
  assert not (tmp_path / "w").exists()


def test_workdir_that_is_a_file_or_not_writable(tmp_path):
  (tmp_path / "file").write_text("x")
  _fails_with_one_line(_run("--config=configs/tiny.py", f"--workdir={tmp_path / 'file'}"),
                       f"{tmp_path / 'file'} is a file, not a directory")
  _fails_with_one_line(_run("--config=configs/tiny.py", f"--workdir={tmp_path / 'file' / 'w'}"),
                       "is not writable", "Not a directory")
  assert (tmp_path / "file").read_text() == "x"


def test_sample_without_checkpoint(tmp_path):
  _fails_with_one_line(_run("--config=configs/tiny.py", f"--workdir={tmp_path}", "--mode=sample"),
                       f"no checkpoint in {tmp_path / 'checkpoints'}")


def test_second_training_on_a_workdir_names_the_holder(trained_workdir, lock_holder):
  proc = lock_holder(trained_workdir)
  out = _run("--config=configs/tiny.py", f"--workdir={trained_workdir}")
  proc.kill()
  _fails_with_one_line(out, f"workdir {trained_workdir} is in use", f"pid {proc.pid}")
  assert sorted(os.listdir(trained_workdir / "checkpoints")) == ["4"]  # nothing touched


def test_resume_with_changed_diffusion_is_refused(trained_workdir):
  before = (trained_workdir / "config.json").read_text()
  out = _run("--config=configs/tiny.py", f"--workdir={trained_workdir}",
             "--config.diffusion.beta_schedule=cosine", "--config.training.num_train_steps=8")
  _fails_with_one_line(out, "diffusion.beta_schedule: 'linear' -> 'cosine'",
                       "--allow_config_change")
  assert "num_train_steps" not in out.stderr
  assert (trained_workdir / "config.json").read_text() == before


def test_sample_refuses_override_conflicting_with_record(trained_workdir):
  out = _run("--config=configs/tiny.py", f"--workdir={trained_workdir}", "--mode=sample",
             "--config.diffusion.model_mean_type=v")
  _fails_with_one_line(out, "diffusion.model_mean_type: 'eps' -> 'v'")
  assert json.loads((trained_workdir / "config.json").read_text())["diffusion"][
      "model_mean_type"] == "eps"


def test_sample_into_read_only_workdir_fails_before_sampling(trained_workdir, tmp_path):
  view = tmp_path / "read_only"
  view.mkdir()
  if os.geteuid() == 0:  # root writes through permissions: a read-only bind mount instead
    if subprocess.run(["mount", "--bind", str(trained_workdir), str(view)]).returncode != 0:
      pytest.skip("cannot bind-mount")
    subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
  else:
    view.rmdir()
    shutil.copytree(trained_workdir, view)
    os.chmod(view, 0o555)
  try:
    out = _run("--config=configs/tiny.py", f"--workdir={view}", "--mode=sample")
  finally:
    if os.geteuid() == 0:
      subprocess.run(["umount", str(view)], check=False)
    else:
      os.chmod(view, 0o755)
  _fails_with_one_line(out, f"workdir {view}", "not writable")


# ---- End to end on configs/tiny.py (compiles: slow) ----------------------------------------
def _damage_one_byte(step_dir):
  """Flips one byte in the middle of the largest array data file (same size)."""
  files = [os.path.join(r, n) for r, _, names in os.walk(os.path.join(step_dir, "state"))
           for n in names]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


def _truncate_arrays(step_dir):
  for r, _, names in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(r) == "d":
      for n in names:
        open(os.path.join(r, n), "wb").close()


def _warnings(stderr):
  return [l for l in stderr.splitlines() if l.startswith("W")]


@pytest.mark.slow
def test_operator_failures_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  tiny = ["--config=configs/tiny.py", f"--workdir={workdir}"]
  ckpt = workdir / "checkpoints"
  assert _run(*tiny).returncode == 0
  assert sorted(os.listdir(ckpt)) == ["2", "4"]
  # Damage of the newest checkpoint that keeps its size: set aside, resumed from step 2.
  _damage_one_byte(ckpt / "4")
  out = _run(*tiny, "--config.training.num_train_steps=6")
  assert out.returncode == 0, out.stderr
  assert "Traceback" not in out.stderr
  # (Orbax's own read error or our checksum, depending on where the byte lies.)
  assert any(str(ckpt / "4") in l for l in _warnings(out.stderr)), out.stderr
  assert "Resumed from checkpoint at step 2" in out.stderr
  assert sorted(n for n in os.listdir(ckpt) if n.isdigit()) == ["4", "6"] or sorted(
      n for n in os.listdir(ckpt) if n.isdigit()) == ["2", "4", "6"]
  # Truncated arrays, read by --mode=sample: one warning, no library noise, the previous step.
  _truncate_arrays(ckpt / "6")
  out = _run(*tiny, "--mode=sample")
  assert out.returncode == 0, out.stderr
  assert len(_warnings(out.stderr)) <= 2 and "Traceback" not in out.stderr
  assert "Exception ignored" not in out.stderr and "never retrieved" not in out.stderr
  assert os.path.exists(workdir / "samples" / "samples_4.npz")
  # SIGTERM while sampling: one line, exit code 128 + 15.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen([sys.executable, "launch.py", *tiny, "--mode=sample",
                           "--config.sampling.num_samples=100000"], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if "sampled" in line:
      proc.send_signal(signal.SIGTERM)
      break
  rest = proc.stderr.read()
  assert proc.wait(timeout=120) == 128 + signal.SIGTERM, "".join(seen) + rest
  assert rest.strip().splitlines()[-1].startswith("launch.py: stopped by SIGTERM (--mode=sample)")
  assert "Traceback" not in rest
  # A diverging fine-tune stops with one line naming a step after every logged one.
  # (grad_clip stays: switching it off would change the optimizer state, which then cannot be
  # restored -- also one line, but another one.)
  out = _run(*tiny, "--config.training.num_train_steps=12", "--config.optim.lr=1e30")
  assert _fails_with_one_line_at_end(out).startswith("launch.py: non-finite")


@pytest.mark.slow
def test_full_disk_during_training_is_one_line(tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  # configs/tiny.py checkpoints take ~1.5-2 MB each: room for the first only.
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs",
                                          str(disk)], capture_output=True).returncode != 0:
    pytest.skip("mounting a small tmpfs needs root")
  try:
    out = _run("--config=configs/tiny.py", f"--workdir={disk / 'run'}",
               "--config.training.num_train_steps=8")
    ckpt = disk / "run" / "checkpoints"
    line = _fails_with_one_line_at_end(out)
    assert line.startswith(f"launch.py: no space left on device while writing checkpoint 4 in "
                           f"{ckpt}; checkpoints up to 2 are intact"), line
    assert "Traceback" not in out.stderr and "meta_path" not in out.stderr
    assert "2" in os.listdir(ckpt)
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fails_with_one_line_at_end(out):
  """The last stderr line (after the run's progress logs), checking nothing else failed loudly."""
  assert out.returncode == 1, out.stderr
  lines = out.stderr.strip().splitlines()
  assert not any(l.startswith(("Traceback", "Exception ignored")) for l in lines), out.stderr
  return lines[-1]
