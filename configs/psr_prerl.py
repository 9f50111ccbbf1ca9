"""PSR-PreRL: push up log P(y) of right responses in pre-train space; an ablation.

`get_config(arg)`: arg = [cpu|paper][,key=value...] (configs/common.py).
"""

from configs import common
from prerl_jax.rl.objective import PRESETS


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.ARGS)
  config = common.experiment("psr_prerl", arg)
  config.objective = common.objective_section(PRESETS["psr_prerl"])
  return config
