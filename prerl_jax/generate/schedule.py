"""Host scheduling of the continuous engine: admission, pages, preemption, retirement, widths.

`Scheduler` takes every decision of a `ContinuousSampler.sample` call from host copies of the
decode rows; a subclass runs what it decides: `continuous._Run` runs the prefill and decode
programs on the devices, `Simulation` steps each row to a given response length without a model
(the dry run's projection over response lengths, `prerl_jax/aot/response_lengths.py`). Both run
`Scheduler.run`, so the projection follows the engine's own rules.

Rules (docs/continuous_batching.md): groups (a prompt with its remaining samples) are admitted
in queue order while a shard has their rows free and the pages of their first chunk (after the
pages its live rows' next chunk needs), into the shard with the most free rows (then pages, then
the lowest index); before each chunk every live row gets the pages that chunk writes, and while
a shard is short its most recently admitted group is put back at the head of the queue; a chunk
runs the occupied rows at the narrowest decode width that holds the fullest shard's; a row whose
sequence stopped is retired and its pages freed.
"""

import abc
import bisect
import collections
import dataclasses
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from prerl_jax.generate import page_pool


@dataclasses.dataclass(eq=False)
class Group:
  """A prompt, the samples of it still to be sampled, and the shard it runs in once admitted."""
  prompt: list[int]
  sequences: list[int]
  limit: int
  shard: int = 0


