"""Writes tests/fixtures/diffusers_samplers.json: diffusers' timestep lists and trajectories.

Run with a Python that has torch and diffusers (not a project dependency):
  /work/torch-venv/bin/python scripts/make_sampler_fixtures.py
The file records, for tests/test_sampling.py (which runs without torch):
  * `timesteps`: the timesteps of DDIMScheduler and DPMSolverMultistepScheduler (default
    steps_offset = 0) for spacings 'leading', 'trailing', 'linspace' and DPM-Solver's
    `use_karras_sigmas`, for several (T, N), in diffusers' (decreasing) order;
  * `trajectories`: x after every step of DDIMScheduler, DPMSolverMultistepScheduler and
    UniPCMultistepScheduler, from a fixed x_T, with a closed-form model:
    the Bayes-optimal prediction for data x_0 ~ N(mu, s^2) independently per pixel,
      E[x_0 | x_t] = mu + sqrt(ab) s^2 / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu),
    returned as eps, x_0 or v (the test re-implements the same model in JAX).
"""
import json
import os

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                   "diffusers_samplers.json")
T = 1000
BETAS = np.linspace(1e-4, 0.02, T)          # DDPM's linear schedule (= ours for T = 1000)
SHAPE = (2, 4, 4, 1)                        # NHWC; the schedulers are elementwise
MU = np.linspace(-0.9, 0.9, 16).reshape(1, 4, 4, 1)
S = 0.5
PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def optimal_model(x, t, mean_type):
  ab = np.cumprod(1.0 - BETAS)[int(t)]
  x = x.numpy().astype(np.float64)
  x0 = MU + np.sqrt(ab) * S ** 2 / (ab * S ** 2 + 1 - ab) * (x - np.sqrt(ab) * MU)
  eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
  out = {"eps": eps, "x0": x0, "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0}[mean_type]
  return torch.from_numpy(out.astype(np.float32))


def run(scheduler, x_T, mean_type, **step_kw):
  x = torch.from_numpy(x_T)
  xs = []
  for t in scheduler.timesteps:
    x = scheduler.step(optimal_model(x, t, mean_type), t, x, **step_kw).prev_sample
    xs.append(x.numpy().astype(np.float64).round(7).ravel().tolist())
  return [int(t) for t in scheduler.timesteps], xs


def main():
  fixture = {"T": T, "betas": BETAS.tolist(), "shape": list(SHAPE), "mu": MU.ravel().tolist(),
             "s": S, "timesteps": [], "trajectories": []}
  for t_train, n in [(1000, 10), (1000, 20), (1000, 7), (1000, 50), (100, 10), (100, 33),
                     (50, 3)]:
    for spacing in ("leading", "trailing", "linspace"):
      ddim = DDIMScheduler(num_train_timesteps=t_train, timestep_spacing=spacing)
      ddim.set_timesteps(n)
      dpm = DPMSolverMultistepScheduler(num_train_timesteps=t_train, timestep_spacing=spacing)
      dpm.set_timesteps(n)
      fixture["timesteps"].append({"T": t_train, "N": n, "spacing": spacing,
                                   "ddim": ddim.timesteps.tolist(),
                                   "dpmsolver": dpm.timesteps.tolist()})
    karras = DPMSolverMultistepScheduler(num_train_timesteps=t_train, use_karras_sigmas=True)
    karras.set_timesteps(n)
    fixture["timesteps"].append({"T": t_train, "N": n, "spacing": "karras",
                                 "dpmsolver": karras.timesteps.tolist()})

  x_T = np.random.RandomState(0).standard_normal(SHAPE).astype(np.float32)
  fixture["x_T"] = x_T.ravel().tolist()
  # DDIMScheduler steps from t to t - T // N: the next listed timestep for 'leading' and for
  # 'trailing' with N dividing T. Clipping there keeps the unclipped eps unless
  # use_clipped_model_output (ours re-derives eps from the clipped x_0, as improved-diffusion).
  for spacing, n, clip in [("leading", 10, False), ("trailing", 10, False), ("leading", 20, True)]:
    sched = DDIMScheduler(trained_betas=BETAS, timestep_spacing=spacing, clip_sample=clip)
    sched.set_timesteps(n)
    ts, xs = run(sched, x_T, "eps", eta=0.0, use_clipped_model_output=True)
    fixture["trajectories"].append({"scheduler": "DDIMScheduler", "method": "ddim",
                                    "spacing": spacing, "N": n, "mean_type": "eps",
                                    "clip": clip, "timesteps": ts, "x": xs})
  for order, spacing, n, mean_type in [(2, "linspace", 10, "eps"), (2, "leading", 10, "eps"),
                                       (2, "trailing", 20, "eps"), (3, "linspace", 10, "eps"),
                                       (3, "trailing", 20, "eps"), (2, "linspace", 10, "x0"),
                                       (3, "linspace", 5, "v")]:
    sched = DPMSolverMultistepScheduler(trained_betas=BETAS, timestep_spacing=spacing,
                                        solver_order=order, prediction_type=PREDICTION[mean_type])
    sched.set_timesteps(n)
    ts, xs = run(sched, x_T, mean_type)
    fixture["trajectories"].append({"scheduler": "DPMSolverMultistepScheduler",
                                    "method": f"dpmpp_{order}m", "spacing": spacing, "N": n,
                                    "mean_type": mean_type, "clip": False, "timesteps": ts,
                                    "x": xs})
  for spacing, n, mean_type in [("linspace", 10, "eps"), ("trailing", 20, "eps"),
                                ("linspace", 5, "v")]:
    sched = UniPCMultistepScheduler(trained_betas=BETAS, timestep_spacing=spacing,
                                    prediction_type=PREDICTION[mean_type])  # bh2, order 2
    sched.set_timesteps(n)
    ts, xs = run(sched, x_T, mean_type)
    fixture["trajectories"].append({"scheduler": "UniPCMultistepScheduler", "method": "unipc",
                                    "spacing": spacing, "N": n, "mean_type": mean_type,
                                    "clip": False, "timesteps": ts, "x": xs})
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  with open(OUT, "w") as f:
    json.dump(fixture, f, separators=(",", ":"))
  print(f"wrote {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
  main()
