"""ddpm/workdir.py: the start-up check's one-line errors, whole-file writes, metrics.jsonl.

gs:// end to end (training, sampling, evaluation on an emulator) is in test_gcs.py.
"""
import http.server
import importlib.util
import json
import os
import threading

import pytest

from conftest import clear_gcs_clients
from ddpm import workdir
from ddpm.errors import UserError


# ---- check_workdir ---------------------------------------------------------------------------
def test_local_workdir_is_created_and_left_clean(tmp_path):
  workdir.check_workdir(str(tmp_path / "a" / "b"))
  assert os.listdir(tmp_path / "a" / "b") == []  # the write probe is removed


def test_local_workdir_that_is_a_file_is_named(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(UserError, match=f"workdir {f} is a file, not a directory"):
    workdir.check_workdir(str(f))
  with pytest.raises(UserError, match=f"workdir {f}/run is not writable: Not a directory"):
    workdir.check_workdir(str(f / "run"))


def test_emulator_needs_both_variables(monkeypatch):
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
  monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL", raising=False)
  with pytest.raises(UserError, match=r"workdir gs://b/run: .*STORAGE_EMULATOR_HOST.*"
                                      r"TENSORSTORE_GCS_HTTP_URL.*same address"):
    workdir.check_workdir("gs://b/run")
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://127.0.0.1:2")
  with pytest.raises(UserError, match="same address"):
    workdir.check_workdir("gs://b/run")


def test_url_errors_name_the_cause():
  with pytest.raises(UserError, match="workdir gs:///run names no bucket"):
    workdir.check_workdir("gs:///run")
  with pytest.raises(UserError, match=r"workdir ftp://b/run: ftp:// is not supported"):
    workdir.check_workdir("ftp://b/run")


def test_s3_without_s3fs_says_what_to_install():
  if importlib.util.find_spec("s3fs") is not None:
    pytest.skip("s3fs is installed")
  with pytest.raises(UserError, match=r"workdir s3://b/run: s3:// needs the s3fs package"):
    workdir.check_workdir("s3://b/run")


class _Unauthorized(http.server.BaseHTTPRequestHandler):
  """Answers every request like Cloud Storage answers an anonymous caller."""

  def _reply(self):
    body = json.dumps({"error": {"code": 401, "message": "Anonymous caller does not have "
                                 "storage.objects.list access to the Google Cloud Storage "
                                 "bucket."}}).encode()
    self.send_response(401)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = _reply

  def log_message(self, *args):
    pass


def test_gcs_without_credentials_fails_in_one_line(monkeypatch):
  pytest.importorskip("gcsfs")
  server = http.server.HTTPServer(("127.0.0.1", 0), _Unauthorized)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{server.server_address[1]}"
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
  clear_gcs_clients()
  try:
    with pytest.raises(UserError) as err:
      workdir.check_workdir("gs://bucket/run")
  finally:
    server.shutdown()
    clear_gcs_clients()
  msg = str(err.value)
  assert msg.startswith("workdir gs://bucket/run: cannot write to bucket gs://bucket: access "
                        "denied (Anonymous caller"), msg
  assert "credentials" in msg and "\n" not in msg


# ---- whole-file writes -----------------------------------------------------------------------
def test_write_bytes_replaces_whole_files_without_leftovers(tmp_path):
  dest = tmp_path / "sub" / "x.json"
  assert workdir.write_json(dest, {"a": 1}) == str(dest)
  workdir.write_json(dest, {"a": 2})
  assert workdir.read_json(dest) == {"a": 2}
  assert os.listdir(tmp_path / "sub") == ["x.json"]


# ---- metrics ---------------------------------------------------------------------------------
def _steps(path):
  return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_metrics_resume_drops_rows_past_the_checkpoint(tmp_path):
  w = workdir.MetricsWriter(tmp_path)
  for step in (2, 4, 6):
    w.write(step, {"loss": 1.0 / step})
    assert _steps(tmp_path / "metrics.jsonl")[-1] == step  # complete after every write
  w.close()  # a preemption after step 6; the newest checkpoint is step 4
  w = workdir.MetricsWriter(tmp_path, start_step=4)
  assert _steps(tmp_path / "metrics.jsonl") == [2, 4]
  w.write(6, {"loss": 0.5})
  w.close()
  assert _steps(tmp_path / "metrics.jsonl") == [2, 4, 6]
  assert [r["loss"] for r in workdir.read_metrics(tmp_path)] == [0.5, 0.25, 0.5]
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "tensorboard"]


def test_metrics_torn_line_is_skipped_and_disabled_writer_writes_nothing(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "lo')
  assert workdir.read_metrics(tmp_path) == [{"step": 2, "loss": 1.0}]
  other = tmp_path / "other"
  w = workdir.MetricsWriter(other, enabled=False)
  w.write(2, {"loss": 1.0})
  w.close()
  assert not other.exists()


def test_check_without_create_leaves_no_folder_and_names_unwritable_parents(tmp_path):
  target = tmp_path / "a" / "b"
  workdir.check_workdir(str(target), create=False)
  assert not (tmp_path / "a").exists()
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(UserError, match=f"workdir {f}/run/x is not writable: {f} is a file"):
    workdir.check_workdir(str(f / "run" / "x"), create=False)
