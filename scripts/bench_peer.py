#!/usr/bin/env python
"""Times the PyTorch reference, denoising-diffusion-pytorch, on the CPU for the README comparison.

Runs in its own environment (torch is not a dependency of this project):
  python3 -m venv ~/peer-venv
  ~/peer-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 denoising-diffusion-pytorch==2.3.4
  ~/peer-venv/bin/python scripts/bench_peer.py --out runs/peer/peer.json

What is timed, with the library's own API only:
  * a train step: GaussianDiffusion(images) (draws t and noise, q_sample, U-Net, MSE) +
    backward + Adam step, on fixed images in [0, 1] (the library's input range);
  * a reverse step: GaussianDiffusion.p_sample(x, t) for consecutive t = T-1, T-2, ... (U-Net
    forward + posterior + noise; the library's DDPM sampling loop calls exactly this);
  * the U-Net's forward FLOPs per image from torch.utils.flop_counter (2 per multiply-add), so
    a train step's model FLOPs are 3 x forward x batch, the convention of our benchmark's
    `train_model_flops_per_step`.
Medians after warm-up are written as JSON (see `compare_peer.py`).
"""
import argparse
import json
import os
import statistics
import time


def _timed(step, warmup, n):
  """Calls step(i) for i = 0 .. warmup + n - 1; returns (seconds of the last n calls, last
  result)."""
  times, out = [], None
  for i in range(warmup + n):
    start = time.perf_counter()
    out = step(i)
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return times, out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--dim-mults", default="1,2,2,2")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--timesteps", type=int, default=1000)
  p.add_argument("--train-steps", type=int, default=10, help="timed train steps")
  p.add_argument("--sample-steps", type=int, default=20, help="timed p_sample steps")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=(len(os.sched_getaffinity(0)) if hasattr(
      os, "sched_getaffinity") else os.cpu_count()), help="torch.set_num_threads")
  p.add_argument("--out", default="", help="also write the JSON here")
  args = p.parse_args()
  if args.warmup + args.sample_steps > args.timesteps:
    p.error(f"--warmup + --sample-steps ({args.warmup} + {args.sample_steps}) reverse steps from "
            f"t = {args.timesteps - 1} down would pass t = 0: at most --timesteps "
            f"({args.timesteps}) in all")

  import torch
  from torch.utils.flop_counter import FlopCounterMode
  import denoising_diffusion_pytorch as ddp

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  mults = tuple(int(m) for m in args.dim_mults.split(","))
  unet = ddp.Unet(dim=args.dim, dim_mults=mults, flash_attn=False)
  diffusion = ddp.GaussianDiffusion(unet, image_size=args.image_size, timesteps=args.timesteps,
                                    objective="pred_noise", beta_schedule="linear")
  shape = (args.batch, 3, args.image_size, args.image_size)

  with torch.inference_mode(), FlopCounterMode(display=False) as counter:
    unet(torch.randn(1, *shape[1:]), torch.tensor([args.timesteps // 2]))
  fwd_flops_per_image = counter.get_total_flops()

  opt = torch.optim.Adam(diffusion.parameters(), lr=2e-4)
  images = torch.rand(shape)

  def train_step(_):
    loss = diffusion(images)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()  # waits for the step

  diffusion.train()
  train_s, loss = _timed(train_step, args.warmup, args.train_steps)

  diffusion.eval()
  x = torch.randn(shape)

  def reverse_step(i):
    nonlocal x
    x, _ = diffusion.p_sample(x, args.timesteps - 1 - i)

  sample_s, _ = _timed(reverse_step, args.warmup, args.sample_steps)
  if not torch.isfinite(x).all():
    raise FloatingPointError("the peer's p_sample produced non-finite values")

  step = statistics.median(train_s)
  out = dict(
      library="denoising-diffusion-pytorch", torch=torch.__version__, threads=args.threads,
      params=sum(q.numel() for q in unet.parameters()), image_size=args.image_size,
      batch=args.batch, timesteps=args.timesteps, last_loss=loss,
      fwd_flops_per_image=fwd_flops_per_image,
      train_step_s=step, train_step_s_all=train_s,
      train_model_flops_per_step=3.0 * fwd_flops_per_image * args.batch,
      train_model_flops_per_s=3.0 * fwd_flops_per_image * args.batch / step,
      train_images_per_s=args.batch / step,
      sample_step_s=statistics.median(sample_s), sample_step_s_all=sample_s,
      sample_full_s=statistics.median(sample_s) * args.timesteps,
  )
  text = json.dumps(out, indent=2)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
