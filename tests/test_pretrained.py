"""ddpm.pretrained: torch files without torch, diffusers UNet2DModel folders in and out, and
launch.py --mode=import / --mode=export.

The peers' outputs come from committed fixtures written by scripts/make_pretrained_fixtures.py
with PyTorch and diffusers (random-weight UNet2DModels in the DDPM layout, their inputs at
t = 0, T/2, T - 1 and float64 outputs); tests that run diffusers itself skip without it.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from configs import celebahq256_ddpm, cifar10_ddpm, default, tiny
from ddpm import models
from ddpm.errors import UserError
from ddpm.pretrained import diffusers_format, mapping, torch_pickle
import ddpm.pretrained as pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
DIFFUSERS = os.path.join(FIXTURES, "diffusers")
TORCH_PICKLE = os.path.join(FIXTURES, "torch_pickle")


def ddpm_layout_config(image_size, ch, ch_mult, num_res_blocks, attn_resolutions, **model):
  """A small config in the DDPM layout of the fixtures (RGB, T = 1000, norm_groups=2)."""
  config = default.get_config()
  config.data.image_size, config.data.channels = image_size, 3
  config.model.update(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                      attn_resolutions=attn_resolutions, dropout=0.0, norm_groups=2, **model)
  return config


FIXTURE_CONFIGS = {
    "ddpm32": lambda: ddpm_layout_config(32, 4, (1, 2, 2), 2, (16,)),
    "heads16": lambda: ddpm_layout_config(16, 4, (1, 2), 1, (8,), num_head_channels=4),
}


def relative_error(ours, theirs):
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def forward(config):
  """The jitted U-Net of `config`: (params, x [B, H, W, C], t [B]) -> numpy [B, H, W, C']."""
  model = models.build_model(config)
  fn = jax.jit(lambda params, x, t: model.apply({"params": params}, x, t))
  return lambda params, x, t: np.asarray(fn(params, x, t))


# ---- torch files -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tensors.pt", "tensors_big_endian.pt"])
def test_torch_pickle_reads_what_torch_save_wrote(name):
  got = torch_pickle.load(os.path.join(TORCH_PICKLE, name))
  want = np.load(os.path.join(TORCH_PICKLE, "tensors.npz"))
  assert list(got) == list(want.keys())
  for key, value in got.items():
    expected = want[key]
    if key == "bfloat16":
      assert value.dtype.name == "bfloat16"
      value = value.astype(np.float32)
    else:
      assert value.dtype == expected.dtype.newbyteorder("="), key
    assert value.dtype.isnative
    np.testing.assert_array_equal(value, expected, err_msg=key)


def test_torch_pickle_refuses_pickled_code():
  with pytest.raises(UserError, match=r"refusing to load .*pickled_code\.pt.*\.system"):
    torch_pickle.load(os.path.join(TORCH_PICKLE, "pickled_code.pt"))


def test_torch_pickle_bad_files(tmp_path):
  source = os.path.join(TORCH_PICKLE, "tensors.pt")
  truncated = tmp_path / "truncated.pt"
  truncated.write_bytes(open(source, "rb").read()[:2000])
  foreign = tmp_path / "notes.pt"
  foreign.write_text("hello")
  other_zip = tmp_path / "other.pt"
  with zipfile.ZipFile(other_zip, "w") as z:
    z.writestr("readme.txt", "not torch")
  for path, message in ((truncated, "cannot read"), (foreign, "not a PyTorch zip archive"),
                        (other_zip, "not a PyTorch file"),
                        (tmp_path / "absent.pt", "no such file")):
    with pytest.raises(UserError, match=message):
      torch_pickle.load(str(path))


# ---- diffusers folders: outputs equal to the peer's ----------------------------------------
@pytest.mark.parametrize("name", sorted(FIXTURE_CONFIGS))
def test_diffusers_outputs_equal(name):
  """ddpm32: a safetensors folder; heads16: a torch .bin with the old attention names and 4
  channels per head. Inputs at t = 0, T/2, T - 1."""
  config = FIXTURE_CONFIGS[name]()
  params = pretrained.load(os.path.join(DIFFUSERS, name), config)
  io = np.load(os.path.join(DIFFUSERS, f"{name}_io.npz"))
  assert list(io["t"]) == [0, 500, 999]
  apply = forward(config)
  assert relative_error(apply(params, io["x"], io["t"]), io["out"]) < 1e-4
  # The embedding matters: the same inputs at other timesteps give other outputs.
  assert relative_error(apply(params, io["x"], io["t"][::-1]), io["out"]) > 1e-2


@pytest.mark.parametrize("name,get_config,count", [
    ("cifar10_32", cifar10_ddpm.get_config, 35_746_307),
    ("ddpm_256", celebahq256_ddpm.get_config, 113_673_219)])
def test_full_size_ddpm_layouts_match_our_paper_configs(name, get_config, count):
  """UNet2DModel's state dicts with the DDPM releases' configs (names and shapes written by the
  fixture script) fit our paper configs tensor for tensor, and their config.json checks pass."""
  layout = json.load(open(os.path.join(DIFFUSERS, "full_size_layouts.json")))[name]
  config = get_config()
  diffusers_format.check_config(layout["config"], config, name)
  names = diffusers_format.match(layout["shapes"], config, name)
  assert sorted(names.values()) == sorted(layout["shapes"])
  assert layout["num_params"] == count == sum(
      int(np.prod(s)) for s in mapping.param_shapes(config).values())


@pytest.mark.parametrize("override,message", [
    (dict(ch=8), r"block_out_channels=\[4, 8, 8\], but the config's model.ch, model.ch_mult "
                 r"give \[8, 16, 16\]"),
    (dict(num_res_blocks=1), r"layers_per_block=2, but the config's model.num_res_blocks gives 1"),
    (dict(attn_resolutions=(8,)), r"down_block_types=.*model.attn_resolutions"),
    (dict(norm_groups=4), r"norm_num_groups=2, but the config's model.norm_groups gives 4"),
    (dict(num_heads=2), r"attention_head_dim=None, but the config's model.num_heads"),
])
def test_folder_config_mismatch_names_both_values_and_key(override, message):
  config = FIXTURE_CONFIGS["ddpm32"]()
  config.model.update(**override)
  with pytest.raises(UserError, match=message):
    pretrained.load(os.path.join(DIFFUSERS, "ddpm32"), config)


def test_state_dict_mismatch_names_first_tensor_and_key(tmp_path):
  config = FIXTURE_CONFIGS["ddpm32"]()
  weights = safetensors_numpy.load_file(
      os.path.join(DIFFUSERS, "ddpm32", "diffusion_pytorch_model.safetensors"))

  def load_with(state_dict):
    path = str(tmp_path / "weights.safetensors")
    safetensors_numpy.save_file(state_dict, path)
    return pretrained.load(path, config)

  missing = {k: v for k, v in weights.items() if k != "down_blocks.1.attentions.1.to_q.weight"}
  with pytest.raises(UserError, match=r"tensor down_blocks.1.attentions.1.to_q.weight is "
                     r"missing.*model.attn_resolutions"):
    load_with(missing)
  extra = dict(weights, **{"down_blocks.0.resnets.2.conv1.bias": np.zeros(4, np.float32)})
  with pytest.raises(UserError, match=r"unexpected tensor down_blocks.0.resnets.2.conv1.bias"
                     r".*model.num_res_blocks"):
    load_with(extra)
  bad = dict(weights, **{"conv_out.weight": np.zeros((6, 4, 3, 3), np.float32)})
  with pytest.raises(UserError, match=r"conv_out.weight has shape \[6, 4, 3, 3\], the config "
                     r"needs \[3, 4, 3, 3\].*diffusion.model_var_type"):
    load_with(bad)
  # A bare state dict needs no config.json: the weights alone give the model's outputs.
  io = np.load(os.path.join(DIFFUSERS, "ddpm32_io.npz"))
  assert relative_error(forward(config)(load_with(weights), io["x"], io["t"]), io["out"]) < 1e-4


def test_bad_paths(tmp_path):
  config = FIXTURE_CONFIGS["ddpm32"]()
  empty = tmp_path / "empty"
  empty.mkdir()
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  shutil.copy(os.path.join(DIFFUSERS, "ddpm32", "config.json"), no_weights)
  for path, message in ((empty, "not a diffusers model folder: config.json not found"),
                        (no_weights, "diffusion_pytorch_model.safetensors or "
                                     "diffusion_pytorch_model.bin not found"),
                        (tmp_path / "nothing", "no checkpoint at"),
                        (os.path.join(TORCH_PICKLE, "tensors.npz"), "unknown checkpoint format"),
                        (os.path.join(TORCH_PICKLE, "pickled_code.pt"), "refusing to load")):
    with pytest.raises(UserError, match=message):
      pretrained.load(str(path), config)
  truncated = tmp_path / "truncated"
  shutil.copytree(os.path.join(DIFFUSERS, "ddpm32"), truncated)
  weights = truncated / "diffusion_pytorch_model.safetensors"
  weights.write_bytes(weights.read_bytes()[:5000])
  with pytest.raises(UserError, match="not a complete safetensors file"):
    pretrained.load(str(truncated), config)


def test_improved_diffusion_pt_through_load():
  """improved-diffusion's state dict as torch.save wrote it (float16 tensors) -> load() -> the
  peer's outputs (fixture of scripts/make_improved_diffusion_fixtures.py)."""
  import importlib
  with np.load(os.path.join(FIXTURES, "improved_diffusion_cifar10_tiny.npz")) as f:
    config = importlib.import_module(f"configs.{f['base']}").get_config()
    for key, value in json.loads(f["overrides"].item()).items():
      group, name = key.split(".")
      config[group][name] = tuple(value) if isinstance(value, list) else value
    x, t, want = f["x"].astype(np.float32), f["t"], f["out"]
  params = pretrained.load(os.path.join(TORCH_PICKLE, "improved_diffusion_cifar10_tiny.pt"),
                           config)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  assert relative_error(forward(config)(params, x, t), want) < 1e-4


def test_foreign_state_dict_is_named():
  # Not a UNet2DModel's: load() asks the improved-diffusion importer (issue 14's other half).
  pytest.importorskip("ddpm.pretrained.improved_diffusion")
  with pytest.raises(UserError, match="neither a diffusers UNet2DModel nor an improved-diffusion"):
    pretrained.load(os.path.join(TORCH_PICKLE, "tensors.pt"), FIXTURE_CONFIGS["ddpm32"]())


@pytest.mark.slow
def test_full_size_cifar10_ddpm_equals_diffusers(tmp_path):
  """A random-weight UNet2DModel with google/ddpm-cifar10-32's config (35,746,307 parameters),
  saved as a diffusers folder, gives our configs/cifar10_ddpm.py network its outputs."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  layout = json.load(open(os.path.join(DIFFUSERS, "full_size_layouts.json")))["cifar10_32"]
  model = diffusers.UNet2DModel(**{k: v for k, v in layout["config"].items()
                                   if not k.startswith("_")})
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p[0].numel() if p.ndim > 1 else 5.0)
              + (1.0 if name.endswith("norm1.weight") else 0.0))
  model.save_pretrained(str(tmp_path / "hub"))
  x = torch.randn((3, 3, 32, 32), generator=gen, dtype=torch.float64)
  t = torch.tensor([0, 500, 999])
  with torch.no_grad():
    want = model.double()(x, t).sample.permute(0, 2, 3, 1).numpy()
  config = cifar10_ddpm.get_config()
  params = pretrained.load(str(tmp_path / "hub"), config)
  got = forward(config)(params, x.permute(0, 2, 3, 1).float().numpy(), t.numpy())
  assert relative_error(got, want) < 1e-4


def test_tf_checkpoint_names_and_ema():
  """diffusion_tf's variable names (from its models/unet.py scopes), the EMA copies preferred and
  the Adam slots ignored; TensorFlow itself is only needed to read the files."""
  from ddpm.pretrained import tf_checkpoint
  names = {tf_checkpoint.tf_name(p) for p in mapping.param_shapes(cifar10_ddpm.get_config())}
  assert len(names) == 328
  assert {"model/conv_in/W", "model/temb/dense0/W", "model/temb/dense1/b",
          "model/down_0/block_0/norm1/gamma", "model/down_0/block_0/temb_proj/W",
          "model/down_1/block_0/nin_shortcut/W", "model/down_1/attn_1/q/W",
          "model/down_2/downsample/conv/W", "model/mid/block_1/conv2/b",
          "model/mid/attn_1/proj_out/W",
          "model/up_3/block_2/norm2/beta", "model/up_1/upsample/conv/W", "model/norm_out/gamma",
          "model/conv_out/b"} <= names
  config = tiny_config()
  shapes = mapping.param_shapes(config)
  rng = np.random.default_rng(1)
  variables = {"global_step": np.int64(5)}
  for path, shape in shapes.items():
    name = tf_checkpoint.tf_name(path)
    variables[name] = np.zeros(shape, np.float32)
    variables[name + "/Adam"] = np.ones(shape, np.float32)
    variables[name + "/ExponentialMovingAverage"] = rng.normal(size=shape).astype(np.float32)
  params = mapping.flatten(tf_checkpoint.to_params(variables, config))
  for path in shapes:
    np.testing.assert_array_equal(
        params[path], variables[tf_checkpoint.tf_name(path) + "/ExponentialMovingAverage"])
  raw = mapping.flatten(tf_checkpoint.to_params(variables, config, ema=False))
  assert all(not raw[p].any() for p in shapes)
  del variables["model/conv_in/W"]
  with pytest.raises(UserError, match="tensor model/conv_in/W is missing"):
    tf_checkpoint.to_params(variables, config)


# ---- export ------------------------------------------------------------------------------------
def test_export_round_trip_and_refusals(tmp_path):
  config = FIXTURE_CONFIGS["ddpm32"]()
  folder = os.path.join(DIFFUSERS, "ddpm32")
  params = pretrained.load(folder, config)
  out = str(tmp_path / "exported")
  pretrained.export(params, config, out)
  assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
  ours = safetensors_numpy.load_file(os.path.join(out, "diffusion_pytorch_model.safetensors"))
  theirs = safetensors_numpy.load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  assert sorted(ours) == sorted(theirs)
  for name in theirs:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
  reloaded = pretrained.load(out, config)
  jax.tree.map(np.testing.assert_array_equal, reloaded, params)
  with pytest.raises(UserError, match="exists and is not an empty folder"):
    pretrained.export(params, config, out)

  for key, value, message in (
      ("model.use_scale_shift_norm", True, "model.use_scale_shift_norm=True"),
      ("diffusion.model_var_type", "learned_range", "learned variance"),
      ("model.norm_groups", 0, r"different group counts \(2 for 4 channels, 4 for 8 channels"),
      ("model.resamp_with_conv", False, "model.resamp_with_conv=False")):
    bad = FIXTURE_CONFIGS["ddpm32"]()
    group, field = key.split(".")
    bad[group][field] = value
    target = str(tmp_path / f"refused_{field}")
    with pytest.raises(UserError, match=f"cannot express this config: .*{message}"):
      pretrained.export(params, bad, target)
    assert not os.path.exists(target)


def test_exported_folder_runs_in_diffusers(tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  config = FIXTURE_CONFIGS["heads16"]()
  params = pretrained.load(os.path.join(DIFFUSERS, "heads16"), config)
  pretrained.export(params, config, str(tmp_path / "out"))
  model = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "out")).double().eval()
  io = np.load(os.path.join(DIFFUSERS, "heads16_io.npz"))
  with torch.no_grad():
    out = model(torch.from_numpy(io["x"]).double().permute(0, 3, 1, 2),
                torch.from_numpy(io["t"]).long()).sample.permute(0, 2, 3, 1).numpy()
  assert relative_error(out, io["out"]) < 1e-6  # the same network, weights and inputs


# ---- launch.py --mode=import / eval / export ----------------------------------------------------
def tiny_config():
  config = tiny.get_config()
  config.model.norm_groups = 4  # one group count for UNet2DModel's norm_num_groups
  return config


def test_import_eval_export_round_trip(tmp_path):
  """A diffusers folder -> W/checkpoints (step 0) -> bits/dim -> a diffusers folder again."""
  from ddpm import checkpointing, evaluation
  config = tiny_config()
  # Random weights everywhere (the zero-initialised output layers would hide a mix-up).
  rng = np.random.default_rng(0)
  params = mapping.nest({path: rng.normal(0, 0.3, shape).astype(np.float32)
                         for path, shape in mapping.param_shapes(config).items()})
  source = str(tmp_path / "source")
  pretrained.export(params, config, source)

  workdir = str(tmp_path / "w")
  assert pretrained.import_checkpoint(config, workdir, source) == 0
  assert checkpointing.latest_step(os.path.join(workdir, "checkpoints")) == 0
  ema, step, _ = evaluation.load_ema_params(config, workdir)
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, ema), params)
  with pytest.raises(UserError, match="already holds checkpoint step 0"):
    pretrained.import_checkpoint(config, workdir, source)

  results = evaluation.run_eval(config, workdir)
  assert np.isfinite(results["bpd"]) and results["bpd"] > 0
  assert os.path.exists(os.path.join(workdir, "eval", "eval_0.json"))

  exported = str(tmp_path / "exported")
  pretrained.export_checkpoint(config, workdir, exported)
  for name in ("config.json", "diffusion_pytorch_model.safetensors"):
    assert open(os.path.join(exported, name), "rb").read() == open(
        os.path.join(source, name), "rb").read(), name


def test_import_of_mismatched_weights_writes_nothing(tmp_path):
  config = FIXTURE_CONFIGS["ddpm32"]()
  config.model.num_res_blocks = 1
  with pytest.raises(UserError, match="layers_per_block=2, but the config's model.num_res_blocks"):
    pretrained.import_checkpoint(config, str(tmp_path / "w"), os.path.join(DIFFUSERS, "ddpm32"))
  with pytest.raises(UserError, match="not a diffusers model folder"):
    pretrained.import_checkpoint(config, str(tmp_path / "w"), str(tmp_path))
  assert os.listdir(tmp_path) == []


def _launch(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_launch_import_bad_input_writes_nothing(tmp_path):
  workdir = tmp_path / "w"
  out = _launch("--config=configs/tiny.py", f"--workdir={workdir}", "--mode=import",
                f"--import_from={os.path.join(TORCH_PICKLE, 'pickled_code.pt')}")
  assert out.returncode == 1
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("launch.py: refusing to load") and "system" in last
  assert not workdir.exists()
  out = _launch("--config=configs/tiny.py", f"--workdir={workdir}", "--mode=export")
  assert out.returncode == 1 and "--mode=export needs --export_to=PATH" in out.stderr
  assert not workdir.exists()
