"""Orbax checkpoints of the train state and the data iterator: asynchronous, atomic, last K kept.

Orbax writes each step into a temporary directory and renames it when complete, so a checkpoint
interrupted while being written is never listed, and `latest_step` only sees complete ones. A
complete checkpoint whose files were damaged later (a full disk, a truncated copy) fails to
restore with `UnreadableCheckpoint`; `set_aside` renames it `<step>.corrupt` so it is never
listed again. One that holds other arrays than the run's state fails with a UserError instead.
"""

import logging
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from prerl_jax.errors import UserError

# What a resumed run does with a checkpoint that cannot be read (train.on_bad_checkpoint).
ON_BAD_CHECKPOINT = ("previous", "fail", "restart")


def _abstract(tree):
  """ShapeDtypeStructs (with shardings where the leaves have them) of a pytree's leaves."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def _arrays(tree) -> dict[str, tuple]:
  """'path/to/leaf' -> (shape, dtype) of a pytree's arrays, in the form that a state and the
  metadata orbax stored for it share (a PRNG key as its raw words, as orbax stores it)."""
  def name(entry):
    return str(next((getattr(entry, a) for a in ("name", "key", "idx") if hasattr(entry, a)),
                    entry))

  def stored_form(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.eval_shape(jax.random.key_data, leaf)
    return tuple(leaf.shape), str(leaf.dtype)
  return {"/".join(name(e) for e in path): stored_form(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class UnreadableCheckpoint(Exception):
  """A complete checkpoint whose files cannot be read back; the message names it and the cause."""


class Checkpointer:
  """Saves and restores {'state': pytree of arrays, 'data': JSON-serialisable dict} by step."""

  def __init__(self, directory: str, keep: int = 2, asynchronous: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=asynchronous)
    self._manager = ocp.CheckpointManager(epath.Path(directory).absolute(), options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    """The steps of the complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def path(self, step: int) -> str:
    return os.path.join(str(self._manager.directory), str(step))

  def save(self, step: int, state, data_state: dict) -> None:
    """Starts saving (returns before the write finishes when asynchronous)."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract_state):
    """(state, data_state) of `step`, placed with the shardings of `abstract_state`'s leaves.

    Raises UnreadableCheckpoint when its files cannot be read, and a UserError naming the first
    differences when it holds other arrays than `abstract_state` (another model or optimizer).
    """
    path = self.path(step)
    try:
      stored = _arrays(ocp.StandardCheckpointHandler().metadata(epath.Path(path, "state")).tree)
    except Exception as error:  # pylint: disable=broad-exception-caught
      raise UnreadableCheckpoint(f"{path} cannot be read ({_first_line(error)})") from error
    expected = _arrays(abstract_state)
    if stored != expected:
      differences = [f"{key}: stored {stored.get(key)}, this run {expected.get(key)}"
                     for key in sorted(set(stored) | set(expected))
                     if stored.get(key) != expected.get(key)]
      raise UserError(f"{path} holds another state than this run config builds "
                      f"({len(differences)} arrays differ, e.g. {differences[0]}): resume with "
                      f"the config that wrote it, or give this one a new train.run_dir")
    failure = None
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(abstract_state)),
          data=ocp.args.JsonRestore()))
    except Exception as error:  # pylint: disable=broad-exception-caught
      # Orbax raises bare Exceptions (TensorStore reads), JSON and OS errors: all unreadable here,
      # since the arrays it lists are the ones the run expects.
      _drop_reports_of_abandoned_reads()
      failure = error
    if not _on_every_process(failure is None):  # Each process reads its own shards.
      cause = _first_line(failure) if failure else "another process could not read its part"
      raise UnreadableCheckpoint(f"{path} cannot be read ({cause})") from failure
    return restored["state"], restored["data"]

  def set_aside(self, step: int) -> str:
    """Renames checkpoint `step` to `<step>.corrupt` (`.corrupt.2`, ... if taken), so it is never
    listed or restored again; returns the new path. Process 0 renames; all processes wait."""
    path = self.path(step)
    target = f"{path}.corrupt"
    suffix = 1
    while os.path.exists(target):
      suffix += 1
      target = f"{path}.corrupt.{suffix}"
    if jax.process_index() == 0:
      os.rename(path, target)
    ocp.multihost.sync_global_processes(f"prerl_jax_set_aside_{step}")
    self._manager.reload()
    return target

  def restore_params(self, step: int, abstract_params):
    """The train state's params alone at `step` (no optimizer state or data state is read),
    placed with the shardings of `abstract_params`' leaves."""
    target = {"params": _abstract(abstract_params)}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(target, partial_restore=True)))
    except Exception as error:  # pylint: disable=broad-exception-caught
      _drop_reports_of_abandoned_reads()
      raise UserError(f"{self.path(step)} cannot be read ({_first_line(error)}): evaluate "
                      f"another step of {self._manager.directory}") from error
    return restored["state"]["params"]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _on_every_process(ok: bool) -> bool:
  """Whether `ok` holds on every process of the run."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _first_line(error: BaseException, limit: int = 200) -> str:
  """The start of an error's message (orbax appends whole TensorStore specs to its own)."""
  text = str(error).split(" See full TensorStore details", 1)[0].strip().rstrip(".")
  line = text.splitlines()[0] if text else type(error).__name__
  return line if len(line) <= limit else line[:limit] + "..."


def _drop_reports_of_abandoned_reads() -> None:
  """From now on, drops what the other reads of a failed restore report as they end.

  Orbax leaves them running; each then reports to sys.unraisablehook, or through the
  `concurrent.futures` logger when its future's callback finds the loop closed, as a traceback
  that adds nothing to the failure already named: the closed event loop it cannot call back, or
  its own read's error. Every other report goes where it went before.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_abandoned_reads", False):
    return
  closed = lambda error: isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
  logging.getLogger("concurrent.futures").addFilter(
      lambda record: not (record.exc_info and closed(record.exc_info[1])))

  def hook(unraisable):
    read = getattr(unraisable.object, "__qualname__", "") == "_read_array_index_and_device_put"
    if not (closed(unraisable.exc_value) or read):
      previous(unraisable)

  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook
