"""Writes the committed fixtures of tests/test_pretrained.py with the peers' own code.

Needs PyTorch and diffusers (not ddpm-jax dependencies), e.g. a separate venv:
  python3 -m venv ~/torch-venv && ~/torch-venv/bin/pip install torch==2.13.0 diffusers==0.42.1
  ~/torch-venv/bin/python scripts/make_pretrained_fixtures.py [--out=tests/fixtures]

Writes (about 0.4 MB in all):
  diffusers/ddpm32/      random-weight diffusers UNet2DModel in the DDPM layout (32x32, three
                         levels, attention at 16x16, one head, two blocks per level), a
                         save_pretrained folder (config.json + diffusion_pytorch_model.safetensors)
  diffusers/ddpm32_io.npz  its inputs (x NHWC, t = 0, T/2, T - 1) and outputs (NHWC, computed
                         in float64)
  diffusers/heads16/     a 16x16 variant with attention_head_dim=4 (several heads) saved as a
                         torch .bin with the old attention names (query/key/value/proj_attn),
                         as the hub's 2022 DDPM folders have them; heads16_io.npz likewise
  diffusers/full_size_layouts.json  names and shapes of the full-size DDPM state dicts (the
                         google/ddpm-cifar10-32 and ddpm-*-256 configs) and their parameter
                         counts, checked here to be 35,746,307 and 113,673,219
  torch_pickle/tensors.pt, tensors_big_endian.pt  torch.save of tensors of several dtypes,
                         views with offsets and strides, a Parameter, a 0-d and an empty tensor;
                         tensors.npz the expected arrays
  torch_pickle/pickled_code.pt  a torch.save file whose pickle calls os.system (must be refused)
  torch_pickle/improved_diffusion_cifar10_tiny.pt  the improved-diffusion UNetModel state dict of
                         tests/fixtures/improved_diffusion_cifar10_tiny.npz (written by
                         scripts/make_improved_diffusion_fixtures.py) as torch.save wrote it,
                         float16 tensors as in that file: the .pt route of ddpm.pretrained.load
"""
import argparse
import collections
import io
import json
import os
import pickle
import shutil
import zipfile

import numpy as np
import torch
from diffusers import UNet2DModel

T = 1000
# diffusers' settings of the DDPM releases (google/ddpm-cifar10-32's config.json).
DDPM_SETTINGS = dict(
    time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
    downsample_padding=0, norm_eps=1e-6, act_fn="silu", attention_head_dim=None,
    mid_block_scale_factor=1, center_input_sample=False)
FULL_SIZE = {
    # name: (sample_size, block_out_channels, attention levels, expected parameter count)
    "cifar10_32": (32, (128, 256, 256, 256), (1,), 35_746_307),
    "ddpm_256": (256, (128, 128, 256, 256, 512, 512), (4,), 113_673_219),
}


def ddpm_unet(sample_size, block_out_channels, attn_levels, layers_per_block=2,
              norm_num_groups=32, **overrides):
  levels = len(block_out_channels)
  down = ["AttnDownBlock2D" if l in attn_levels else "DownBlock2D" for l in range(levels)]
  up = ["AttnUpBlock2D" if l in attn_levels else "UpBlock2D" for l in reversed(range(levels))]
  kwargs = dict(DDPM_SETTINGS, sample_size=sample_size, in_channels=3, out_channels=3,
                block_out_channels=block_out_channels, down_block_types=down,
                up_block_types=up, layers_per_block=layers_per_block,
                norm_num_groups=norm_num_groups)
  kwargs.update(overrides)
  return UNet2DModel(**kwargs)


