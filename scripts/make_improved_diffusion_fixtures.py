"""Random-weight improved-diffusion UNetModels and their outputs, to check our import of them.

Needs PyTorch and openai/improved-diffusion's source (MIT), neither a ddpm-jax dependency:
  PYTHONPATH=/path/to/improved-diffusion-checkout python scripts/make_improved_diffusion_fixtures.py
writes tests/fixtures/improved_diffusion_{cifar10,imagenet64}_tiny.npz (committed; CI reads them
without torch): each holds a state dict (float16 'state_dict_values', all tensors flattened and
concatenated in the order of the JSON 'state_dict_index' [[name, shape], ...]), a batch of
inputs x (NHWC), their timesteps t (0, between, T - 1) and the peer's outputs (NHWC, float32),
plus the config changes ('overrides', JSON) that shrink configs/<base>.py to the tiny model.

The tiny models are built by improved-diffusion's own `script_util.create_model` with the README
flags of the CIFAR-10 and ImageNet-64 models (hence its channel_mult and attention choices), only
narrower (CIFAR-10: 8 base channels; ImageNet-64: 4 base channels, 2 residual blocks per level,
run on 32x32 inputs).
One change to the peer: its GroupNorm has 32 groups, which narrow layers cannot have; here it
has min(32, C // 2), our U-Net's choice for these widths (ddpm.models.unet.num_groups).
All weights are random, also those improved-diffusion initialises to zero (its output conv, the
residual blocks' last conv, the attention projections), which would hide mapping errors, and are
rounded to float16 (stored exactly in half the space; the peer computes in float32 with them).
The peer sees t * 1000 / T, as improved-diffusion's diffusion wrapper (rescale_timesteps) calls it.

With --check_full (needs jax and ddpm-jax importable too, e.g. the project's .venv with torch
installed), the full-size networks of configs/cifar10_improved.py (52,546,438 parameters) and
configs/imagenet64_improved.py (121,063,942) are built the same way, imported with
ddpm.pretrained.improved_diffusion.to_params and run by both; the relative differences are
printed (tests/test_improved_diffusion.py::test_full_size runs the same check, marked slow).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from improved_diffusion import nn as peer_nn
from improved_diffusion import script_util
from improved_diffusion import unet as peer_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(ROOT, "tests", "fixtures")

# README flags (improved-diffusion's README, "Unconditional CIFAR-10 / ImageNet-64 with our
# L_hybrid objective and cosine noise schedule") plus script_util's defaults for the model.
README_FLAGS = {
    "cifar10_improved": dict(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True,
                             dropout=0.3),
    "imagenet64_improved": dict(image_size=64, num_channels=128, num_res_blocks=3,
                                learn_sigma=True, dropout=0.0),
}
DIFFUSION_STEPS = 4000  # --diffusion_steps 4000 in both


def model_flags(name, **changes):
  """create_model's keyword arguments: script_util's defaults, the README flags, `changes`."""
  defaults = script_util.model_and_diffusion_defaults()
  flags = {k: defaults[k] for k in ("num_heads", "num_heads_upsample", "attention_resolutions",
                                    "use_checkpoint", "use_scale_shift_norm")}
  flags.update(class_cond=False, **README_FLAGS[name])
  flags.update(changes)
  return flags


def build_peer(flags, seed, narrow_groups=False):
  """improved-diffusion's UNetModel with random weights (none zero), rounded to float16 values."""
  if narrow_groups:
    original = peer_unet.normalization
    peer_unet.normalization = lambda c: peer_nn.GroupNorm32(min(32, c // 2), c)
  try:
    model = script_util.create_model(**flags)
  finally:
    if narrow_groups:
      peer_unet.normalization = original
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.GroupNorm):
        module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
        module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
      elif isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
        w = module.weight
        fan_in = w[0].numel()
        w.copy_(torch.randn(w.shape, generator=gen) / fan_in ** 0.5)
        module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    for p in model.parameters():
      p.copy_(p.half().float())
  return model.eval()


def peer_outputs(model, x, t, num_timesteps):
  """x: [B, H, W, C] float32, t: [B] int -> [B, H, W, C_out] float32 (improved-diffusion's
  rescale_timesteps: the network sees t * 1000 / T)."""
  with torch.no_grad():
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    ts = torch.from_numpy(t).float() * (1000.0 / num_timesteps)
    return model(xt, ts).numpy().transpose(0, 2, 3, 1)


def inputs(batch, size, seed):
  """Random images ([B, H, W, 3], float16-exact) and t = 0, between, T - 1."""
  rng = np.random.RandomState(seed)
  x = rng.standard_normal((batch, size, size, 3)).astype(np.float16).astype(np.float32)
  t = np.linspace(0, DIFFUSION_STEPS - 1, batch).round().astype(np.int64)
  t[1:-1] = rng.randint(1, DIFFUSION_STEPS - 1, batch - 2)
  return x, t


# name, base config, create_model changes, size of the inputs, our config changes
TINY = [
    ("cifar10", "cifar10_improved", dict(num_channels=8), 32,
     {"model.ch": 8}),
    ("imagenet64", "imagenet64_improved", dict(num_channels=4, num_res_blocks=2), 32,
     # attention at downsampling rates 4 and 8 (the flags' "16,8" at 64x64) is at 8x8 and 4x4
     # on the 32x32 inputs.
     {"model.ch": 4, "model.num_res_blocks": 2, "data.image_size": 32,
      "model.attn_resolutions": [8, 4]}),
]


def write_tiny_fixtures(out_dir=FIXTURE_DIR, batch=3):
  os.makedirs(out_dir, exist_ok=True)
  for i, (name, base, changes, size, overrides) in enumerate(TINY):
    model = build_peer(model_flags(base, **changes), seed=i, narrow_groups=True)
    x, t = inputs(batch, size, seed=100 + i)
    out = peer_outputs(model, x, t, DIFFUSION_STEPS)
    state_dict = model.state_dict()
    # One flat float16 vector and a JSON index [[name, shape], ...]: a zip member per tensor
    # would add ~20% of headers.
    index = [[k, list(v.shape)] for k, v in state_dict.items()]
    values = np.concatenate([v.numpy().ravel() for v in state_dict.values()]).astype(np.float16)
    path = os.path.join(out_dir, f"improved_diffusion_{name}_tiny.npz")
    np.savez(path, x=x.astype(np.float16), t=t, out=out, base=np.asarray(base),
             overrides=np.asarray(json.dumps(overrides)),
             state_dict_index=np.asarray(json.dumps(index).encode()), state_dict_values=values)
    n = sum(v.numel() for v in model.parameters())
    print(f"{path}: {n:,} parameters, {os.path.getsize(path):,} bytes, outputs max |.| "
          f"{np.abs(out).max():.3g}")


def full_size_difference(name, batch=2, seed=0):
  """Max |ours - peer| / max |peer| for the full-size network of configs/<name>.py."""
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm import models  # pylint: disable=g-import-not-at-top
  from ddpm.pretrained import improved_diffusion  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{name}").get_config()
  model = build_peer(model_flags(name), seed=seed)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  x, t = inputs(batch, config.data.image_size, seed)
  want = peer_outputs(model, x, t, config.diffusion.num_timesteps)
  params = improved_diffusion.to_params(state_dict, config)
  n = sum(v.size for v in jax.tree.leaves(params))
  got = np.asarray(jax.jit(models.build_model(config).apply)({"params": params}, x, t))
  return n, float(np.abs(got - want).max() / np.abs(want).max())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out_dir", default=FIXTURE_DIR)
  parser.add_argument("--check_full", action="store_true",
                      help="Compare the full-size networks (needs jax and ddpm-jax too).")
  args = parser.parse_args()
  if args.check_full:
    sys.path.insert(0, ROOT)
    for name in README_FLAGS:
      n, diff = full_size_difference(name)
      print(f"{name}: {n:,} parameters, max |ours - peer| / max |peer| = {diff:.2e}")
  else:
    write_tiny_fixtures(args.out_dir)


if __name__ == "__main__":
  main()
