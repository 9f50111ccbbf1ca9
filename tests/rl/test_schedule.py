"""Tests for phase schedules (phases.py), DSRL's switch above all."""

import pytest

from prerl_jax.rl import objective as oc
from prerl_jax.rl import schedule as phases


def test_dsrl_switches_at_exactly_switch_step():
  schedule = phases.dsrl_schedule(switch_step=20)
  assert schedule.objective_at(1).name == "nsr_prerl"
  assert schedule.objective_at(19).name == "nsr_prerl"
  assert schedule.objective_at(20).name == "grpo"
  assert schedule.objective_at(348).name == "grpo"
  assert [s for s in range(1, 60) if schedule.is_switch(s)] == [20]
  entered = schedule.phase_at(20)
  assert (entered.reset_reference, entered.reset_optimizer) == (True, False)


def test_get_schedule_dsrl_options_and_presets():
  schedule = phases.get_schedule("dsrl", switch_step=5, reset_optimizer=True)
  assert schedule.objective_at(4).name == "nsr_prerl"
  assert schedule.phase_at(5).reset_optimizer
  for name in oc.PRESETS:
    single = phases.get_schedule(name)
    assert single.objective_at(1000).name == name
    assert not any(single.is_switch(s) for s in range(1, 30))
  assert phases.get_schedule("nsr_prerl", pretrain_coef=1.0).objective_at(1).pretrain_coef == 1.0


def test_schedule_errors_name_the_value():
  with pytest.raises(ValueError, match="valid names: .*'dsrl'"):
    phases.get_schedule("dsrl2")
  with pytest.raises(ValueError, match=r"\['switch'\]; valid options"):
    phases.get_schedule("dsrl", switch=5)
  with pytest.raises(ValueError, match="switch_step=1"):
    phases.dsrl_schedule(switch_step=1)
  with pytest.raises(ValueError, match="step=0"):
    phases.dsrl_schedule().objective_at(0)
  grpo = oc.get_objective("grpo")
  with pytest.raises(ValueError, match="until_step=5 must be an int > 5"):
    phases.Schedule((phases.Phase(grpo, 5), phases.Phase(grpo, 5), phases.Phase(grpo)))
  with pytest.raises(ValueError, match="must have until_step=None"):
    phases.Schedule((phases.Phase(grpo, 5),))


def test_three_phase_schedule():
  grpo, nsr = oc.get_objective("grpo"), oc.get_objective("nsr_prerl")
  schedule = phases.Schedule((phases.Phase(nsr, 3), phases.Phase(grpo, 6), phases.Phase(nsr)))
  assert [schedule.objective_at(s).name for s in range(1, 8)] == (
      ["nsr_prerl"] * 2 + ["grpo"] * 3 + ["nsr_prerl"] * 2)
  assert [s for s in range(1, 10) if schedule.is_switch(s)] == [3, 6]


def test_schedule_from_config_section():
  single = phases.schedule_from_config({"name": "mine", "aggregation": "seq-mean-token-sum"})
  assert single.objective_at(7) == oc.Objective("mine", aggregation="seq-mean-token-sum")
  dsrl = phases.schedule_from_config({
      "name": "grpo", "kl_coef": 0.1, "switch_step": 4, "reset_optimizer": True,
      "reset_reference": False, "warmup": {"name": "nsr", "space": "marginal"}})
  assert dsrl.objective_at(3) == oc.Objective("nsr", space="marginal")
  assert dsrl.objective_at(4) == oc.Objective("grpo", kl_coef=0.1)
  assert (dsrl.phase_at(4).reset_optimizer, dsrl.phase_at(4).reset_reference) == (True, False)
  with pytest.raises(ValueError, match=r"\['objective.switch_step'\] missing"):
    phases.schedule_from_config({"name": "grpo", "warmup": {"name": "nsr"},
                                 "reset_optimizer": True, "reset_reference": True})
  with pytest.raises(ValueError, match=r"unknown config key\(s\) \['objective.warmup.clip'\]"):
    phases.schedule_from_config({"name": "grpo", "switch_step": 3, "reset_optimizer": True,
                                 "reset_reference": True, "warmup": {"name": "nsr", "clip": 1}})
  with pytest.raises(ValueError, match="config section objective: dual_clip=0.5 must be > 1"):
    phases.schedule_from_config({"name": "grpo", "dual_clip": 0.5})
