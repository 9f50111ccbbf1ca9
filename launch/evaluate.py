"""Evaluates a model on a run config's eval sets: `python launch/evaluate.py --config=... [--json]`.

k samples per problem (`--config.eval.samples_per_problem`) at `--config.eval.temperature`;
prints mean@k and unbiased pass@k for k = 1, 2, 4, ... per dataset with behaviour metrics.
`--checkpoint=DIR` evaluates the params of an orbax checkpoint of a run (a `checkpoints/N`
directory, or the run directory for its latest complete step) instead of the base model; only
the params are read (no optimizer is built). Results also go to `<run dir>/eval/`.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

jax.config.config_with_absl()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory or checkpoints/N directory.")
_JSON = flags.DEFINE_bool("json", False, "Print the results as JSON.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of a user error.")
flags.mark_flag_as_required("config")


def main(argv):
  from prerl_jax import errors  # pylint: disable=import-outside-toplevel
  with errors.exit_on_user_error("evaluate.py", _VERBOSE.value):
    _evaluate(argv)


def _evaluate(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not any(arg.startswith(("--verbosity", "-v=")) for arg in sys.argv):
    logging.set_verbosity(logging.WARNING)
  # pylint: disable=import-outside-toplevel
  from flax import nnx
  from configs import common
  from prerl_jax.evals import evaluation
  from prerl_jax.training.checkpointing import Checkpointer
  from prerl_jax.training.evaluator import Evaluator
  from prerl_jax.training.run_logging import RunLogger
  config = _CONFIG.value
  common.check_config(config, devices=jax.devices())
  step, run_dir = 0, config.train.run_dir.format(name=config.name)
  if _CHECKPOINT.value:
    directory = os.path.abspath(_CHECKPOINT.value.rstrip("/"))
    if os.path.basename(directory).isdigit():
      run_dir, step = os.path.dirname(os.path.dirname(directory)), int(os.path.basename(directory))
    else:
      run_dir, step = directory, None
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
      sys.exit(f"evaluate.py: {_CHECKPOINT.value} is neither a run directory nor checkpoints/N")
  evaluator = Evaluator(config)
  logger = RunLogger(os.path.join(run_dir, "eval"))
  try:
    params = nnx.state(evaluator.model)
    if _CHECKPOINT.value:
      checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
      step = checkpointer.latest_step() if step is None else step
      if step is None:
        sys.exit(f"evaluate.py: no complete checkpoint under {run_dir}/checkpoints")
      params = checkpointer.restore_params(step, params)
      checkpointer.close()
    results = evaluator.evaluate(params, step, logger,
                                 logger.run_dir if logger.active else None)
  finally:
    logger.close()
    evaluator.close()
  if _JSON.value:
    print(json.dumps({"step": step, "results": evaluation.results_as_dicts(results)}, indent=2))
  else:
    print(f"step {step}\n{evaluation.format_table(results)}")


if __name__ == "__main__":
  app.run(main)
