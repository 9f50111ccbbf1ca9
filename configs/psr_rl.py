"""PSR-RL: GRPO on the right responses only (A > 0), post-train space; an ablation.

`get_config(arg)`: arg = [cpu|paper][,key=value...] (configs/common.py).
"""

from configs import common
from prerl_jax.rl.objective import PRESETS


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.ARGS)
  config = common.experiment("psr_rl", arg)
  config.objective = common.objective_section(PRESETS["psr_rl"])
  return config
