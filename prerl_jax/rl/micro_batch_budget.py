"""`optim.micro_batches=auto`: the fewest micro-batches whose compiled update fits a chip's HBM.

A count is valid when it splits a step's rows (rollout.prompts_per_step x group_size) evenly on
each batch device (configs/common.py `_splits_a_step`). `auto` is the fewest valid count whose
update, compiled (not run) for the run's train state and the largest batch a step brings, fits:

    peak + resident + margin <= HBM

peak: the largest over the update programs the trainer may run (each schedule phase's train step,
scoring both spaces where train.log_both_spaces > 0: a superset of a one-space step) of XLA's
memory analysis, arguments + outputs - donated aliases + temporaries + code (the dry run's
compiler peak); a compile refused for lack of HBM (libtpu refuses one) does not fit. The largest
batch: every response at rollout.max_new_tokens after a prompt of the bucket of
data.max_prompt_length, packed as the trainer packs it (optim.pack; a row is the doubling bucket
of its longest segment) or padded. resident: what else HBM holds while the update runs (at run
time the device's bytes in use at start less the train state; 0 in the dry run). margin: the page
pool's (pool_budget.py: 1 GiB + 5% of HBM), for the runtime's buffers and fragmentation.

The search compiles the fewest valid count first. After a count that does not fit it jumps to the
first count that could fit were the temporaries to shrink in proportion to a micro-batch's rows
(per-row buffers do; weights, gradients and their accumulators do not), or to the largest count
where none could (packing may narrow a micro-batch's rows as the count grows, shrinking them
faster). From the first count that fits it steps down over the counts it skipped until one does
not fit: with peaks that do not grow with the count, the count it ends on is the fewest that
fits, found in a few compiles. On a device without a memory limit (CPU) `auto` is the fewest valid
count, and nothing is compiled. No count fitting, the largest included, is one error naming the
key and the numbers.

The trainer resolves it once at start (`resolve`: the device's HBM, logged); the dry run for the
target's HBM, from its own compiles of the same programs (`update_programs`, `fewest_fitting`),
and reports the counts tried. The page pool (rollout.kv_cache_gib=auto) does not depend on it, nor
it on the pool: the two never hold HBM at once (the pool and the rollout copy are dropped before
the update; the update's temporaries are freed before the next sampling), and both budgets count
the train state as resident, so each is sized alone, in either order.
"""

import dataclasses
import logging
import re
from typing import Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from prerl_jax import sharding
from prerl_jax.errors import UserError
from prerl_jax.generate import pool_budget
from prerl_jax.rl import packing, train_step
from prerl_jax.rl.batch import rollout_batch
from prerl_jax.rl.schedule import schedule_from_config

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Tried:
  """One count's compiled update: its programs' largest peak per chip and that program's
  temporaries; refused: the compiler refused it for lack of HBM (the peak: arguments + the
  temporaries it asked for, a lower bound)."""

  micro_batches: int
  peak_bytes: float
  temp_bytes: float
  refused: bool = False


@dataclasses.dataclass(frozen=True)
class Choice:
  """The count `auto` resolved to, and what it was chosen from (hbm_bytes None: no limit)."""

  micro_batches: int
  rows: int
  batch_devices: int
  hbm_bytes: float | None = None
  resident_bytes: float = 0.0
  tried: tuple[Tried, ...] = ()

  @property
  def margin_bytes(self) -> float:
    return pool_budget.MARGIN_BYTES + pool_budget.MARGIN_SHARE * (self.hbm_bytes or 0.0)

  @property
  def available_bytes(self) -> float:
    """What the update's peak may take: HBM - resident - margin."""
    return self.hbm_bytes - self.resident_bytes - self.margin_bytes

  def _budget(self) -> str:
    tried = ", ".join(f"{t.micro_batches}: {t.peak_bytes / GIB:.2f}"
                      + (" (refused)" if t.refused else "") for t in self.tried)
    return (f"HBM {self.hbm_bytes / GIB:.2f} - resident {self.resident_bytes / GIB:.2f} - margin "
            f"{self.margin_bytes / GIB:.2f} = {self.available_bytes / GIB:.2f} GiB per chip for "
            f"the update's compiled peak; tried (micro-batches: peak GiB) {tried}")

  def describe(self) -> str:
    """Which count and why, e.g. "32 micro-batches, the fewest whose update fits: HBM ..."."""
    if self.hbm_bytes is None:
      return (f"{self.micro_batches} micro-batch(es), the fewest that split {self.rows} rows "
              f"evenly on each of {self.batch_devices} batch device(s) (no memory limit on this "
              "device: nothing compiled)")
    return f"{self.micro_batches} micro-batches, the fewest whose update fits: {self._budget()}"

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "margin_bytes": self.margin_bytes,
            "text": self.describe()}


