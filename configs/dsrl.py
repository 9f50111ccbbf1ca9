"""Run configuration for the dsrl objective: `get_config(arg)`, arg = [cpu|paper][,key=value...]."""

from prerl_jax.training.run_config import make_config


def get_config(arg=None):
  return make_config("dsrl", arg)
