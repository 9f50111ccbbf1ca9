"""User errors: one line naming the file, row or key, exit status 1, the traceback on request."""

import os
import subprocess
import sys

import ml_collections
import pytest

import run_fixtures
from prerl_jax import errors
from prerl_jax.training import trainer

TPU_RUN = os.path.join(run_fixtures.REPO_ROOT, "launch", "tpu_run.py")


def test_exit_on_user_error_prints_one_line_unless_verbose():
  with pytest.raises(SystemExit) as exited:
    with errors.exit_on_user_error("prog", verbose=False):
      raise errors.UserError("data.jsonl, line 3: not valid UTF-8")
  assert exited.value.code == "prog: data.jsonl, line 3: not valid UTF-8"
  with pytest.raises(errors.UserError, match="line 3"):
    with errors.exit_on_user_error("prog", verbose=True):
      raise errors.UserError("data.jsonl, line 3")
  with pytest.raises(KeyError):  # Not a user error: a bug keeps its traceback.
    with errors.exit_on_user_error("prog", verbose=False):
      raise KeyError("x")


@pytest.mark.parametrize("source, named", [("reasoning_gym", "data.train_size = 1"),
                                           ("files", "data.train_files")])
def test_a_train_split_smaller_than_one_step_names_the_keys(source, named):
  config = ml_collections.ConfigDict({"rollout": {"prompts_per_step": 2},
                                      "data": {"source": source, "train_size": 1}})
  with pytest.raises(errors.UserError, match=rf"config {named} gives 1 training problems, "
                     r"fewer than one step's rollout\.prompts_per_step = 2"):
    trainer.check_train_fills_a_step(config, 1)
  trainer.check_train_fills_a_step(config, 2)


def _tpu_run(*flags):
  env = dict(os.environ, JAX_PLATFORMS="", XLA_FLAGS="")
  return subprocess.run([sys.executable, TPU_RUN, "--config=configs/w_reinforce.py", *flags],
                        cwd=run_fixtures.REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="a GPU is present")
def test_missing_gpu_is_one_line_naming_the_flag():
  result = _tpu_run("--jax_platforms=cuda")
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("tpu_run.py: --jax_platforms=cuda: no GPU was found"), result.stderr


ISSUE_EXAMPLES = ("--config.optim.learning_rate=-1e-5", "--config.train.steps=-1",
                  "--config.rollout.prompts_per_step=0", "--config.optim.micro_batches=0",
                  "--config.rollout.top_p=1.5", "--config.model.dtype=float33",
                  "--config.objective.name=grpoo")


@pytest.mark.parametrize("config, flags, expected", [
    ("configs/grpo.py:steps=x", (), "tpu_run.py: config argument steps='x': expected int"),
    ("configs/grpo.py", ("--config.objective.aggregation=bogus",),
     "tpu_run.py: bad config (1 key): objective.aggregation='bogus' is not one of"),
    ("configs/missing.py", (), "tpu_run.py: --config=configs/missing.py: configs/missing.py is "
                               "not a file; the run configs are configs/<name>.py: dsrl, grpo"),
    # Every bad key in one line, checked before the model or data load.
    ("configs/grpo.py", ISSUE_EXAMPLES,
     "tpu_run.py: bad config (7 keys): model.dtype='float33': must be one of float32, bfloat16, "
     "float16; optim.learning_rate=-1e-05: must be a finite number > 0; optim.micro_batches=0: "
     "must be an int >= 1; rollout.prompts_per_step=0: must be an int >= 1; rollout.top_p=1.5: "
     "must be a finite number > 0 and <= 1 (1: no nucleus truncation); train.steps=-1: must be "
     "an int >= 1; objective.name='grpoo': must be 'grpo', the preset the config file trains"),
])
def test_a_bad_config_value_is_one_line_naming_it(config, flags, expected):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  result = subprocess.run([sys.executable, TPU_RUN, f"--config={config}", *flags],
                          cwd=run_fixtures.REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr
