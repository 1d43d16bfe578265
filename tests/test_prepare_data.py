"""scripts/prepare_data.sh and the input pipeline's "dataset not prepared" error.

Fast (no TensorFlow): the error names the command with the dataset and data_dir filled in, comes
before anything compiles, and the script refuses bad names and missing manual files before it
installs anything. Slow: TFDS's real cifar10, mnist and lsun builders run on tiny fake source
files made here (only the sha256 comparison with the real archives is skipped: TFDS finds the
fakes in the manual dir under the original file names and extracts them itself), and what they
write is read back through the project's pipeline and trained on for 2 steps.
"""
import gzip
import importlib.util
import io
import os
import subprocess
import tarfile
import textwrap

import numpy as np
import pytest

from configs import tiny
from ddpm import evaluation, experiment, input_pipeline, train
from ddpm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "prepare_data.sh")
CIFAR_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck")


def load_helper():
  spec = importlib.util.spec_from_file_location(
      "prepare_data", os.path.join(ROOT, "scripts", "prepare_data.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tfds_config(dataset, data_dir, image_size=32, channels=3):
  config = tiny.get_config()
  config.data.dataset = dataset
  config.data.tfds_data_dir = str(data_dir)
  config.data.image_size, config.data.channels = image_size, channels
  config.model.attn_resolutions = (image_size // 2,)
  config.training.num_train_steps = 2
  config.training.log_every = 1
  config.training.sample_every = 0
  return config


def run_script(*args, env=None):
  return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=ROOT,
                        env={**os.environ, **(env or {})}, timeout=900)


# ---------------------------------------------------------------------------------------------
# Fast: the error message and the script's checks.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cifar10", "celeb_a_hq/256"])
def test_unprepared_dataset_error_names_the_command(tmp_path, name):
  config = tfds_config(name, tmp_path)
  with pytest.raises(input_pipeline.DatasetNotPreparedError) as info:
    input_pipeline.create_datasets(config, process_index=0, process_count=1)
  message = str(info.value)
  assert isinstance(info.value, UserError)  # launch.py prints it as one line, no traceback
  assert "\n" not in message
  assert f"`bash scripts/prepare_data.sh {name} --data_dir={tmp_path}`" in message


def test_unset_data_dir_names_tfds_default(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  with pytest.raises(UserError, match=f"prepare_data.sh mnist --data_dir={tmp_path}/tfds`"):
    input_pipeline.create_datasets(tfds_config("mnist", "", channels=1), process_index=0,
                                   process_count=1)


@pytest.mark.parametrize("run", [train.train_and_evaluate, evaluation.evaluate])
def test_train_and_eval_report_unprepared_data_before_compiling(tmp_path, monkeypatch, run):
  def setup_first(*args, **kwargs):
    raise AssertionError("the model was set up before the data was opened")
  monkeypatch.setattr(experiment, "setup", setup_first)
  with pytest.raises(input_pipeline.DatasetNotPreparedError, match="prepare_data.sh cifar10"):
    run(tfds_config("cifar10", tmp_path / "data"), str(tmp_path / "wd"))


def test_script_covers_exactly_the_pipelines_tfds_datasets():
  helper = load_helper()
  assert helper.DATASETS == tuple(input_pipeline.TFDS_DATASETS)
  assert set(helper.MANUAL_FILES) <= set(helper.DATASETS)


def test_script_refuses_unknown_name_before_installing(tmp_path):
  venv = tmp_path / "venv"
  out = run_script("cifar100", f"--data_dir={tmp_path}", env={"DDPM_PREPARE_VENV": str(venv)})
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      "prepare_data.sh: unknown dataset 'cifar100'; supported: " +
      ", ".join(input_pipeline.TFDS_DATASETS)]
  assert not venv.exists()
  out = run_script("cifar10", "--data-dir=x", env={"DDPM_PREPARE_VENV": str(venv)})
  assert out.returncode == 1 and "unknown flag '--data-dir=x'" in out.stderr
  assert not venv.exists()


@pytest.mark.parametrize("name, files", [
    ("celeb_a_hq/256", ["data256x256.tar"]),
    ("downsampled_imagenet/32x32", ["train_32x32.tar", "valid_32x32.tar"]),
])
def test_script_says_which_manual_files_go_where(tmp_path, name, files):
  venv = tmp_path / "venv"
  out = run_script(name, f"--data_dir={tmp_path}/data", env={"DDPM_PREPARE_VENV": str(venv)})
  assert out.returncode == 1 and not venv.exists()
  message = out.stderr.strip()
  assert "\n" not in message
  assert f"{', '.join(files)} (" in message  # every file, each by name
  assert f"must be in {tmp_path}/data/downloads/manual;" in message  # TFDS's default manual dir
  if len(files) > 1:  # only what is still missing, in --manual_dir
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / files[0]).write_bytes(b"")
    out = run_script(name, f"--manual_dir={manual}", env={"DDPM_PREPARE_VENV": str(venv)})
    assert out.returncode == 1 and not venv.exists()
    assert f": {files[1]} (" in out.stderr and files[0] not in out.stderr
    assert f"must be in {manual};" in out.stderr


# ---------------------------------------------------------------------------------------------
# Fake source files in the formats of the real downloads.
# ---------------------------------------------------------------------------------------------

def write_fake_cifar10(manual_dir, num_per_batch=4, seed=0):
  """cifar-10-binary.tar.gz as published: cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin
  (records of 1 label byte + 3072 bytes, R, G, B planes of 32x32) and batches.meta.txt.
  Returns {split: (uint8 [N, 32, 32, 3] images, labels)}."""
  rng = np.random.default_rng(seed)
  files, data = {}, {"train": ([], []), "test": ([], [])}
  for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    labels = rng.integers(0, 10, num_per_batch, dtype=np.uint8)
    planes = rng.integers(0, 256, (num_per_batch, 3, 32, 32), dtype=np.uint8)
    files[name] = np.concatenate([labels[:, None], planes.reshape(num_per_batch, -1)], 1)
    split = data["test" if name == "test_batch.bin" else "train"]
    split[0].append(planes.transpose(0, 2, 3, 1))
    split[1].append(labels)
  files = {k: v.tobytes() for k, v in files.items()}
  files["batches.meta.txt"] = ("\n".join(CIFAR_LABELS) + "\n\n").encode()
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, "cifar-10-binary.tar.gz"), "w:gz") as tar:
    for name, content in files.items():
      member = tarfile.TarInfo("cifar-10-batches-bin/" + name)
      member.size = len(content)
      tar.addfile(member, io.BytesIO(content))
  return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in data.items()}


