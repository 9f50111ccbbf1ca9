"""Orbax checkpoints of the train state and the data iterator: asynchronous, atomic, last K kept.

Orbax writes each step into a temporary directory and renames it when complete, so a checkpoint
interrupted while being written is never listed, and `latest_step` only sees complete ones.
"""

import jax
import orbax.checkpoint as ocp
from etils import epath


def _abstract(tree):
  """ShapeDtypeStructs (with shardings where the leaves have them) of a pytree's leaves."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


class Checkpointer:
  """Saves and restores {'state': pytree of arrays, 'data': JSON-serialisable dict} by step."""

  def __init__(self, directory: str, keep: int = 2, asynchronous: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=asynchronous)
    self._manager = ocp.CheckpointManager(epath.Path(directory).absolute(), options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    """Starts saving (returns before the write finishes when asynchronous)."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract_state):
    """(state, data_state) of `step`, placed with the shardings of `abstract_state`'s leaves."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(abstract_state)), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore_params(self, step: int, abstract_params):
    """The train state's params alone at `step` (no optimizer state or data state is read),
    placed with the shardings of `abstract_params`' leaves."""
    target = {"params": _abstract(abstract_params)}
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, partial_restore=True)))
    return restored["state"]["params"]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
