"""Trains with a config file: `python launch/tpu_run.py --config=configs/nsr_prerl.py[:arg]`.

Overrides: `--config.rollout.group_size=4` (an unknown key is an error naming it). JAX flags such
as `--jax_platforms=cpu|cuda|tpu` are honoured. Multi-host: run the same command on every host;
jax.distributed is initialised from --coordinator_address/--num_processes/--process_id, from the
environment, or automatically on TPU pods.

A user error (bad config key or value, bad data file or row, bad checkpoint path, an accelerator
that is not there) prints one line naming the file, row or key and exits 1; `--verbose` (or
absl's `--verbosity=1`) shows its traceback too.

`--dry_run --target=v5p-16 [--mesh=fsdp=8,tensor=1] [--json]` trains nothing and reads no weights
or data: it compiles the run's programs for a slice or host by product name (v5p-16, v5p-32,
v5p-64, v5p-128, v5e-16, v5e-64, v6e-16, v6e-64: libtpu's compiler on the real topology;
h100x1, h100x8, h200x1, h200x8: XLA:GPU through the CUDA plugin of the gpu-aot extra, or
simulated CPU devices without it) and prints memory, fit and projected step time per chip
(prerl_jax/aot/dry_run.py). `--response_lengths=run/metrics.jsonl` or `=lognormal:mean=1500` adds
the continuous engine's sampling over those lengths, scheduled as the engine does.
"""

import json
import re
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _prepare_dry_run(argv):
  """A --dry_run compiles on this host's CPU, without the chips: JAX_PLATFORMS=cpu, with which
  libtpu makes its topologies and the CUDA plugin loads without a GPU; a GPU target simulated
  (without the plugin) needs one CPU device per chip. Both must be set before jax loads."""
  if "--dry_run" not in argv:
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  target = next((a.split("=", 1)[1] for a in argv if a.startswith("--target=")), "")
  chips = re.fullmatch(r"h\d+x(\d+)", target)  # h100x8, h200x1, ...
  if chips:
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                               f"--xla_force_host_platform_device_count={chips.group(1)}").strip()


def _skip_cuda_check_without_gpu():
  """With the CUDA plugin installed (the gpu-aot extra) on a machine with no NVIDIA GPU, the
  plugin's CUDA version check can only fail, and it prints a traceback as jax starts: skip it.
  jax then picks the CPU as without the plugin (and --jax_platforms=cuda fails in one line)."""
  if not any(os.path.exists(device) for device in ("/dev/nvidia0", "/dev/nvidiactl")):
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


_prepare_dry_run(sys.argv)
_skip_cuda_check_without_gpu()

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from prerl_jax import errors  # noqa: E402

jax.config.config_with_absl()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).",
                                          lock_config=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_JSON = flags.DEFINE_bool("json", False, "Print the final summary as JSON.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile for --mesh and predict memory and step "
                             "time instead of training.")
_TARGET = flags.DEFINE_string("target", "v5p-16", "Dry-run target by product name: v5p-16, "
                              "v5p-32, v5p-64, v5p-128, v5e-16, v5e-64, v6e-16, v6e-64, h100x1, "
                              "h100x8, h200x1, h200x8.")
_MESH = flags.DEFINE_string("mesh", None, "Dry-run mesh over the target's chips, e.g. "
                            "fsdp=4,tensor=2 (default: all chips on fsdp).")
_RESPONSE_LENGTHS = flags.DEFINE_string(
    "response_lengths", None, "Dry run: also project the continuous engine's sampling over these "
    "response lengths: a run's metrics.jsonl, or fixed:N, uniform:mean=N, lognormal:mean=N"
    "[,sigma=S] (prerl_jax/aot/response_lengths.py).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of a user error (bad config, "
                             "data or path) as well as its message.")
flags.mark_flag_as_required("config")
_ACCELERATOR_NAMES = {"cuda": "GPU", "gpu": "GPU", "rocm": "GPU", "tpu": "TPU"}


def _initialize_distributed():
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    if jax.config.jax_platforms == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif "JAX_COORDINATOR_ADDRESS" in os.environ or os.environ.get("TPU_WORKER_HOSTNAMES"):
    jax.distributed.initialize()


def _check_backend():
  """A UserError naming --jax_platforms when the accelerator it asks for is not there."""
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as error:  # A missing CUDA device fails an assert.
    platforms = jax.config.jax_platforms or ""
    kinds = " or ".join(sorted({_ACCELERATOR_NAMES.get(p, p) for p in platforms.split(",") if p}))
    detail = f": {error}" if str(error) else ""
    raise errors.UserError(f"--jax_platforms={platforms}: no {kinds} was found (jax could not "
                           f"start that backend{detail}); --jax_platforms=cpu runs on the "
                           "CPU") from error


def _summary_lines(summary: dict) -> list[str]:
  from prerl_jax.evals import evaluation  # pylint: disable=import-outside-toplevel
  lines = [f"run directory: {summary['run_dir']}"]
  for key, title in (("eval_before", "before training"), ("eval_after", "after training")):
    if summary.get(key):
      lines += [f"\nHeld-out evaluation {title}:", evaluation.format_table(summary[key])]
  lines.append(f"\nskipped (non-finite) updates: {summary['skipped_updates']}")
  lines.append(f"peak resident memory: {summary['peak_rss_gib']:.2f} GiB")
  return lines


def _check_config_file(argv):
  """Exits in one line when --config names no file (ml_collections defers that error to a
  traceback where the config is first read)."""
  for arg, following in zip(argv, [*argv[1:], ""]):
    if arg != "--config" and not arg.startswith("--config="):
      continue
    spec = following if arg == "--config" else arg.partition("=")[2]
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
      import configs  # pylint: disable=import-outside-toplevel
      sys.exit(f"tpu_run.py: --config={spec}: {path or 'the path'} is not a file; the run "
               f"configs are configs/<name>.py: {', '.join(configs.NAMES)}")


def _parse_flags(argv):
  """absl flag parsing that turns a mistyped config key or a missing config file into a
  one-line error naming it."""
  _check_config_file(argv)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    overrides = [a for a in argv if a.startswith("--config.")]
    detail = str(error.args[0] if error.args else error)
    key = re.search(r"\w+", detail).group(0)
    suggestion = re.search(r'Did you mean "(\w+)"', detail)
    hint = f" (did you mean '{suggestion.group(1)}'?)" if suggestion else ""
    sys.exit(f"tpu_run.py: unknown config key '{key}'{hint} in {' '.join(overrides)}")
  except flags.Error as error:
    user_error = _config_user_error(error)
    if user_error is None or "--verbose" in argv:
      sys.exit(f"tpu_run.py: {error}")
    sys.exit(f"tpu_run.py: {user_error}")


def _config_user_error(error: BaseException) -> str | None:
  """The message of a UserError that a config file's get_config(arg) raised, if that is the cause.

  ml_collections re-raises it with the traceback in the message, and absl wraps that in a flag
  error; the original message is the traceback's last line.
  """
  while error is not None and not isinstance(error, errors.UserError):
    error = error.__cause__ or error.__context__
  if error is None:
    return None
  last_line = str(error).strip().splitlines()[-1]
  return last_line.split(f"{errors.UserError.__module__}.UserError: ", 1)[-1]


def _check_config(devices, disk: bool):
  """The run config's one check before anything loads (configs/common.py check_config); an
  objective name given on the command line is checked against the one the config file set."""
  from configs import common  # pylint: disable=import-outside-toplevel
  file_names = {section: flags.FLAGS[f"config.{section}.name"].default
                for section in ("objective", "objective.warmup")
                if f"config.{section}.name" in flags.FLAGS}
  common.check_config(_CONFIG.value, devices=devices, disk=disk, preset_names=file_names)


def main(argv):
  verbose = _VERBOSE.value or logging.get_verbosity() >= logging.DEBUG
  with errors.exit_on_user_error("tpu_run.py", verbose):
    _run(argv)


def _run(argv):
  if not any(arg.startswith(("--verbosity", "-v=")) for arg in sys.argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; --verbosity=0 shows it.
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DRY_RUN.value:
    _check_config(devices=None, disk=False)  # Its devices are the target's; it reads no files.
    from prerl_jax.aot import dry_run  # pylint: disable=import-outside-toplevel
    try:
      print(dry_run.report_text(_CONFIG.value, _TARGET.value, _MESH.value, _JSON.value,
                                _RESPONSE_LENGTHS.value))
    except ValueError as error:
      sys.exit(f"tpu_run.py: {error}")
    return
  _initialize_distributed()
  _check_backend()
  _check_config(devices=jax.devices(), disk=True)
  from prerl_jax.evals import evaluation  # pylint: disable=import-outside-toplevel
  from prerl_jax.training import trainer  # pylint: disable=import-outside-toplevel
  logging.info("devices: %s", jax.devices())
  run = trainer.Trainer(_CONFIG.value)
  try:
    summary = run.run()
  finally:
    run.close()
  if jax.process_index() == 0:
    if _JSON.value:
      for key in ("eval_before", "eval_after"):
        if key in summary:
          summary[key] = evaluation.results_as_dicts(summary[key])
      print(json.dumps(summary, indent=2))
    else:
      print("\n".join(_summary_lines(summary)))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