def write_fake_mnist(manual_dir, sizes=(("train", 12), ("t10k", 4)), seed=1):
  """The four MNIST idx files (gzip): magic 2051 / 2049, counts and 28x28 sizes as big-endian
  int32, then bytes. Returns {split: (uint8 [N, 28, 28, 1] images, labels)}."""
  rng = np.random.default_rng(seed)
  os.makedirs(manual_dir, exist_ok=True)
  out = {}
  for prefix, n in sizes:
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    for kind, header, body in (("images-idx3", [2051, n, 28, 28], images),
                               ("labels-idx1", [2049, n], labels)):
      with gzip.open(os.path.join(manual_dir, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
        f.write(np.asarray(header, ">i4").tobytes() + body.tobytes())
    out["train" if prefix == "train" else "test"] = (images[..., None], labels)
  return out


def sorted_images(images):
  """Order-free comparison: TFDS shuffles examples by key when it writes them."""
  flat = np.asarray(images).reshape(len(images), -1)
  return flat[np.lexsort(flat.T[::-1])]


def assert_pipeline_reads(config, expected, pad=0):
  """The project's pipeline returns exactly the fake source images of both splits."""
  ds = input_pipeline.create_datasets(config, process_index=0, process_count=1)
  for split, (images, labels) in expected.items():
    assert ds.info[f"num_{split}"] == len(images)
  test = ds.eval_images(len(expected["test"][0]))
  if pad:
    assert not test[:, :pad].any() and not test[:, -pad:].any()  # zero padding 28 -> 32
    test = test[:, pad:-pad, pad:-pad]
  np.testing.assert_array_equal(sorted_images(test), sorted_images(expected["test"][0]))
  assert ds.info["num_classes"] == 10
  batch = next(ds.train_iter)
  assert set(batch["label"].tolist()) <= set(expected["train"][1].tolist())


def train_two_steps(config, workdir):
  state = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 2
  assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))


# ---------------------------------------------------------------------------------------------
# Slow: TFDS's real builders in this process (needs TensorFlow here).
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_downloads_accepted(monkeypatch):
  """TFDS compares manually placed downloads with the real archives' sha256: skip only that."""
  from tensorflow_datasets.core.download import download_manager

  def record_only(self, url, url_info, path):
    self._recorded_url_infos[url] = url_info  # pylint: disable=protected-access
  monkeypatch.setattr(download_manager.DownloadManager, "_register_or_validate_checksums",
                      record_only)


