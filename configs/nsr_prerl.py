"""NSR-PreRL: push down log P(y) of wrong responses in pre-train space (the paper's finding).

`get_config(arg)`: arg = [cpu|paper][,key=value...] (configs/common.py).
"""

from configs import common
from prerl_jax.rl.objective import PRESETS


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.ARGS)
  config = common.experiment("nsr_prerl", arg)
  config.objective = common.objective_section(PRESETS["nsr_prerl"])
  return config
