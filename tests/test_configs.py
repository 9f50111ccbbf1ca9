"""configs/: the arg string, the presets' data directory, every objective key reaching the
objective the schedule trains, and the check of every setting before a run loads anything."""

import dataclasses

import jax
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import configs
import run_fixtures
from configs import common
from prerl_jax.data.task_data import data_files
from prerl_jax.rl.objective import Objective
from prerl_jax.rl.schedule import DSRL_KEYS, schedule_from_config
from prerl_jax.training import config_rules as rules

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


def _problems(config, devices=1, **kwargs):
  """The one-line problems tpu_run.py's check finds in `config` (on `devices` CPU devices)."""
  return rules.problems(config, common.SETTINGS, jax.devices()[:devices], **kwargs)


def _numeric_keys(node, prefix=""):
  """Dotted key -> value of every int or float setting of a config (objective ones included)."""
  keys = {}
  for key, value in node.items():
    if rules.is_section(value):
      keys.update(_numeric_keys(value, f"{prefix}{key}."))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      keys[f"{prefix}{key}"] = value
  return keys


# Numeric settings for which any finite value is in range: entropy_coef < 0 rewards low entropy.
UNBOUNDED_BELOW = {"objective.entropy_coef", "objective.warmup.entropy_coef"}


def _set(config, dotted, value):
  *sections, leaf = dotted.split(".")
  node = config
  for section in sections:
    node = node[section]
  with node.ignore_type():
    node[leaf] = value


def test_every_numeric_setting_out_of_range_is_one_line_naming_it(tmp_path):
  config = configs.get_config("dsrl", f"run_dir={tmp_path}")
  assert _problems(config) == []
  keys = _numeric_keys(config)
  assert len(keys) >= 50 and {"optim.learning_rate", "objective.warmup.clip_low",
                              "objective.switch_step", "mesh.fsdp"} <= set(keys)
  for key, value in keys.items():
    bad_values = [float("nan"), float("inf")] if isinstance(value, float) else [-2]
    if key not in UNBOUNDED_BELOW:
      bad_values.append(-1.0 if isinstance(value, float) else -2)
    for bad in bad_values:
      changed = configs.get_config("dsrl", f"run_dir={tmp_path}")
      _set(changed, key, bad)
      found = _problems(changed)
      assert len(found) == 1, (key, bad, found)
      if key.startswith("data.task_config."):  # Checked by reasoning-gym as a whole.
        assert found[0].startswith("data.task_config={") and key.split(".")[-1] in found[0]
      else:
        assert found[0].startswith(f"{key}={bad!r}") and "must be" in found[0], found


@pytest.mark.parametrize("overrides, expected", [
    ({"optim.learning_rate": -1e-5}, "optim.learning_rate=-1e-05: must be a finite number > 0"),
    ({"train.steps": -1}, "train.steps=-1: must be an int >= 1"),
    ({"rollout.prompts_per_step": 0}, "rollout.prompts_per_step=0: must be an int >= 1"),
    ({"optim.micro_batches": 0}, "optim.micro_batches=0: must be an int >= 1"),
    ({"rollout.max_new_tokens": 0}, "rollout.max_new_tokens=0: must be an int >= 1"),
    ({"rollout.top_p": 1.5}, "rollout.top_p=1.5: must be a finite number > 0 and <= 1"),
    ({"rollout.temperature": 0.0},
     "rollout.temperature=0.0: must be a finite number > 0 (rollouts are sampled, and the update "
     "scores them at this temperature; eval.temperature=0 evaluates greedily)"),
    ({"rollout.group_size": 0}, "rollout.group_size=0: must be an int >= 1"),
    ({"model.dtype": "float33"}, "model.dtype='float33': must be one of float32, bfloat16, "
                                 "float16"),
    ({"data.task": "chain_summ"}, "data.task='chain_summ': must be a reasoning-gym task: ab, "),
    ({"data.task_config": {"max_terms": 2, "min_terms": 3}},
     "data.task_config={'max_terms': 2, 'min_terms': 3}: reasoning-gym task 'chain_sum' rejects "
     "config {'max_terms': 2, 'min_terms': 3}: max_terms must be >= min_terms"),
    ({"data.source": "files"}, "data.train_files=(): must name at least one file while "
                               "data.source='files'"),
    ({"data.train_size": 7}, "data.train_size=7: must be >= rollout.prompts_per_step = 8"),
    ({"optim.micro_batches": 3}, "optim.micro_batches=3: must split a step's "
                                 "rollout.prompts_per_step * rollout.group_size = 64 rows"),
    ({"train.run_dir": "/proc/runs/{name}"}, "train.run_dir='/proc/runs/{name}': /proc is not "
                                             "writable by this process"),
    ({"train.run_dir": "runs/{nam}"}, "train.run_dir='runs/{nam}': may hold no {field} other "
                                      "than {name}"),
    ({"model.name": "qwen3-4b"}, "model.name='qwen3-4b': Preset 'qwen3-4b' needs a local "
                                 "checkpoint"),
    ({"train.on_bad_checkpoint": "skip"}, "train.on_bad_checkpoint='skip': must be one of "
                                          "previous, fail, restart"),
    ({"objective.name": "grpoo"}, "objective.name='grpoo': must be a preset name: grpo, "),
    ({"objective.warmup.clip_low": 1.5}, "objective.warmup.clip_low=1.5 must be in [0, 1)"),
    ({"mesh.fsdp": 3}, "mesh {'data': 1, 'fsdp': 3, 'tensor': 1} needs 3 devices; 1 are "
                       "available"),
])
def test_each_bad_value_is_named_with_what_the_key_takes(tmp_path, overrides, expected):
  config = configs.get_config("dsrl", f"run_dir={tmp_path}")
  for key, value in overrides.items():
    _set(config, key, value)
  found = _problems(config)
  assert len(found) == 1 and found[0].startswith(expected), found