def valid_counts(rows: int, batch_devices: int) -> list[int]:
  """The micro-batch counts that split `rows` evenly on each batch device, ascending."""
  return [m for m in range(1, rows // batch_devices + 1) if rows % (m * batch_devices) == 0]


def proportional_fewest(micro_batches: int, temp_bytes: float, fixed_bytes: float,
                        available_bytes: float, counts) -> int | None:
  """The first of `counts` whose peak could be at most `available_bytes`, were the temporaries
  (`temp_bytes` at `micro_batches`, beside `fixed_bytes`) to shrink in proportion to a
  micro-batch's rows: a lower bound on the count that fits; None where none can."""
  if fixed_bytes >= available_bytes:
    return None
  needed = micro_batches * temp_bytes / (available_bytes - fixed_bytes)
  return next((m for m in counts if m >= needed), None)


def fewest_fitting(measure: Callable[[int], Tried], rows: int, batch_devices: int,
                   hbm_bytes: float | None, resident_bytes: float = 0.0) -> Choice:
  """The fewest valid count whose `measure` (its compiled update) fits (module docstring);
  `hbm_bytes` None (no limit): the fewest valid count, nothing measured."""
  counts = valid_counts(rows, batch_devices)
  choice = Choice(counts[0], rows, batch_devices, hbm_bytes, resident_bytes)
  if hbm_bytes is None:
    return choice
  tried = {}

  def fits(count: int) -> bool:
    tried[count] = measure(count)
    return not tried[count].refused and tried[count].peak_bytes <= choice.available_bytes

  count = counts[0]
  while not fits(count):
    last = tried[count]
    larger = [m for m in counts if m > count]
    # The proportional bound, or else the largest count: packing can narrow the rows of a
    # micro-batch as the count grows, shrinking its temporaries faster than its rows.
    count = proportional_fewest(count, last.temp_bytes, last.peak_bytes - last.temp_bytes,
                                choice.available_bytes, larger) or (larger or [None])[-1]
    if count is None:
      failed = dataclasses.replace(choice, tried=tuple(tried.values()))
      raise UserError(
          f"optim.micro_batches=auto: no count fits the update on a chip: {failed._budget()}; "
          f"{counts[-1]} is the most that split {rows} rows evenly on each of {batch_devices} "
          "batch device(s): shard over more chips, set model.remat=full, or shorten "
          "rollout.max_new_tokens")
  while count > counts[0]:  # Down over the counts skipped, to the fewest that fits.
    below = counts[counts.index(count) - 1]
    if below in tried or not fits(below):
      break
    count = below
  return dataclasses.replace(choice, micro_batches=count,
                             tried=tuple(sorted(tried.values(), key=lambda t: t.micro_batches)))


def refused_temporaries(error: Exception) -> float | None:
  """The temporaries a compiler's out-of-memory error names, in bytes (None: another error).

  libtpu refuses a program that does not fit: "... memory required for HLO temporaries
  (151.03G) exceeds available HBM (95.74G)" (G: GiB).
  """
  found = re.search(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT]?)\)", str(error), re.S)
  if not found:
    return None
  return float(found.group(1)) * 1024 ** " KMGT".index(found.group(2) or " ")


def compiled_peak_bytes(memory) -> int:
  """A compiled program's peak per chip from its `memory_analysis()`: its arguments and
  `pool_budget.program_bytes` (temporaries, code, outputs not written in place)."""
  return memory.argument_size_in_bytes + pool_budget.program_bytes(memory)


