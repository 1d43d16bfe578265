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
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "sample", "eval", "sweep", "benchmark", "import", "export")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py); override fields with "
    "--config.<group>.<key>=value.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and eval "
                    "results: a local folder, gs://BUCKET/path or s3://BUCKET/path.")
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
flags.DEFINE_bool("allow_config_change", False,
                  "--mode=train: resume although a model, diffusion or data key differs from "
                  "the workdir's config.json (fine-tuning; README, 'Resuming').")
flags.DEFINE_bool("debug", False,
                  "Show full tracebacks and library logs of errors (also: DDPM_DEBUG=1); by "
                  "default a mistake ends with one line.")
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
    sys.exit(f"launch.py: {_one_line(str(e))} (--helpfull lists the flags)")


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def _debug() -> bool:
  return FLAGS.debug or os.environ.get("DDPM_DEBUG", "") not in ("", "0")


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

  class _NoTpuProbe(std_logging.Filter):
    def filter(self, record):  # JAX tries every backend: not finding a TPU is not news
      return not (record.levelno <= std_logging.INFO and
                  record.getMessage().startswith("Unable to initialize backend"))

  logging.get_absl_handler().addFilter(_Filter())
  logging.get_absl_handler().addFilter(_NoTpuProbe())


def _silence_library_noise():
  """Without --debug: a recovered failure (e.g. a truncated checkpoint, skipped with one warning
  by ddpm.checkpointing) must not print the thousands of lines TensorStore's and Orbax's pending
  asyncio reads report when they fail late ("Exception ignored", "exception was never
  retrieved"), nor Orbax's error logs of it (our own warning names the checkpoint)."""
  import logging as std_logging

  std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None

  class _Filter(std_logging.Filter):
    def filter(self, record):
      return "/orbax/" not in record.pathname or record.levelno < std_logging.ERROR

  logging.get_absl_handler().addFilter(_Filter())


def _fail(message: str, code: int = 1):
  """Ends the program with one line on stderr. os._exit: background threads (asynchronous
  checkpoint writers, prefetchers) must not print their own failures during interpreter
  shutdown; everything that was saved is on disk already."""
  print(f"launch.py: {_one_line(message)}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)  # pylint: disable=protected-access


def main(argv):
  del argv
  _quiet_library_info_logs()
  if _debug():
    _run()
    return
  _silence_library_noise()
  from ddpm.errors import UserError
  try:
    _run()
  except UserError as e:
    _fail(str(e))
  except OSError as e:  # the environment: a path, a permission, a full disk
    _fail(f"{type(e).__name__}: {e}")
  except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM in --mode=sample/eval
    import signal
    name = str(e) if str(e).startswith("SIG") else "SIGINT"
    _fail(f"stopped by {name} (--mode={FLAGS.mode}); outputs finished so far are kept in "
          f"{FLAGS.workdir}", 128 + int(signal.Signals[name]))


def _run():
  """Every check that needs no compile runs first (each failure is one line), then the mode."""
  import contextlib
  from ddpm.errors import UserError

  config_file = config_flags.get_config_filename(FLAGS["config"])
  if not os.path.isfile(config_file.split(":")[0]):
    raise UserError(f"--config={config_file}: no such file")
  config = _CONFIG.value
  for mode, flag in (("import", "import_from"), ("export", "export_to")):
    if (FLAGS.mode == mode) != bool(FLAGS[flag].value):
      raise UserError(f"--mode={mode} needs --{flag}=PATH" if FLAGS.mode == mode else
                      f"--{flag} is only used with --mode={mode}, not --mode={FLAGS.mode}")
  _check_workdir(FLAGS.workdir, FLAGS.mode)
  import jax  # after the checks above, so that they fail fast
  from ddpm import config_validation, distributed, locking, run_config
  config_validation.validate_config(config)  # all but the device count (known after JAX starts)
  if FLAGS.mode in ("sample", "eval"):
    config = _recorded_config(config)
  try:
    cpu_devices = distributed.configure_cpu_devices(
        FLAGS.cpu_devices, config_validation.batch_sizes(config), FLAGS.num_processes or 1)
  except ValueError as e:
    raise UserError(str(e)) from None
  distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               FLAGS.distributed)
  # The device count is known now: a batch it does not divide fails before the lock is taken.
  config_validation.validate_config(config, num_devices=jax.device_count())
  # train/sweep hold the workdir for their lifetime; sample/eval only read checkpoints.
  writes = FLAGS.mode in ("train", "sweep")
  with locking.workdir_lock(FLAGS.workdir) if writes else contextlib.nullcontext():
    if FLAGS.mode == "train":
      run_config.check(config, FLAGS.workdir, allow_change=FLAGS.allow_config_change)
    logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s)", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform)
    if cpu_devices is not None and jax.devices()[0].platform == "cpu":
      logging.info("CPU: %d JAX device(s) per process (--cpu_devices=%s).", cpu_devices,
                   FLAGS.cpu_devices)
    _run_mode(config)  # each mode validates the config for the device count first


def _check_workdir(workdir: str, mode: str):
  """Fails before anything is compiled if the workdir cannot hold the mode's outputs.

  train/sweep/benchmark write into the workdir (created if missing); sample/eval read its
  checkpoints and write to its samples/ or eval/ folder.
  The workdir itself (local or gs://) is checked by `ddpm.workdir.check_workdir`.
  """
  from ddpm import workdir as workdir_lib
  from ddpm.errors import UserError
  # Only the modes that write into the workdir from the start create it: import reads its
  # weights first (a bad file must leave no workdir behind), export and sample/eval read it.
  workdir_lib.check_workdir(workdir, create=mode in ("train", "sweep", "benchmark"))
  if mode not in ("sample", "eval") or "://" in workdir:
    return
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir) or _latest_step(ckpt_dir) is None:
    raise UserError(f"no checkpoint in {ckpt_dir}: train first with --mode=train "
                    f"--workdir={workdir}")
  out = os.path.join(workdir, "samples" if mode == "sample" else "eval")
  try:
    os.makedirs(out, exist_ok=True)
    probe = os.path.join(out, f".write-test-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"--workdir={workdir}: cannot write to {out} ({e.strerror or e})") from None


def _latest_step(ckpt_dir):
  from ddpm import checkpointing  # Orbax: imported only when there is something to read
  return checkpointing.latest_step(ckpt_dir)


def _recorded_config(config):
  """sample/eval: model, diffusion and data keys from workdir/config.json (conflicting
  command-line overrides are refused)."""
  from ddpm import run_config
  overrides = config_flags.get_override_values(FLAGS["config"])
  return run_config.apply_recorded(config, FLAGS.workdir, overrides)


def _run_mode(config):
  if FLAGS.mode == "train":
    from ddpm import train
    train.train_and_evaluate(config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
  elif FLAGS.mode == "sample":
    from ddpm import evaluation
    with _stop_on_signals():
      evaluation.run_sampling(config, FLAGS.workdir)
  elif FLAGS.mode == "eval":
    from ddpm import evaluation
    with _stop_on_signals():
      evaluation.run_eval(config, FLAGS.workdir)
  elif FLAGS.mode == "sweep":
    from ddpm import sweep
    sweep.run_sweep(config, FLAGS.workdir, only=FLAGS.variant,
                    allow_config_change=FLAGS.allow_config_change)
  elif FLAGS.mode == "benchmark":
    from ddpm import benchmark
    benchmark.run_benchmark(config, FLAGS.workdir)
  elif FLAGS.mode == "import":
    from ddpm import pretrained
    pretrained.import_checkpoint(config, FLAGS.workdir, FLAGS.import_from)
  elif FLAGS.mode == "export":
    from ddpm import pretrained
    pretrained.export_checkpoint(config, FLAGS.workdir, FLAGS.export_to)


def _stop_on_signals():
  """sample/eval: SIGTERM (like Ctrl-C) stops at once with one line; what was written (eval's
  finished FID rounds) stays, and a rerun resumes from it."""
  import contextlib
  import signal

  @contextlib.contextmanager
  def handler():
    def on_signal(signum, frame):
      del frame
      raise KeyboardInterrupt(signal.Signals(signum).name)
    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
      yield
    finally:
      signal.signal(signal.SIGTERM, previous)
  return handler()


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
