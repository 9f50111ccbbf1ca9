"""The Trainer takes its objective and its data files from the run config it is given."""

import pytest

import run_fixtures
from prerl_jax.training import trainer


class _Received(Exception):
  """Stops a step once its train step has been asked for."""


def test_train_step_receives_every_objective_key(tmp_path, monkeypatch):
  model_dir = run_fixtures.save_tiny_chat_model(str(tmp_path / "model"))
  changed = run_fixtures.changed_objective_overrides("grpo")
  config = run_fixtures.tiny_config(
      "grpo", model_dir, str(tmp_path / "run"), steps=1,
      overrides=[f"--config.objective.{key}={text}" for key, (text, _) in changed.items()])
  received = []

  def recording_make_train_step(graphdef, objective, *args, **kwargs):
    received.append(objective)
    raise _Received

  monkeypatch.setattr(trainer, "make_train_step", recording_make_train_step)
  run = trainer.Trainer(config)
  try:
    with pytest.raises(_Received):
      run.train_step(1, next(run.batches()))
  finally:
    run.close()
  (objective,) = received
  assert {key: getattr(objective, key) for key in changed} == {
      key: value for key, (_, value) in changed.items()}


def test_missing_paper_data_file_fails_before_the_model_loads(tmp_path):
  config = run_fixtures.parse_config("dsrl", f"paper,data_dir={tmp_path}",
                                     ["--config.train.compilation_cache=false"])
  with pytest.raises(ValueError, match=r"config key data\.dir=.*math_train\.parquet \(in "
                                       r"data\.train_files\) does not exist"):
    trainer.Trainer(config)  # qwen3-4b is not on this machine: reaching load_model fails else.
