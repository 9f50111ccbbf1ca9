"""configs/: the arg string, the presets' data directory, and every objective key reaching the
objective the schedule trains."""

import dataclasses

import pytest

import configs
import run_fixtures
from prerl_jax.data.task_data import data_files
from prerl_jax.rl.objective import Objective
from prerl_jax.rl.schedule import DSRL_KEYS, schedule_from_config

FIELDS = {field.name for field in dataclasses.fields(Objective)}


def _schedule(name, *overrides):
  return schedule_from_config(run_fixtures.parse_config(name, overrides=overrides).objective)


def test_objective_keys_are_the_objective_fields_and_dsrl_adds_only_its_switch():
  for name in configs.NAMES:
    section = configs.get_config(name).objective
    assert set(section) == FIELDS | (set(DSRL_KEYS) if name == "dsrl" else set()), name
  assert set(configs.get_config("dsrl").objective.warmup) == FIELDS


@pytest.mark.parametrize("name, section", [*((n, "objective") for n in configs.NAMES),
                                           ("dsrl", "objective.warmup")])
def test_every_objective_key_changes_that_field_of_the_trained_objective(name, section):
  default = _schedule(name)
  index = 0 if section == "objective.warmup" else -1
  changed = run_fixtures.changed_objective_overrides(name, section)
  assert set(changed) == FIELDS
  for key, (text, value) in changed.items():
    schedule = _schedule(name, f"--config.{section}.{key}={text}")
    expected = [phase.objective for phase in default.phases]
    expected[index] = dataclasses.replace(expected[index], **{key: value})
    assert [phase.objective for phase in schedule.phases] == expected, key
    assert getattr(expected[index], key) != getattr(default.phases[index].objective, key), key


def test_dsrl_switch_and_reset_keys_change_the_schedule():
  default = _schedule("dsrl")
  assert (default.phases[0].until_step, default.phases[1].reset_optimizer,
          default.phases[1].reset_reference) == (6, False, True)
  schedule = _schedule("dsrl", "--config.objective.switch_step=9",
                       "--config.objective.reset_optimizer=true",
                       "--config.objective.reset_reference=false")
  assert (schedule.phases[0].until_step, schedule.phases[1].reset_optimizer,
          schedule.phases[1].reset_reference) == (9, True, False)
  assert [p.objective.name for p in schedule.phases] == ["nsr_prerl", "grpo"]
  assert _schedule("dsrl").phases[0].until_step == 6
  paper = configs.get_config("dsrl", "paper").objective
  assert schedule_from_config(paper).phases[0].until_step == 20
  assert schedule_from_config(configs.get_config("dsrl", "switch=3").objective).is_switch(3)


def test_keys_without_effect_do_not_exist_and_unknown_keys_are_named():
  with pytest.raises((AttributeError, KeyError), match="switch_step"):
    run_fixtures.parse_config("grpo", overrides=["--config.objective.switch_step=3"])
  with pytest.raises((AttributeError, KeyError), match="warmup"):
    run_fixtures.parse_config("nsr_prerl", overrides=["--config.objective.warmup.clip_low=0.1"])
  section = configs.get_config("grpo").objective
  section.clip_lo = 0.1
  with pytest.raises(ValueError, match=r"objective\.clip_lo"):
    schedule_from_config(section)
  with pytest.raises(ValueError, match=r"objective.warmup: clip_low=1.5"):
    _schedule("dsrl", "--config.objective.warmup.clip_low=1.5")
  with pytest.raises(ValueError, match=r"config argument 'switch=3': unknown key 'switch'"):
    configs.get_config("grpo", "switch=3")


def test_arg_string_presets_shortcuts_and_errors():
  config = configs.get_config("dsrl", "paper,data_dir=/d,path=/m/Qwen3-4B,steps=3,lr=2e-6,"
                                      "prompts=64,switch=4")
  assert config.name == "dsrl_paper"
  assert (config.model.name, config.model.path, config.train.steps, config.optim.learning_rate,
          config.rollout.prompts_per_step, config.objective.switch_step) == (
              "qwen3-4b", "/m/Qwen3-4B", 3, 2e-6, 64, 4)
  assert (config.data.dir, config.data.source) == ("/d", "files")
  cpu = configs.get_config("nsr_prerl", "cpu,steps=20,group=4,model=x")
  assert (cpu.name, cpu.train.steps, cpu.rollout.group_size, cpu.model.name) == (
      "nsr_prerl_cpu", 20, 4, "x")
  assert configs.get_config("grpo").to_dict() == configs.get_config("grpo", "cpu").to_dict()
  for arg, message in (("steps=x", "steps='x': expected int"), ("cpu,paper", "one preset"),
                       ("data_dir=/d", "paper preset only"), ("steps", "needs a value")):
    with pytest.raises(ValueError, match=message):
      configs.get_config("grpo", arg)
  with pytest.raises(ValueError, match="no run config 'dsrl2'"):
    configs.get_config("dsrl2")


def test_paper_files_are_read_from_data_dir_and_a_missing_one_is_named(tmp_path):
  names = ("math_train.parquet", "aime_2024_20times.parquet", "aime_2025_20times.parquet",
           "amc2023_20times.parquet")
  for name in names:
    (tmp_path / name).touch()
  data = configs.get_config("grpo", f"paper,data_dir={tmp_path}").data
  assert data_files(data) == ([str(tmp_path / names[0])], [str(tmp_path / n) for n in names[1:]])
  (tmp_path / "amc2023_20times.parquet").unlink()
  with pytest.raises(ValueError, match=r"data\.dir=.*amc2023_20times\.parquet \(in "
                                       r"data\.eval_files\) does not exist"):
    data_files(data)
  with pytest.raises(ValueError, match=r"data\.dir='': math_train\.parquet .*data_dir=/path"):
    data_files(configs.get_config("grpo", "paper").data)
  assert data_files(configs.get_config("grpo").data) == ([], [])
