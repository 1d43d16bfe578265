"""launch.py as a user runs it: flags, help and config errors (subprocesses, no training)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=120):
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
