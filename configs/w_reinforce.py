"""Run configuration for the w_reinforce objective: `get_config(arg)`, arg = [cpu|paper][,key=value...]."""

from prerl_jax.training.run_config import make_config


def get_config(arg=None):
  return make_config("w_reinforce", arg)
