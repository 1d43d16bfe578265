#!/usr/bin/env python
"""Sample quality per model evaluation of every sampler on a trained digits checkpoint.

  python scripts/sampler_quality.py --config=configs/digits.py --workdir=runs/digits \
      --out=docs/sampler_quality.md

(the README's table). For each (method, steps) it draws --num_samples samples with the EMA
parameters of the newest checkpoint, all from the same key, and scores them with the digits
judge below; it prints and writes a Markdown table with the model evaluations (NFE) and the wall
time of each run (including the sampler's compilation, a few seconds).

The judge (deterministic, seconds on a CPU): a scikit-learn MLP classifier (one hidden layer of
64 tanh units, random_state 0) trained on the TRAINING split of the demo's digits (the 16x16
images the model learns, pixels / 255). Its hidden activations are the feature space; the score
is the Frechet distance (Heusel et al. 2017, `ddpm.fid.frechet_distance`) between the features
of the samples and those of the 1442 training images, lower is better. The 355 held-out test
digits, scored the same way, give the floor of real data (their FID is a little inflated by
their smaller number).
"""
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "Experiment config.")
flags.DEFINE_string("workdir", "runs/digits", "Workdir with the trained checkpoints.")
flags.DEFINE_integer("num_samples", 500, "Samples per run.")
flags.DEFINE_list("methods", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "heun", "ddpm"],
                  "Samplers.")
flags.DEFINE_list("nfe", ["5", "10", "20", "50"], "Model evaluations per sample (heun: the "
                  "largest odd number not above it, 2 N - 1).")
flags.DEFINE_bool("ddpm_full", True, "Also run ancestral DDPM with all T steps.")
flags.DEFINE_string("spacing", None, "Override config.sampling.spacing.")
flags.DEFINE_string("out", None, "Also write the Markdown table here.")
FLAGS = flags.FLAGS

HIDDEN = 64


def train_judge(train_images, train_labels):
  """The judge's classifier: (features_fn uint8 [N, H, W, C] -> [N, 64], test accuracy fn)."""
  import numpy as np
  from sklearn.neural_network import MLPClassifier
  clf = MLPClassifier(hidden_layer_sizes=(HIDDEN,), activation="tanh", alpha=1e-3, max_iter=1000,
                      random_state=0)
  clf.fit(train_images.reshape(len(train_images), -1) / 255.0, train_labels)

  def features(images):
    x = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0
    return np.tanh(x @ clf.coefs_[0] + clf.intercepts_[0])

  def accuracy(images, labels):
    return float((clf.predict(images.reshape(len(images), -1) / 255.0) == labels).mean())

  return features, accuracy


def main(argv):
  del argv
  import jax
  import numpy as np
  from ddpm import benchmark, evaluation, fid, input_pipeline, sampling

  config = _CONFIG.value
  train_src, test_src = input_pipeline._digits_sources(config.data.image_size,  # pylint: disable=protected-access
                                                        config.data.channels)
  features, accuracy = train_judge(train_src.images, train_src.labels)
  ref = fid.compute_statistics(features(train_src.images))
  score = lambda imgs: fid.frechet_distance(*fid.compute_statistics(features(imgs)), *ref)
  real = score(test_src.images)
  print(f"judge: MLP({HIDDEN}) test accuracy {accuracy(test_src.images, test_src.labels):.3f}; "
        f"real held-out digits (n={len(test_src)}): FID {real:.2f}", flush=True)

  params, step, (mesh, model, diffusion) = evaluation.load_ema_params(config, FLAGS.workdir)
  T = diffusion.num_timesteps
  runs = []
  for method in FLAGS.methods:
    for nfe in map(int, FLAGS.nfe):
      runs.append((method, (nfe + 1) // 2 if method == "heun" else nfe))
  if FLAGS.ddpm_full:
    runs.append(("ddpm", T))
  rows = []
  for method, steps in runs:
    config_run = config.copy_and_resolve_references()
    with config_run.unlocked():
      config_run.sampling.method, config_run.sampling.num_steps = method, steps
      config_run.sampling.eta = 0.0
      if FLAGS.spacing:
        config_run.sampling.spacing = FLAGS.spacing
    start = time.perf_counter()
    samples = np.concatenate(list(evaluation.generate(
        config_run, params, mesh, model, diffusion, FLAGS.num_samples,
        jax.random.key(config.seed + 1), config.sampling.batch_size, progress=False)))
    seconds = time.perf_counter() - start
    rows.append((method, steps, sampling.num_function_evals(method, steps), score(samples),
                 seconds))
    print("%-9s steps %4d  NFE %4d  FID %6.2f  %7.1f s" % rows[-1], flush=True)
    table = _write_table(rows, real, len(test_src), step, config, benchmark.host_cpu(),
                         jax.device_count())
  print(table)


def _write_table(rows, real, num_real, step, config, host, devices):
  """Prints the Markdown table (and rewrites --out) after every run, so a partial sweep counts."""
  spacing = FLAGS.spacing or config.sampling.spacing
  lines = [f"Checkpoint step {step} of `{FLAGS.workdir}`, {FLAGS.num_samples} samples per run, "
           f"spacing `{spacing}`, host {host}, {devices} device(s).",
           "", "| method | steps | NFE | FID (judge) | wall time (s) |",
           "|---|---|---|---|---|"]
  lines += [f"| {m} | {s} | {n} | {f:.2f} | {t:.1f} |" for m, s, n, f, t in rows]
  lines += [f"| real held-out digits (n={num_real}) | | | {real:.2f} | |"]
  table = "\n".join(lines)
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      f.write(table + "\n")
  return table


if __name__ == "__main__":
  app.run(main)