def test_relations_to_the_devices_and_every_bad_key_in_one_error(tmp_path):
  config = configs.get_config("grpo", f"run_dir={tmp_path},prompts=3,group=2")
  config.eval.prompts_per_call = 6
  assert _problems(config, devices=1) == []
  assert _problems(config, devices=2) == [  # fsdp=-1: batches split over both devices.
      "optim.micro_batches=2: must split a step's rollout.prompts_per_step * "
      "rollout.group_size = 6 rows evenly on each of 2 batch device(s)",
      "rollout.prompts_per_step=3: must be divisible by 2, the ways the mesh splits a batch"]
  config.eval.temperature = 0.0  # Greedy evaluation.
  config.rollout.top_k = -1
  config.optim.learning_rate = -1e-5
  config.mesh.tensor = 0
  with pytest.raises(ValueError) as raised:
    common.check_config(config, jax.devices()[:2])
  message = str(raised.value)
  assert message.startswith("bad config (3 keys): ") and "\n" not in message
  for key in ("mesh.tensor=0", "optim.learning_rate=-1e-05", "rollout.top_k=-1"):
    assert key in message, message


def test_data_files_are_checked_before_they_load(tmp_path):
  good = tmp_path / "good.jsonl"
  good.write_text('{"prompt": [{"role": "user", "content": "1+1"}], '
                  '"reward_model": {"ground_truth": "2"}}\n')
  (tmp_path / "empty.parquet").touch()
  (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
  pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "no_rows.parquet")
  (tmp_path / "data.csv").write_text("a,b\n")
  config = configs.get_config("grpo", f"run_dir={tmp_path / 'run'},prompts=1")
  config.data.update(source="files", dir=str(tmp_path), train_files=("good.jsonl",),
                     eval_files=("good.jsonl",))
  assert _problems(config) == []
  config.data.train_files = ("empty.parquet", "garbage.parquet", "no_rows.parquet", "data.csv",
                             "missing.jsonl")
  (found,) = _problems(config)
  for problem in ("empty.parquet is empty (0 bytes)", "garbage.parquet is not a readable parquet "
                  "file", "no_rows.parquet has no rows", "data.csv is not a .parquet or .jsonl "
                  "file", "missing.jsonl does not exist"):
    assert problem in found, found
  assert found.startswith("data.train_files=('empty.parquet',")
  assert _problems(config, disk=False) == []  # A dry run reads no files.


def test_an_objective_name_other_than_the_files_names_the_files_preset():
  config = run_fixtures.parse_config("dsrl", overrides=["--config.objective.warmup.name=nsr_rl"])
  (found,) = _problems(config, preset_names={"objective.warmup": "nsr_prerl"})
  assert found.startswith("objective.warmup.name='nsr_rl': must be 'nsr_prerl', the preset the "
                          "config file trains: the name is a label and selects nothing"), found
  assert _problems(config, preset_names={"objective.warmup": "nsr_rl"}) == []


def test_units_are_free_only_in_the_paper_preset_whose_truths_lost_theirs():
  assert configs.get_config("grpo").reward.units == "strict"
  assert configs.get_config("grpo", "paper").reward.units == "free"
