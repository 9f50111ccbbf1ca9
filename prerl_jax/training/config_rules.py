"""Run-config checking: the rule beside each setting, and one pass that checks them all at start.

configs/common.py declares every setting as a `Setting`: its default, a check of the value alone,
and relations to other keys, the devices or the disk. `problems` walks a resolved config (its
`objective` section through the Objective dataclass, whose own checks are its rules) and returns
one line per bad key, naming its value and what the key takes, before any model or data loads.
A relation that reads a bad key is not checked: the bad key is reported instead.
"""

import copy
import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections

from prerl_jax import sharding
from prerl_jax.errors import UserError
from prerl_jax.rl import objective as objective_lib
from prerl_jax.rl.schedule import DSRL_KEYS, schedule_from_config

# A check returns None for a value the key takes, else what the key takes ("must be ...").
Check = Callable[[Any], str | None]


class Unchecked(Exception):
  """A relation needs something this pass does not give it: a bad key, devices or the disk."""


class Run:
  """What a relation may read: the other keys (good values only), the devices and the disk."""

  def __init__(self, config, bad_keys: Container[str], devices: Sequence | None, disk: bool):
    self._config, self._bad_keys, self._devices, self._disk = config, bad_keys, devices, disk

  def __getitem__(self, dotted: str):
    if dotted in self._bad_keys:
      raise Unchecked(dotted)
    value = self._config
    for part in dotted.split("."):
      value = value[part]
    return value

  @property
  def batch_devices(self) -> int:
    """How many ways the run's mesh splits a batch (Unchecked without devices or a good mesh)."""
    try:
      return sharding.batch_devices(self.mesh())
    except ValueError:  # Reported once, by `problems`, as the mesh's problem.
      raise Unchecked("mesh") from None

  def mesh(self):
    """The run's mesh over its devices; ValueError naming the sizes when they do not fit."""
    if self._devices is None:
      raise Unchecked("devices")
    sizes = {axis: self[f"mesh.{axis}"] for axis in sharding.MESH_AXES}
    return sharding.make_mesh(**sizes, devices=self._devices)

  def require_disk(self) -> None:
    """Unchecked unless this pass may read the disk (a dry run reads no files)."""
    if not self._disk:
      raise Unchecked("disk")


Relation = Callable[[Any, Run], str | None]


class Setting(NamedTuple):
  """A config key: its default, the values it takes alone, and its relations to the run."""

  default: Any
  check: Check
  relations: tuple[Relation, ...] = ()


def is_section(value) -> bool:
  return isinstance(value, (Mapping, ml_collections.ConfigDict))


def defaults(settings: Mapping) -> dict:
  """The nested dict of defaults of a nested dict of Settings (copies: a FieldReference default,
  for a key that takes more than one type, is never shared between configs)."""
  return {key: defaults(value) if is_section(value) else copy.deepcopy(value.default)
          for key, value in settings.items()}


# -- checks of a value alone -------------------------------------------------------------------

def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int, high: int | None = None, special: int | None = None, note: str = "") -> Check:
  """An int in [low, high] (high None: no bound), or `special` (whose meaning `note` gives)."""
  allowed = f"an int >= {low}" + (f" and <= {high}" if high is not None else "")
  allowed += (f", or {special}" if special is not None else "") + (f" ({note})" if note else "")

  def check(value):
    if _is_int(value) and (value == special or low <= value and (high is None or value <= high)):
      return None
    return f"must be {allowed}"
  return check


def number(low: float | None = None, high: float | None = None, *, above: float | None = None,
           below: float | None = None, note: str = "") -> Check:
  """A finite number >= low or > above, and <= high or < below (None: no bound)."""
  bounds = [f"{sign} {bound}" for sign, bound in ((">=", low), (">", above), ("<=", high),
                                                  ("<", below)) if bound is not None]
  allowed = " ".join(["a finite number", " and ".join(bounds)]).strip()
  allowed += f" ({note})" if note else ""

  def check(value):
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (low is None or value >= low) and (above is None or value > above)
          and (high is None or value <= high) and (below is None or value < below))
    return None if ok else f"must be {allowed}"
  return check


def one_of(*choices: str) -> Check:
  return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def boolean(value) -> str | None:
  return None if isinstance(value, bool) else "must be true or false"


def text(value) -> str | None:
  return None if isinstance(value, str) else "must be a string"


def nonempty_text(value) -> str | None:
  return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def file_names(value) -> str | None:
  if isinstance(value, (tuple, list)) and all(isinstance(v, str) and v for v in value):
    return None
  return "must be a tuple of file names, e.g. \"('a.parquet', 'b.jsonl')\""


def section(value) -> str | None:
  return None if is_section(value) else "must be a section of key=value settings"


# -- what the disk holds -----------------------------------------------------------------------

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


def data_file_problem(path: str) -> str | None:
  """What makes `path` unusable as an RL data file (None when it is a readable, non-empty
  parquet or JSONL file; its rows are checked when it loads)."""
  if not path.endswith(DATA_SUFFIXES):
    return f"{path} is not a .parquet or .jsonl file"
  if not os.path.isfile(path):
    return f"{path} does not exist" if not os.path.exists(path) else f"{path} is not a file"
  if not os.access(path, os.R_OK):
    return f"{path} cannot be read (permission denied)"
  if os.path.getsize(path) == 0:
    return f"{path} is empty (0 bytes)"
  if path.endswith(".parquet"):
    import pyarrow  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    try:
      rows = pq.ParquetFile(path).metadata.num_rows
    except (pyarrow.ArrowException, OSError) as error:
      return f"{path} is not a readable parquet file ({error})"
    if rows == 0:
      return f"{path} has no rows"
  return None


