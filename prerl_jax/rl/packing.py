"""Sequence packing for the update: the one place that decides the row layout of a RolloutBatch.

Each response becomes one segment per scored space: `[prompt][response]` in the conditional
space, `[BOS][response]` in the marginal space (the last response token is not fed: it predicts
nothing). Responses are spread over `micro_batches` micro-batches by tokens (the longest first,
each to the micro-batch with the fewest tokens so far), then, in each space separately, packed
first-fit-decreasing into rows of `row_tokens` tokens: a marginal segment is its response and
one BOS, so the marginal rows are fewer and shorter than the conditional rows of the same
micro-batch (a both-space update pays for each space's own tokens).

Rows carry per-token segment ids (1, 2, ... within a row; 0 is padding; attention is causal
within a segment) and positions that restart at 0 in each segment, as the padded layout counts
them. The response tokens of a micro-batch are listed once, flat (`token_*`, N of them): the
scorer gathers the hidden state that predicts each one, so the vocabulary projection runs on real
response tokens only, and scatters the log-probs back to per-response slots (S slots of R
columns), where the objective reads them exactly as it reads a RolloutBatch's rows.
"""

import flax.struct
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from prerl_jax import sharding
from prerl_jax.data import padding
from prerl_jax.rl.batch import RolloutBatch
from prerl_jax.rl.objective import CONDITIONAL, MARGINAL


@flax.struct.dataclass
class PackedRows:
  """One space's rows; the leading M (micro-batch) axis is present in a PackedBatch.

  tokens, positions, segment_ids  (M, K, L) int32: K rows of L tokens per micro-batch
  token_row, predict_col          (M, N) int32: the row and column whose hidden state predicts
                                  response token n
  """

  tokens: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  token_row: jax.Array
  predict_col: jax.Array


@flax.struct.dataclass
class PackedBatch:
  """A RolloutBatch laid out in packed rows, split into M micro-batches (the leading axis).

  rewards          (B,) float32, the batch's rows in their original (group) order
  index            (M, S) int32: the batch row in each response slot (0 for an empty slot)
  response_mask    (M, S, R) bool (all False for an empty slot)
  sampler_logp     (M, S, R) float32
  old_logp         {space: (M, S, R) float32} or None
  prompt_lengths   (M, S) int32 (0 for an empty slot)
  token_slot       (M, N) int32: its slot (S for a padding entry, dropped on scatter)
  token_offset     (M, N) int32: its column in the slot
  token_target     (M, N) int32: its token id
  spaces           {space: PackedRows}
  """

  rewards: jax.Array
  index: jax.Array
  response_mask: jax.Array
  sampler_logp: jax.Array
  old_logp: dict | None
  prompt_lengths: jax.Array
  token_slot: jax.Array
  token_offset: jax.Array
  token_target: jax.Array
  spaces: dict


def _assign_micro_batches(lengths_B, micro_batches: int) -> list[list[int]]:
  """Rows of each micro-batch: the longest first, each to the micro-batch with fewest tokens."""
  loads, members = np.zeros(micro_batches, np.int64), [[] for _ in range(micro_batches)]
  for row in np.argsort(-lengths_B, kind="stable"):
    target = int(np.argmin(loads))
    loads[target] += lengths_B[row]
    members[target].append(int(row))
  return members


def _first_fit(rows: list[int], lengths_B, row_tokens: int) -> list[list[int]]:
  """Batch rows packed first-fit-decreasing into rows of row_tokens tokens."""
  packed, free = [], []
  for row in sorted(rows, key=lambda r: -lengths_B[r]):
    target = next((i for i, left in enumerate(free) if left >= lengths_B[row]), None)
    if target is None:
      packed.append([])
      free.append(row_tokens)
      target = len(packed) - 1
    packed[target].append(row)
    free[target] -= lengths_B[row]
  return packed


def _bucket(count: int, multiple: int) -> int:
  """count rounded up to multiple * 2**i (few distinct shapes, so few compiled programs)."""
  return padding.doubling_bucket(max(count, 1), cap=np.iinfo(np.int32).max, smallest=multiple)


