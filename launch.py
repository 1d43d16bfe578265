"""Entry point: python launch.py --config=configs/digits.py --workdir=runs/digits [--mode=train].

All logic lives in the `ddpm` library; this file parses flags, starts `jax.distributed` when the
run spans several processes and dispatches on --mode to a library function, which validates the
config (`config_validation.validate_config`) before it builds anything:
  train -> train.train_and_evaluate     sample -> evaluation.run_sampling
  eval -> evaluation.run_eval           sweep -> sweep.run_sweep
  benchmark -> benchmark.run_benchmark
  import -> pretrained.import_checkpoint (--import_from)
  export -> pretrained.export_checkpoint (--export_to)
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "sample", "eval", "sweep", "benchmark", "import", "export")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py); override fields with "
    "--config.<group>.<key>=value.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and eval results.")
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
flags.DEFINE_string("variant", None, "--mode=sweep: run only this named variant of the config.")
flags.DEFINE_string("import_from", None,
                    "--mode=import: released weights to start W/checkpoints from (a diffusers "
                    "model folder, an improved-diffusion .pt or a TF checkpoint prefix).")
flags.DEFINE_string("export_to", None,
                    "--mode=export: new folder for the EMA weights of the newest checkpoint as "
                    "a diffusers UNet2DModel (config.json + diffusion_pytorch_model.safetensors).")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-process: host:port of process 0 (unset on TPU pods and under SLURM, "
                    "where jax.distributed finds it by itself).")
flags.DEFINE_integer("num_processes", None, "Multi-process: total number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: index of this process.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM).")
flags.DEFINE_string("cpu_devices", None,
                    "CPU runs: JAX devices per process, a number or 'auto' (one per core, as "
                    "many as every batch size of the config divides into); unset: one device. "
                    "Each device takes a slice of every batch; on some CPUs this samples faster "
                    "(README, 'Performance'). Ignored when XLA_FLAGS sets "
                    "--xla_force_host_platform_device_count and on GPU/TPU.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _parse_flags(argv):
  """absl flag parsing that turns a config-override typo into one clear line."""
  try:
    return FLAGS(argv)
  except AttributeError as e:  # ml_collections: override of a key the config does not have
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    sys.exit(f"launch.py: unknown config key in {', '.join(bad) or 'overrides'}: {msg}")
  except flags.Error as e:
    sys.exit(f"launch.py: {e}\nPass --helpfull to see the flags.")


def _quiet_library_info_logs():
  """Orbax logs every save step at INFO; keep ours readable (its warnings still show, except
  the one about the read-only checkpoint managers of the sample and eval modes)."""
  import logging as std_logging

  class _Filter(std_logging.Filter):
    def filter(self, record):
      if "/orbax/" not in record.pathname:
        return True
      if record.getMessage().startswith("Given directory is read only"):
        return False  # sample/eval open the checkpoints read-only on purpose
      return record.levelno >= std_logging.WARNING

  logging.get_absl_handler().addFilter(_Filter())


def main(argv):
  del argv
  _quiet_library_info_logs()
  import jax  # after flag parsing, so --helpfull stays fast
  from ddpm import config_validation, distributed
  from ddpm.errors import UserError

  config = _CONFIG.value
  try:
    cpu_devices = distributed.configure_cpu_devices(
        FLAGS.cpu_devices, config_validation.batch_sizes(config), FLAGS.num_processes or 1)
  except ValueError as e:
    sys.exit(f"launch.py: {e}")
  distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               FLAGS.distributed)
  logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  if cpu_devices is not None and jax.devices()[0].platform == "cpu":
    logging.info("CPU: %d JAX device(s) per process (--cpu_devices=%s).", cpu_devices,
                 FLAGS.cpu_devices)
  try:
    _run_mode(config)  # each mode validates the config first (config_validation.ConfigError)
  except UserError as e:
    sys.exit(f"launch.py: {e}")


def _run_mode(config):
  from ddpm.errors import UserError
  for mode, flag in (("import", "import_from"), ("export", "export_to")):
    if (FLAGS.mode == mode) != bool(FLAGS[flag].value):
      raise UserError(f"--mode={mode} needs --{flag}=PATH" if FLAGS.mode == mode else
                      f"--{flag} is only used with --mode={mode}, not --mode={FLAGS.mode}")
  if FLAGS.mode == "train":
    from ddpm import train
    train.train_and_evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == "sample":
    from ddpm import evaluation
    evaluation.run_sampling(config, FLAGS.workdir)
  elif FLAGS.mode == "eval":
    from ddpm import evaluation
    evaluation.run_eval(config, FLAGS.workdir)
  elif FLAGS.mode == "sweep":
    from ddpm import sweep
    sweep.run_sweep(config, FLAGS.workdir, only=FLAGS.variant)
  elif FLAGS.mode == "benchmark":
    from ddpm import benchmark
    benchmark.run_benchmark(config, FLAGS.workdir)
  elif FLAGS.mode == "import":
    from ddpm import pretrained
    pretrained.import_checkpoint(config, FLAGS.workdir, FLAGS.import_from)
  elif FLAGS.mode == "export":
    from ddpm import pretrained
    pretrained.export_checkpoint(config, FLAGS.workdir, FLAGS.export_to)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