def writable_dir_problem(path: str) -> str | None:
  """What stops this process from creating and writing directory `path` (None: nothing); tried
  with a directory made and removed in `path`, or in its nearest existing parent."""
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    return f"{existing} is a file, not a directory"
  try:
    os.rmdir(tempfile.mkdtemp(dir=existing))
  except OSError as error:
    return f"{existing} is not writable by this process ({error.strerror})"
  return None


# -- the pass ----------------------------------------------------------------------------------

def _line(key: str, value, reason: str) -> str:
  shown = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return f"{key}={shown!r}: {reason}"


def _objective_problems(section: Mapping, prefix: str, preset_names: Mapping[str, str]):
  """Problems of an objective section: each field alone through the Objective dataclass, then
  (if each is good) the schedule the section describes (DSRL's switch)."""
  fields = {field.name for field in dataclasses.fields(objective_lib.Objective)}
  allowed_keys = fields | (set(DSRL_KEYS) if prefix == "objective" and "warmup" in section
                           else set())
  problems = []
  for key, value in section.items():
    if key not in allowed_keys:
      problems.append(f"{prefix}.{key}: unknown key; valid: {', '.join(sorted(allowed_keys))}")
    elif key == "warmup":
      problems += _objective_problems(value, f"{prefix}.warmup", preset_names)
    elif key == "name":
      problems += _name_problems(value, prefix, preset_names.get(prefix))
    elif key in DSRL_KEYS:  # switch_step: checked with the schedule below.
      reason = boolean(value) if key.startswith("reset_") else None
      problems += [_line(f"{prefix}.{key}", value, reason)] if reason else []
    elif isinstance(value, float) and not math.isfinite(value):
      problems.append(_line(f"{prefix}.{key}", value, "must be a finite number"))
    else:
      try:
        objective_lib.Objective(name="check", **{key: value})
      except (TypeError, ValueError) as error:  # Its messages start "<key>=<value> ...".
        message = str(error)
        problems.append(f"{prefix}.{message}" if message.startswith(f"{key}=")
                        else _line(f"{prefix}.{key}", value, message))
  return problems


def _name_problems(name, prefix: str, file_name: str | None) -> list[str]:
  """`objective.name` is a label, not a switch: it must be the preset its config file trains."""
  presets = sorted(objective_lib.PRESETS)
  if file_name is not None and name != file_name:
    return [_line(f"{prefix}.name", name,
                  f"must be {file_name!r}, the preset the config file trains: the name is a "
                  f"label and selects nothing (other presets have their own files, "
                  f"configs/<name>.py: {', '.join(presets)}, dsrl; what trains changes with "
                  f"--config.{prefix}.<field>)")]
  if name not in presets:
    return [_line(f"{prefix}.name", name, f"must be a preset name: {', '.join(presets)}")]
  return []


def problems(config, settings: Mapping, devices: Sequence | None = None, disk: bool = True,
             preset_names: Mapping[str, str] | None = None) -> list[str]:
  """One line per bad key of `config` (key, value, what it takes): values alone, then relations.

  devices: the run's devices (None: relations to the mesh are not checked); disk: check data
  files, the run directory and the model path (a dry run reads none of them); preset_names:
  section -> the objective name its config file set, for a name given on the command line.
  """
  found: dict[str, str] = {}
  relations = []

  def walk(node, rules: Mapping, prefix: str):
    for key in node:
      dotted = f"{prefix}{key}"
      if key == "objective" and not prefix:
        continue
      if key not in rules:
        found[dotted] = f"{dotted}: unknown key; valid: {', '.join(sorted(rules))}"
      elif is_section(rules[key]):
        if not is_section(node[key]):
          found[dotted] = _line(dotted, node[key], "must be a section")
        else:
          walk(node[key], rules[key], f"{dotted}.")
      else:
        reason = rules[key].check(node[key])
        if reason:
          found[dotted] = _line(dotted, node[key], reason)
        relations.extend((dotted, node[key], r) for r in rules[key].relations)
    for key in rules:
      if key not in node:
        found[f"{prefix}{key}"] = f"{prefix}{key}: missing"

  walk(config, settings, "")
  run = Run(config, found.keys(), devices, disk)  # Keys found bad by relations count too.
  for dotted, value, relation in relations:
    if dotted in found:
      continue
    try:
      reason = relation(value, run)
    except Unchecked:
      continue
    if reason:
      found[dotted] = _line(dotted, value, reason)
  lines = list(found.values())
  if devices is not None and not any(key.startswith("mesh.") for key in found):
    lines += _mesh_problems(run)
  if "objective" in config:
    objective_lines = _objective_problems(config.objective, "objective", preset_names or {})
    if not objective_lines:
      try:
        schedule_from_config(config.objective)
      except ValueError as error:  # DSRL's switch_step: "switch_step=1 must be ...".
        message = str(error)
        objective_lines = [f"objective.{message}" if message.startswith(DSRL_KEYS) else message]
    lines += objective_lines
  return lines


def _mesh_problems(run: Run) -> list[str]:
  try:
    run.mesh()
  except ValueError as error:
    return [str(error)]
  return []


def check(config, settings: Mapping, devices: Sequence | None = None, disk: bool = True,
          preset_names: Mapping[str, str] | None = None) -> None:
  """Raises one UserError listing every bad key of `config` (`problems`); else returns."""
  found = problems(config, settings, devices, disk, preset_names)
  if found:
    raise UserError(f"bad config ({len(found)} key{'s' if len(found) > 1 else ''}): "
                    + "; ".join(found))