def randomize(model, seed):
  """Every weight random (diffusers zero-initialises none of them, but GroupNorm starts at 1/0):
  a wrong layout, scale or order anywhere shows in the output."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
  return model


def reference_io(model, size, seed):
  """Inputs at t = 0, T/2, T - 1 and float64 outputs, NHWC."""
  gen = torch.Generator().manual_seed(seed)
  x = torch.randn((3, 3, size, size), generator=gen, dtype=torch.float64)
  t = torch.tensor([0, T // 2, T - 1])
  with torch.no_grad():
    out = model.double()(x, t).sample
  model.float()
  nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()
  return dict(x=nhwc(x).astype(np.float32), t=t.numpy().astype(np.int32),
              out=nhwc(out).astype(np.float32))


def old_attention_names(state_dict):
  rename = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  out = collections.OrderedDict()
  for name, value in state_dict.items():
    for new, old in rename.items():
      if ".attentions." in name and f".{new}." in name:
        name = name.replace(f".{new}.", f".{old}.")
    out[name] = value
  return out


def write_diffusers(out):
  d = os.path.join(out, "diffusers")
  os.makedirs(d, exist_ok=True)
  # 32x32, ch 4, ch_mult (1, 2, 2), two blocks per level, attention at 16x16 (level 1), one head.
  # norm_num_groups=2 divides every GroupNorm width (4 .. 16).
  model = randomize(ddpm_unet(32, (4, 8, 8), (1,), norm_num_groups=2), seed=1).eval()
  folder = os.path.join(d, "ddpm32")
  shutil.rmtree(folder, ignore_errors=True)
  model.save_pretrained(folder, safe_serialization=True)
  np.savez(os.path.join(d, "ddpm32_io.npz"), **reference_io(model, 32, seed=2))

  # 16x16, ch 4, ch_mult (1, 2), one block per level, attention at 8x8 with 4 channels per head.
  model = randomize(ddpm_unet(16, (4, 8), (1,), layers_per_block=1, norm_num_groups=2,
                              attention_head_dim=4), seed=3).eval()
  folder = os.path.join(d, "heads16")
  shutil.rmtree(folder, ignore_errors=True)
  model.save_pretrained(folder, safe_serialization=False)
  weights = os.path.join(folder, "diffusion_pytorch_model.bin")
  torch.save(old_attention_names(model.state_dict()), weights)
  np.savez(os.path.join(d, "heads16_io.npz"), **reference_io(model, 16, seed=4))

  layouts = {}
  for name, (size, channels, attn, expected) in FULL_SIZE.items():
    model = ddpm_unet(size, channels, attn)
    count = sum(p.numel() for p in model.parameters())
    if count != expected:
      raise SystemExit(f"{name}: UNet2DModel has {count:,} parameters, expected {expected:,}")
    # diffusers' bookkeeping keys (an unordered _use_default_values list) would make the file
    # differ between runs.
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    layouts[name] = dict(config=dict(config, _class_name="UNet2DModel"), num_params=count,
                         shapes={k: list(v.shape) for k, v in model.state_dict().items()})
    print(f"{name}: {count:,} parameters (as the DDPM paper's model)")
  with open(os.path.join(d, "full_size_layouts.json"), "w") as f:
    json.dump(layouts, f, indent=0, default=list)


def to_big_endian(src, dst):
  """torch.save on a little-endian machine cannot write big-endian files: rewrite one (every
  storage byte-swapped per element, byteorder record 'big')."""
  with zipfile.ZipFile(src) as zin:
    itemsize = {}  # storage key -> element size, from the pickle's persistent ids

    class Scan(pickle.Unpickler):
      def find_class(self, module, name):
        if module == "torch":
          return getattr(torch, name)  # storage types
        return collections.OrderedDict if name == "OrderedDict" else (lambda *args: None)

      def persistent_load(self, pid):
        itemsize[pid[2]] = pid[1](0).element_size()

    Scan(io.BytesIO(zin.read(next(n for n in zin.namelist() if n.endswith("data.pkl"))))).load()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
      for info in zin.infolist():
        data = zin.read(info)
        prefix, _, key = info.filename.rpartition("/data/")
        if info.filename.endswith("/byteorder"):
          data = b"big"
        elif prefix and key in itemsize and itemsize[key] > 1:
          data = np.frombuffer(data, f"<u{itemsize[key]}").astype(f">u{itemsize[key]}").tobytes()
        zout.writestr(info, data)


class _SystemCall:
  def __reduce__(self):
    return (os.system, ("echo this file ran code",))


def write_torch_pickle(out):
  d = os.path.join(out, "torch_pickle")
  os.makedirs(d, exist_ok=True)
  gen = torch.Generator().manual_seed(5)
  base = torch.randn((4, 6), generator=gen)
  tensors = collections.OrderedDict(
      float32=torch.randn((2, 3, 4), generator=gen),
      transposed=base.t(),                     # strides (1, 6)
      offset_view=base[1:3, 2:5],              # storage offset 8, shared storage
      float64=torch.randn((5,), generator=gen, dtype=torch.float64),
      float16=torch.randn((3, 2), generator=gen).half(),
      bfloat16=torch.randn((4,), generator=gen).bfloat16(),
      int64=torch.arange(-3, 4),
      int32=torch.arange(6, dtype=torch.int32).reshape(2, 3)[:, ::2],
      uint8=torch.arange(250, 256, dtype=torch.uint8),
      bool=torch.tensor([True, False, True]),
      parameter=torch.nn.Parameter(torch.randn((3,), generator=gen)),
      scalar=torch.tensor(2.5),
      empty=torch.zeros((0, 3)),
  )
  torch.save(tensors, os.path.join(d, "tensors.pt"))
  big = os.path.join(d, "tensors_big_endian.pt")
  to_big_endian(os.path.join(d, "tensors.pt"), big)
  for name, value in torch.load(big).items():  # torch itself reads the rewritten file back
    assert torch.equal(value, tensors[name]), name
  expected = {k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy()
              for k, v in tensors.items()}
  np.savez(os.path.join(d, "tensors.npz"), **expected)
  torch.save({"weight": torch.zeros(2), "payload": _SystemCall()},
             os.path.join(d, "pickled_code.pt"))


def write_improved_diffusion_pt(out):
  """The state dict of make_improved_diffusion_fixtures.py's CIFAR-10 fixture as a torch file."""
  with np.load(os.path.join(out, "improved_diffusion_cifar10_tiny.npz")) as f:
    index, values = json.loads(f["state_dict_index"].item()), f["state_dict_values"]
  state_dict, offset = collections.OrderedDict(), 0
  for name, shape in index:
    size = int(np.prod(shape))
    state_dict[name] = torch.from_numpy(values[offset:offset + size].reshape(shape).copy())
    offset += size
  torch.save(state_dict, os.path.join(out, "torch_pickle", "improved_diffusion_cifar10_tiny.pt"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures"))
  args = parser.parse_args()
  torch.manual_seed(0)
  write_diffusers(args.out)
  write_torch_pickle(args.out)
  write_improved_diffusion_pt(args.out)
  total = sum(os.path.getsize(os.path.join(r, f)) for sub in ("diffusers", "torch_pickle")
              for r, _, files in os.walk(os.path.join(args.out, sub)) for f in files)
  print(f"wrote {args.out}/diffusers and {args.out}/torch_pickle: {total / 1e6:.2f} MB")


if __name__ == "__main__":
  main()
