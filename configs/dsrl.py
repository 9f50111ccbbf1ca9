"""DSRL: NSR-PreRL while step < switch_step, then GRPO from the reset reference (PAPER.md 5).

`get_config(arg)`: arg = [cpu|paper][,key=value...] (configs/common.py) plus `switch=S`, the
first GRPO step. `objective.*` are the GRPO phase's fields, `objective.warmup.*` the NSR-PreRL
phase's; `objective.reset_optimizer` / `reset_reference` say what restarts at the switch.
"""

from configs import common
from prerl_jax.rl.objective import PRESETS

SWITCH_STEP = {"cpu": 6, "paper": 20}


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.ARGS, switch=(None, int))
  config = common.experiment("dsrl", arg)
  config.objective = common.objective_section(PRESETS["grpo"])
  config.objective.update(
      switch_step=SWITCH_STEP[common.preset(arg)] if arg.switch is None else arg.switch,
      reset_optimizer=False, reset_reference=True,
      warmup=common.objective_section(PRESETS["nsr_prerl"]))
  return config