def pack(batch: RolloutBatch, spaces, *, micro_batches: int = 1, row_tokens: int = 0,
         bos_id: int | None = None, multiple_of: int = 1) -> PackedBatch:
  """The packed layout of a host RolloutBatch for scoring `spaces` (numpy arrays).

  row_tokens: tokens per row; 0 (or anything shorter than a space's longest segment) takes that
    space's longest segment rounded up to 32 * 2**i. multiple_of: rows and slots per micro-batch
    are multiple_of * 2**i (pass the number of batch devices under a mesh). bos_id: the marginal
    BOS, required when the marginal space is packed. Responses of length 0 score nothing and take
    no slot.
  """
  spaces = tuple(spaces)
  for space in spaces:
    if space not in (CONDITIONAL, MARGINAL):
      raise ValueError(f"pack: unknown space {space!r}; spaces are {CONDITIONAL!r}, {MARGINAL!r}")
  if MARGINAL in spaces and bos_id is None:
    raise ValueError("pack: the marginal space needs bos_id= (its segments start with the BOS)")
  if micro_batches < 1:
    raise ValueError(f"pack: micro_batches={micro_batches} must be >= 1")
  prompt_tokens = np.asarray(batch.prompt_tokens)
  prompt_mask = np.asarray(batch.prompt_mask, bool)
  response_tokens = np.asarray(batch.response_tokens)
  response_mask = np.asarray(batch.response_mask, bool)
  prompt_len_B = prompt_mask.sum(axis=1)
  response_len_B = response_mask.sum(axis=1)
  context_len = {CONDITIONAL: prompt_len_B, MARGINAL: np.ones_like(prompt_len_B)}
  fed_len = {s: context_len[s] + np.maximum(response_len_B - 1, 0) for s in spaces}
  live = np.flatnonzero(response_len_B > 0)

  longest_B = np.max([fed_len[s] for s in spaces], axis=0)
  members = _assign_micro_batches(longest_B[live], micro_batches)
  members = [[int(live[i]) for i in group] for group in members]
  num_slots = _bucket(max(len(g) for g in members), multiple_of)
  num_tokens = _bucket(max(int(response_len_B[g].sum()) for g in members),
                       int(np.lcm(32, multiple_of)))
  # Per space: its row width and, per micro-batch, its rows (lists of batch rows).
  layout = {}
  for s in spaces:
    longest = int(fed_len[s][live].max(initial=1))
    width = row_tokens if row_tokens >= longest else padding.doubling_bucket(
        longest, cap=np.iinfo(np.int32).max)
    layout[s] = (width, [_first_fit(group, fed_len[s], width) for group in members])
  response_width = response_tokens.shape[1]

  def zeros(*shape, dtype=np.int32):
    return np.zeros((micro_batches, *shape), dtype)

  out = {"index": zeros(num_slots), "response_mask": zeros(num_slots, response_width, dtype=bool),
         "sampler_logp": zeros(num_slots, response_width, dtype=np.float32),
         "prompt_lengths": zeros(num_slots),
         "token_slot": np.full((micro_batches, num_tokens), num_slots, np.int32),
         "token_offset": zeros(num_tokens), "token_target": zeros(num_tokens)}
  old_logp = None if batch.old_logp is None else {
      s: zeros(num_slots, response_width, dtype=np.float32) for s in batch.old_logp}
  first_token = np.zeros(len(response_len_B), np.int64)  # Of each batch row, in its micro-batch.
  for m, group in enumerate(members):
    token = 0
    for slot, b in enumerate(group):
      r = int(response_len_B[b])
      out["index"][m, slot] = b
      out["response_mask"][m, slot] = response_mask[b]
      out["sampler_logp"][m, slot] = batch.sampler_logp[b]
      out["prompt_lengths"][m, slot] = prompt_len_B[b]
      if old_logp is not None:
        for s in old_logp:
          old_logp[s][m, slot] = batch.old_logp[s][b]
      tokens = slice(token, token + r)
      out["token_slot"][m, tokens] = slot
      out["token_offset"][m, tokens] = np.arange(r)
      out["token_target"][m, tokens] = response_tokens[b, :r]
      first_token[b] = token
      token += r

  packed_spaces = {}
  for s, (width, rows_of) in layout.items():
    num_rows = _bucket(max(len(rows) for rows in rows_of), multiple_of)
    arrays = {"tokens": zeros(num_rows, width), "positions": zeros(num_rows, width),
              "segment_ids": zeros(num_rows, width), "token_row": zeros(num_tokens),
              "predict_col": zeros(num_tokens)}
    for m, packed_rows in enumerate(rows_of):
      for k, row_members in enumerate(packed_rows):
        start = 0
        for segment, b in enumerate(row_members, start=1):
          r = int(response_len_B[b])
          context = (prompt_tokens[b][prompt_mask[b]] if s == CONDITIONAL
                     else np.array([bos_id], np.int32))
          fed = np.concatenate([context, response_tokens[b, :r - 1]])
          columns = slice(start, start + len(fed))
          arrays["tokens"][m, k, columns] = fed
          arrays["positions"][m, k, columns] = np.arange(len(fed))
          arrays["segment_ids"][m, k, columns] = segment
          tokens = slice(first_token[b], first_token[b] + r)
          arrays["token_row"][m, tokens] = k
          arrays["predict_col"][m, tokens] = start + len(context) - 1 + np.arange(r)
          start += len(fed)
    packed_spaces[s] = PackedRows(**arrays)
  return PackedBatch(rewards=np.asarray(batch.rewards, np.float32), old_logp=old_logp,
                     spaces=packed_spaces, **out)


def shard(packed: PackedBatch, mesh) -> PackedBatch:
  """Places a host PackedBatch on a mesh: rows, slots and tokens (axis 1) over the batch axes,
  rewards replicated (every process passes the same global arrays)."""
  batch_axes = sharding.batch_sharding(mesh, 1).spec[0]

  def place(x):
    x = np.asarray(x)
    spec = PartitionSpec(None, batch_axes) if x.ndim >= 2 else PartitionSpec()
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec),
                                        lambda index: x[index])
  return jax.tree.map(place, packed)
