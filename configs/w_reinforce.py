"""W-REINFORCE: lambda on right responses, -1 on wrong ones, post-train space.

`get_config(arg)`: arg = [cpu|paper][,key=value...] (configs/common.py).
"""

from configs import common
from prerl_jax.rl.objective import PRESETS


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.ARGS)
  config = common.experiment("w_reinforce", arg)
  config.objective = common.objective_section(PRESETS["w_reinforce"])
  return config