def largest_batch(config: ml_collections.ConfigDict, spaces, micro_batches: int,
                  prompt_width: int, mesh, *, bos_id: int, share_prompts: bool):
  """The largest batch a step brings to the update, abstract and placed as the trainer places
  it: every response at rollout.max_new_tokens after a `prompt_width`-token prompt (one prompt
  per group), packed for `spaces` (optim.pack, `packing.pack`) or padded."""
  rollout, optim = config.rollout, config.optim
  rows, new_tokens = rollout.prompts_per_step * rollout.group_size, rollout.max_new_tokens
  prompts = np.zeros((rows, prompt_width), np.int32)
  prompts[:, 0] = np.arange(rows) // rollout.group_size
  host = rollout_batch(prompts, np.full(rows, prompt_width), np.zeros((rows, new_tokens), np.int32),
                       np.full(rows, new_tokens))
  if not optim.pack:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, x.ndim)), host)
  packed = packing.pack(host, spaces, micro_batches=micro_batches, row_tokens=optim.row_tokens,
                        bos_id=bos_id, multiple_of=sharding.batch_devices(mesh),
                        share_prompts=share_prompts)
  axes = sharding.batch_sharding(mesh, 1).spec[0]  # As `packing.shard` places it.
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
      mesh, PartitionSpec(None, axes) if x.ndim >= 2 else PartitionSpec())), packed)


def update_programs(config: ml_collections.ConfigDict, graphdef, optimizer, state, mesh,
                    micro_batches: int, *, prompt_width: int, bos_id: int,
                    share_prompts: bool) -> list[tuple]:
  """(objective, traced train step, its batch) of each schedule phase, built as the trainer
  builds it for `micro_batches`, traced (not compiled) for `state` (arrays or abstract) and the
  `largest_batch`, both spaces scored where train.log_both_spaces > 0."""
  both_spaces = bool(config.train.log_both_spaces)
  programs = []
  for phase in schedule_from_config(config.objective).phases:
    objective = phase.objective
    batch = largest_batch(config, train_step.scored_spaces(objective, both_spaces), micro_batches,
                          prompt_width, mesh, bos_id=bos_id, share_prompts=share_prompts)
    step = train_step.make_train_step(
        graphdef, objective, optimizer, group_size=config.rollout.group_size,
        micro_batches=micro_batches, bos_id=bos_id, temperature=config.rollout.temperature,
        other_space_metrics=both_spaces, mesh=mesh, state=state, packed=config.optim.pack)
    programs.append((objective, step.trace(state, batch), batch))
  return programs


def _state_bytes(state) -> int:
  """A TrainState's bytes per chip (its scalars and key aside)."""
  return sharding.per_device_bytes((state.params, state.opt_state, state.reference))


def compile_and_measure(micro_batches: int, programs, state) -> Tried:
  """The `Tried` of `update_programs`' programs compiled for this device."""
  measured = []
  for _, traced, batch in programs:
    try:
      memory = traced.lower().compile().memory_analysis()
    except jax.errors.JaxRuntimeError as error:
      temporaries = refused_temporaries(error)
      if temporaries is None:
        raise
      arguments = _state_bytes(state) + sharding.per_device_bytes(batch)
      measured.append(Tried(micro_batches, arguments + temporaries, temporaries, refused=True))
      continue
    measured.append(Tried(micro_batches, compiled_peak_bytes(memory), memory.temp_size_in_bytes))
  return dataclasses.replace(max(measured, key=lambda t: t.peak_bytes),
                             refused=any(t.refused for t in measured))


def resolve(config: ml_collections.ConfigDict, graphdef, optimizer, state, mesh, *,
            prompt_width: int, bos_id: int, share_prompts: bool) -> Choice:
  """`auto` for the trainer, once at start: the device's HBM (`pool_budget`'s reading, agreed
  over processes) and what is in use beside `state`; logged."""
  rollout = config.rollout
  memory = pool_budget.device_hbm_and_in_use(mesh)
  hbm, resident = None, 0.0
  if memory is not None:
    hbm, in_use = memory
    resident = max(in_use - _state_bytes(state), 0.0)

  def measure(micro_batches: int) -> Tried:
    programs = update_programs(config, graphdef, optimizer, state, mesh, micro_batches,
                               prompt_width=prompt_width, bos_id=bos_id,
                               share_prompts=share_prompts)
    return compile_and_measure(micro_batches, programs, state)

  choice = fewest_fitting(measure, rollout.prompts_per_step * rollout.group_size,
                          sharding.batch_devices(mesh), hbm, resident)
  logging.info("optim.micro_batches=auto: %s", choice.describe())
  return choice
