"""Run configs, one file per objective: `get_config(name, arg)` is what
`python launch/tpu_run.py --config=configs/<name>.py:<arg>` trains (configs/common.py: the arg)."""

import importlib
import os

NAMES = tuple(sorted(file[:-3] for file in os.listdir(os.path.dirname(__file__))
                     if file.endswith(".py") and file not in ("__init__.py", "common.py")))


def get_config(name: str, arg: str | None = None):
  """The run config of configs/<name>.py for `arg` (e.g. "cpu,steps=20")."""
  if name not in NAMES:
    raise ValueError(f"no run config {name!r}; valid: {', '.join(NAMES)}")
  return importlib.import_module(f"configs.{name}").get_config(arg)