@pytest.mark.slow
def test_real_builders_on_fake_sources_then_train(tmp_path, monkeypatch, fake_downloads_accepted):
  pytest.importorskip("tensorflow")
  from tensorflow_datasets.image_classification import mnist
  helper = load_helper()
  manual, data = tmp_path / "manual", tmp_path / "data"
  cifar = write_fake_cifar10(manual)
  digits = write_fake_mnist(manual)
  # The builder reads a fixed 60000 / 10000 images; TFDS's own mnist test sets them the same way.
  monkeypatch.setattr(mnist, "_TRAIN_EXAMPLES", 12)
  monkeypatch.setattr(mnist, "_TEST_EXAMPLES", 4)
  assert helper.build("cifar10", str(data), str(manual)) == {"train": 20, "test": 4}
  assert helper.build("mnist", str(data), str(manual)) == {"train": 12, "test": 4}

  cifar_config = tfds_config("cifar10", data)
  assert_pipeline_reads(cifar_config, cifar)
  mnist_config = tfds_config("mnist", data, channels=1)
  assert_pipeline_reads(mnist_config, digits, pad=2)
  train_two_steps(cifar_config, tmp_path / "cifar_run")
  train_two_steps(mnist_config, tmp_path / "mnist_run")


# ---------------------------------------------------------------------------------------------
# Slow: the script end to end, in a preparation env made by the script before.
# ---------------------------------------------------------------------------------------------

# Put on PYTHONPATH of the script's run: Python imports it at start-up in every interpreter.
_SITECUSTOMIZE = textwrap.dedent('''\
    try:
      from tensorflow_datasets.core.download import download_manager as _dm
    except ImportError:  # the script's first step runs without TFDS
      _dm = None
    if _dm is not None:
      def _record_only(self, url, url_info, path):
        self._recorded_url_infos[url] = url_info
      _dm.DownloadManager._register_or_validate_checksums = _record_only
    ''')

_FAKE_LSUN = textwrap.dedent('''\
    import io, os, sys, zipfile
    import lmdb, numpy as np
    from PIL import Image
    manual, work = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(2)
    for split, n in (("train", 5), ("val", 3)):
      name = f"church_outdoor_{split}_lmdb"
      env = lmdb.open(os.path.join(work, name), map_size=1 << 24)
      with env.begin(write=True) as txn:
        for i in range(n):
          image = rng.integers(0, 256, (24 + i, 30, 3), dtype=np.uint8)
          buf = io.BytesIO()
          Image.fromarray(image).save(buf, "JPEG")
          txn.put(f"{split}{i:03d}".encode(), buf.getvalue())
      env.close()
      with zipfile.ZipFile(os.path.join(manual, name + ".zip"), "w") as z:
        for f in os.listdir(os.path.join(work, name)):
          z.write(os.path.join(work, name, f), f"{name}/{f}")
    ''')


@pytest.fixture(scope="module")
def prepare_venv():
  venv = os.environ.get("DDPM_PREPARE_VENV") or os.path.join(ROOT, ".venv-prepare")
  if not os.path.exists(os.path.join(venv, "bin", "python")):
    pytest.skip(f"no preparation env at {venv}: run scripts/prepare_data.sh once (or set "
                "DDPM_PREPARE_VENV)")
  return venv


@pytest.mark.slow
def test_script_end_to_end_with_fake_downloads(tmp_path, prepare_venv):
  hook = tmp_path / "hook"
  hook.mkdir()
  (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
  manual, data = tmp_path / "manual", tmp_path / "data"
  cifar = write_fake_cifar10(manual, seed=3)
  subprocess.run([os.path.join(prepare_venv, "bin", "python"), "-c", _FAKE_LSUN, str(manual),
                  str(tmp_path)], check=True)
  env = {"DDPM_PREPARE_VENV": prepare_venv, "PYTHONPATH": str(hook)}

  out = run_script("cifar10", f"--data_dir={data}", f"--manual_dir={manual}", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == f"--config.data.tfds_data_dir={data}"
  assert "cifar10 is ready" in out.stdout and "test 4, train 20 examples" in out.stdout
  assert os.path.isdir(data / "cifar10" / "3.0.2")
  config = tfds_config("cifar10", data)
  assert_pipeline_reads(config, cifar)
  train_two_steps(config, tmp_path / "run")

  out = run_script("lsun/church_outdoor", f"--data_dir={data}", f"--manual_dir={manual}",
                   env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "train 5, validation 3 examples" in out.stdout
  ds = input_pipeline.create_datasets(tfds_config("lsun/church_outdoor", data, image_size=16),
                                      process_index=0, process_count=1)
  assert (ds.info["num_train"], ds.info["num_test"]) == (5, 3)
  assert next(ds.train_iter)["image"].shape == (8, 16, 16, 3)