def decode_widths(rows: int) -> tuple[int, ...]:
  """The row counts a decode chunk is compiled for: a quarter, half and all of the rows (a
  chunk runs the narrowest that holds the occupied rows, so a long tail of responses decodes
  without the finished rows' work)."""
  return tuple(sorted({-(-rows // parts) for parts in (4, 2, 1)}))


def prefill_widths(prefill_chunk: int) -> tuple[int, ...]:
  """The token widths a prefill call is compiled for: powers of two from 16, then the chunk."""
  widths = [w for w in (2**i for i in range(4, 31)) if w < prefill_chunk]
  return tuple(widths) + (prefill_chunk,)


def prefill_calls(admitted, shards: int, widths: tuple[int, ...]) -> Iterator[tuple]:
  """The prefill calls of one admission round: a prompt per shard per call, chunk by chunk.

  admitted: (shard, group, its rows) of each admitted group. Yields (items, start, parts, width):
  per shard the (group, rows) it prefills or None, the first position written, per shard the
  prompt tokens written, and the call's token width (of `widths`).
  """
  per_shard = [[(g, rows) for s, g, rows in admitted if s == shard] for shard in range(shards)]
  chunk = widths[-1]
  for wave in range(max(map(len, per_shard))):
    items = [queue[wave] if wave < len(queue) else None for queue in per_shard]
    longest = max(len(g.prompt) - 1 for g, _ in filter(None, items))
    for start in range(0, longest, chunk):
      parts = [[] if item is None else item[0].prompt[:-1][start:start + chunk]
               for item in items]
      yield items, start, parts, widths[bisect.bisect_left(widths, max(map(len, parts)))]


class Scheduler(abc.ABC):
  """The host side of one sample call: queue, rows, pages (module docstring).

  `rows` holds the decode rows' fields (`continuous.RowState`'s, as host arrays). Row g is row
  g % rows of batch shard g // rows; its pages come from that shard's allocator and its page
  table holds their local indices. A subclass prefills the groups `_admit` admits and runs a
  decode chunk of the rows `_chunk_rows` picks.
  """

  def __init__(self, groups: list[Group], shards: int, rows: int, pages: int, page_size: int,
               chunk_steps: int, pages_per_sequence: int):
    self.page_size, self.steps = page_size, chunk_steps
    self.pages_per_sequence = pages_per_sequence
    self.shard_rows, self.shards = rows, shards
    self.allocators = [page_pool.PageAllocator(pages) for _ in range(shards)]
    self.queue = collections.deque(groups)
    total = shards * rows
    self.rows = dict(token_R=np.zeros(total, np.int32), position_R=np.zeros(total, np.int32),
                     count_R=np.zeros(total, np.int32), limit_R=np.ones(total, np.int32),
                     sequence_R=np.zeros(total, np.int32), live_R=np.zeros(total, bool),
                     page_table_RxP=np.zeros((total, pages_per_sequence), np.int32))
    self.row_pages = [[] for _ in range(total)]  # Pages each row holds, in position order.
    self.row_group: list[Group | None] = [None] * total
    self.admitted: list[Group] = []  # Live groups, oldest first.
    self.decode_widths = decode_widths(rows)

  def run(self):
    """Schedules every group to the end: admit and prefill, reserve pages, decode a chunk,
    retire the stopped rows; again until the queue is empty and every row retired."""
    while self.queue or self.admitted:
      admitted = self._admit()
      if not self.admitted:
        raise self._pool_too_small(self.queue[0])
      if admitted:
        self._prefill(admitted)
      self._reserve_chunk_pages()
      index = self._chunk_rows()
      self._finish_chunk(index, self._decode_chunk(index))

  @abc.abstractmethod
  def _prefill(self, admitted: list[tuple[int, Group, list[int]]]):
    """Writes the prompts of the groups just admitted ((shard, group, its rows) each)."""

  @abc.abstractmethod
  def _decode_chunk(self, index: np.ndarray) -> dict[str, np.ndarray]:
    """Runs a chunk of up to `steps` decode steps of `rows[index]` (`_chunk_rows`); returns
    their fields after it (host arrays, in `index` order)."""

  def _pool_too_small(self, group: Group) -> MemoryError:
    return MemoryError(
        f"the page pool ({self.allocators[0].pages} pages of {self.page_size} slots per shard) "
        f"cannot hold the {len(group.sequences)} samples of one {len(group.prompt)}-token "
        "prompt; raise PoolConfig.pages or rollout.kv_cache_gib")

  def _shard_rows(self, shard: int) -> range:
    return range(shard * self.shard_rows, (shard + 1) * self.shard_rows)

  def _missing_pages(self) -> np.ndarray:
    """Per row, how many more pages it needs to hold every position its next chunk writes (0
    for a free row)."""
    rows = self.rows
    occupied_R = np.fromiter((g is not None for g in self.row_group), bool, len(self.row_group))
    steps_R = np.minimum(self.steps, rows["limit_R"] - rows["count_R"])
    needed_R = -(-(rows["position_R"] + steps_R) // self.page_size)
    held_R = np.fromiter(map(len, self.row_pages), np.int32, len(self.row_pages))
    return np.where(occupied_R, np.maximum(needed_R - held_R, 0), 0)

  def _missing_per_shard(self, missing_R: np.ndarray) -> np.ndarray:
    return missing_R.reshape(self.shards, self.shard_rows).sum(1)

  def _admit(self) -> list[tuple[int, Group, list[int]]]:
    """Admits queued groups, in order, while a shard has their rows and first chunk's pages free
    (after the pages its live rows' next chunk needs); returns (shard, group, its rows) each."""
    reserved = self._missing_per_shard(self._missing_pages())
    admitted = []
    while self.queue:
      group = self.queue[0]
      prefix = len(group.prompt) - 1
      shared = prefix // self.page_size
      own = -(-(prefix + min(self.steps, group.limit)) // self.page_size) - shared
      needed = shared + own * len(group.sequences)
      choices = []
      for shard, allocator in enumerate(self.allocators):
        free_rows = [r for r in self._shard_rows(shard) if self.row_group[r] is None]
        free_pages = allocator.free_pages - reserved[shard]
        if len(free_rows) >= len(group.sequences) and needed <= free_pages:
          choices.append((-len(free_rows), -free_pages, shard, free_rows))
      if not choices:
        break
      _, _, shard, free_rows = min(choices)
      self.queue.popleft()
      allocator = self.allocators[shard]
      shared_pages = allocator.allocate(shared)
      allocator.share(shared_pages * (len(group.sequences) - 1))
      for row, sequence in zip(free_rows, group.sequences):
        self.row_pages[row] = shared_pages + allocator.allocate(own)
        self.row_group[row] = group
        self._set_row(row, token=group.prompt[-1], position=prefix, count=0, limit=group.limit,
                      sequence=sequence, live=True)
      self.admitted.append(group)
      group.shard = shard
      admitted.append((shard, group, free_rows[:len(group.sequences)]))
    return admitted

  def _set_row(self, row, **values):
    for name, value in values.items():
      self.rows[f"{name}_R"][row] = value
    table = self.rows["page_table_RxP"]
    table[row] = page_pool.SCRATCH_PAGE
    table[row, :len(self.row_pages[row])] = self.row_pages[row]

  def _reserve_chunk_pages(self):
    """Gives every live row the pages its next chunk writes, putting a shard's newest groups back
    in the queue while its pool part is short."""
    while True:
      missing_R = self._missing_pages()
      missing = self._missing_per_shard(missing_R)
      short = [shard for shard in range(self.shards)
               if missing[shard] > self.allocators[shard].free_pages]
      if not short:
        break
      in_shard = [g for g in self.admitted if g.shard == short[0]]
      if len(in_shard) == 1:
        raise self._pool_too_small(in_shard[0])
      self._preempt(in_shard[-1])
    table = self.rows["page_table_RxP"]
    for shard, allocator in enumerate(self.allocators):
      pages = allocator.allocate(int(missing[shard]))  # The lowest first, handed out in row order.
      for row in self._shard_rows(shard):
        count = int(missing_R[row])
        if count:
          held = len(self.row_pages[row])
          self.row_pages[row] += pages[:count]
          table[row, held:held + count] = pages[:count]
          pages = pages[count:]

  def _preempt(self, group: Group):
    """Frees a group's rows and pages and queues its unfinished samples first."""
    self.admitted.remove(group)
    for row in range(len(self.row_group)):
      if self.row_group[row] is group:
        self._free_row(row)
    self.queue.appendleft(group)

  def _free_row(self, row: int):
    self.release_pages(row // self.shard_rows, self.row_pages[row])
    self.row_pages[row], self.row_group[row] = [], None
    self._set_row(row, live=False)

  def release_pages(self, shard: int, pages) -> list[int]:
    """Releases a row's hold on its pages of `shard`; returns the pages that became free."""
    return self.allocators[shard].release(pages)

  def _chunk_rows(self) -> np.ndarray:
    """The rows of the next decode chunk: each shard's occupied rows first in a block of the
    narrowest decode width that holds the fullest shard's (free rows, not live, fill the rest)."""
    occupied = [[r for r in self._shard_rows(shard) if self.row_group[r] is not None]
                for shard in range(self.shards)]
    width = min(w for w in self.decode_widths if w >= max(map(len, occupied)))
    index = []
    for shard, rows in enumerate(occupied):
      free = [r for r in self._shard_rows(shard) if self.row_group[r] is None]
      index += rows + free[:width - len(rows)]
    return np.asarray(index)

  def _finish_chunk(self, index: np.ndarray, fields: dict[str, np.ndarray]):
    """Takes a decode chunk's rows back and retires the rows whose sequence stopped."""
    for name, value in fields.items():
      self.rows[name][index] = value
    for row in index:
      group = self.row_group[row]
      if group is not None and not self.rows["live_R"][row]:
        group.sequences.remove(self.rows["sequence_R"][row])
        self._free_row(row)
        if not group.sequences:
          self.admitted.remove(group)


class Chunk(NamedTuple):
  """A decode chunk a `Simulation` ran: its width (rows per shard), the steps it ran, the steps
  its rows ran (summed), and the positions the busiest shard's rows attended over (summed over
  its steps; a row at position p attends over p + 1)."""
  width: int
  steps: int
  row_steps: int
  attended: int


class Simulation(Scheduler):
  """The scheduler over given response lengths, without a model: sequence s stops after
  `lengths[s]` tokens (at most its group's limit). Counts what the engine would run.

  Counts: admission rounds, groups admitted (again after each preemption) and preempted,
  prefill calls per token width, and each decode chunk (`Chunk`).
  """

  def __init__(self, lengths, groups: list[Group], shards: int, rows: int, pages: int,
               page_size: int, chunk_steps: int, pages_per_sequence: int, prefill_chunk: int):
    super().__init__(groups, shards, rows, pages, page_size, chunk_steps, pages_per_sequence)
    self.lengths = np.asarray(lengths, np.int64)
    self.prefill_widths = prefill_widths(prefill_chunk)
    self.rounds = self.admissions = self.preemptions = 0
    self.prefills = collections.Counter()  # Token width: calls.
    self.chunks: list[Chunk] = []

  def _prefill(self, admitted):
    self.rounds += 1
    self.admissions += len(admitted)
    for *_, width in prefill_calls(admitted, self.shards, self.prefill_widths):
      self.prefills[width] += 1

  def _preempt(self, group: Group):
    self.preemptions += 1
    super()._preempt(group)

  def _decode_chunk(self, index: np.ndarray) -> dict[str, np.ndarray]:
    fields = {name: value[index] for name, value in self.rows.items()}  # Copies.
    live_R = fields["live_R"]
    stop_R = np.minimum(self.lengths[fields["sequence_R"]], fields["limit_R"])
    steps_R = np.where(live_R, np.minimum(stop_R - fields["count_R"], self.steps), 0)
    attended_R = steps_R * (fields["position_R"] + 1) + steps_R * (steps_R - 1) // 2
    width = len(index) // self.shards
    self.chunks.append(Chunk(width=width, steps=int(steps_R.max()), row_steps=int(steps_R.sum()),
                             attended=int(attended_R.reshape(self.shards, width).sum(1).max())))
    fields["count_R"] += steps_R
    fields["position_R"] += steps_R
    fields["live_R"] = live_R & (fields["count_R"] < stop_R)
    return fields

