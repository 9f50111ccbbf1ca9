"""The Trainer takes its objective and its data files from the run config it is given."""

import jax
import pytest

import run_fixtures
from prerl_jax.training import trainer


class _Received(Exception):
  """Stops a step once its train step has been asked for."""


def test_train_steps_receive_every_objective_key_of_both_dsrl_phases(tmp_path, monkeypatch):
  model_dir = run_fixtures.save_tiny_chat_model(str(tmp_path / "model"))
  changed = {section: run_fixtures.changed_objective_overrides("dsrl", section)
             for section in ("objective.warmup", "objective")}
  overrides = [f"--config.{section}.{key}={text}"
               for section, fields in changed.items() for key, (text, _) in fields.items()]
  config = run_fixtures.tiny_config("dsrl", model_dir, str(tmp_path / "run"), steps=3,
                                    overrides=[*overrides, "--config.objective.switch_step=3"])
  received = []

  def recording_make_train_step(graphdef, objective, *args, **kwargs):
    received.append(objective)
    raise _Received

  monkeypatch.setattr(trainer, "make_train_step", recording_make_train_step)
  run = trainer.Trainer(config)
  monkeypatch.setattr(run, "_rollout", lambda batch, step: (None, {}, []))  # Nothing to sample.
  try:
    for step in (1, 3):
      with pytest.raises(_Received):
        run.train_step(step, None)
  finally:
    run.close()
  for objective, fields in zip(received, changed.values(), strict=True):
    assert {key: getattr(objective, key) for key in fields} == {
        key: value for key, (_, value) in fields.items()}


def test_missing_paper_data_file_fails_before_the_model_loads(tmp_path):
  config = run_fixtures.parse_config("dsrl", f"paper,data_dir={tmp_path}",
                                     ["--config.train.compilation_cache=false"])
  with pytest.raises(ValueError, match=r"config key data\.dir=.*math_train\.parquet \(in "
                                       r"data\.train_files\) does not exist"):
    trainer.Trainer(config)  # qwen3-4b is not on this machine: reaching load_model fails else.


def test_train_step_is_traced_under_the_run_mesh(tmp_path, monkeypatch):
  """`model.attention=auto` picks splash on TPU only with the mesh in context (jax.set_mesh)."""
  model_dir = run_fixtures.save_tiny_chat_model(str(tmp_path / "model"))
  config = run_fixtures.tiny_config("nsr_prerl", model_dir, str(tmp_path / "run"), steps=1)
  meshes = []

  def recording_make_train_step(*args, **kwargs):
    def step(state, batch):
      meshes.append(jax.sharding.get_abstract_mesh())
      raise _Received
    return step

  monkeypatch.setattr(trainer, "make_train_step", recording_make_train_step)
  run = trainer.Trainer(config)
  monkeypatch.setattr(run, "_rollout", lambda batch, step: (None, {}, []))
  monkeypatch.setattr(run, "_layout", lambda *args: None)
  try:
    assert jax.sharding.get_abstract_mesh().empty
    with pytest.raises(_Received):
      run.train_step(1, None)
  finally:
    run.close()
  assert meshes[0].axis_names == run.mesh.axis_names and meshes[0].shape == run.mesh.shape
