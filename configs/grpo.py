"""GRPO: group-normalized advantages on log P(y|x), post-train space (PAPER.md section 4).

`get_config(arg)`: arg = [cpu|paper][,key=value...] (configs/common.py).
"""

from configs import common
from prerl_jax.rl.objective import PRESETS


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.ARGS)
  config = common.experiment("grpo", arg)
  config.objective = common.objective_section(PRESETS["grpo"])
  return config
