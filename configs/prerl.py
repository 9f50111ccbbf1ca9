"""PreRL: policy gradient on log P(y), the prompt removed (pre-train space), all responses.

`get_config(arg)`: arg = [cpu|paper][,key=value...] (configs/common.py).
"""

from configs import common
from prerl_jax.rl.objective import PRESETS


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.ARGS)
  config = common.experiment("prerl", arg)
  config.objective = common.objective_section(PRESETS["prerl"])
  return config
