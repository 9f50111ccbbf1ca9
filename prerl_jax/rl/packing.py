"""Sequence packing for the update: the one place that decides the row layout of a RolloutBatch.

Each response becomes one segment per scored space: `[prompt][response]` in the conditional
space, `[BOS][response]` in the marginal space (the last response token is not fed: it predicts
nothing). Responses are spread over `micro_batches` micro-batches by tokens (the longest first,
each to the micro-batch with the fewest tokens so far), then, in each space separately, packed
first-fit-decreasing into rows of `row_tokens` tokens: a marginal segment is its response and
one BOS, so the marginal rows are fewer and shorter than the conditional rows of the same
micro-batch (a both-space update pays for each space's own tokens).

With `share_prompts`, the responses of one prompt go to the same micro-batch and, in the
conditional space, share one copy of the prompt: a segment is `[prompt][response 1][response
2]...`, each response fed at the positions that follow the prompt, and per-token branch ids (0 for
the prompt, j for the j-th response) keep each response from seeing the others (verl's prefix
grouper). A group of G responses then costs its prompt once instead of G times; the log-probs
are those of the unshared layout (up to float rounding). When there are fewer prompts than
micro-batches, each prompt's responses are cut into as many groups as it takes to fill them.

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

# With shared prompts and no row_tokens, rows grow to hold a whole prompt group up to this many
# tokens (then the group is split into segments of one prompt copy each).
SHARED_ROW_TOKENS = 2048


@flax.struct.dataclass
class PackedRows:
  """One space's rows; the leading M (micro-batch) axis is present in a PackedBatch.

  tokens, positions, segment_ids  (M, K, L) int32: K rows of L tokens per micro-batch
  token_row, predict_col          (M, N) int32: the row and column whose hidden state predicts
                                  response token n
  branch_ids                      (M, K, L) int32 where the space shares prompts (0 for a
                                  prompt, j for the j-th response of its segment), else None
  """

  tokens: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  token_row: jax.Array
  predict_col: jax.Array
  branch_ids: jax.Array | None = None


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


def _assign_micro_batches(units: list[list[int]], costs,
                          micro_batches: int) -> list[list[list[int]]]:
  """Units (lists of batch rows) of each micro-batch: the costliest first, each to the
  micro-batch with the least cost so far."""
  loads, members = np.zeros(micro_batches, np.int64), [[] for _ in range(micro_batches)]
  for unit in np.argsort(-np.asarray(costs), kind="stable"):
    target = int(np.argmin(loads))
    loads[target] += costs[unit]
    members[target].append(units[unit])
  return members


def _first_fit(items: list, lengths, capacity: int) -> list[list]:
  """Items packed first-fit-decreasing by `lengths[item]` into bins of `capacity`."""
  packed, free = [], []
  for item in sorted(items, key=lambda i: -lengths[i]):
    target = next((i for i, left in enumerate(free) if left >= lengths[item]), None)
    if target is None:
      packed.append([])
      free.append(capacity)
      target = len(packed) - 1
    packed[target].append(item)
    free[target] -= lengths[item]
  return packed


def _bucket(count: int, multiple: int) -> int:
  """count rounded up to multiple * 2**i (few distinct shapes, so few compiled programs)."""
  return padding.doubling_bucket(max(count, 1), cap=np.iinfo(np.int32).max, smallest=multiple)


def _prompt_groups(prompt_tokens, prompt_mask, rows: list[int],
                   micro_batches: int) -> list[list[int]]:
  """`rows` grouped by identical prompts (first-seen order); with fewer groups than
  micro-batches, each group is cut into as many units of nearly equal size as fill them."""
  groups = {}
  for b in rows:
    groups.setdefault(prompt_tokens[b][prompt_mask[b]].tobytes(), []).append(b)
  pieces = -(-micro_batches // max(len(groups), 1))
  return [unit for group in groups.values()
          for unit in (group[i::pieces] for i in range(min(pieces, len(group))))]


def pack(batch: RolloutBatch, spaces, *, micro_batches: int = 1, row_tokens: int = 0,
         bos_id: int | None = None, multiple_of: int = 1,
         share_prompts: bool = False) -> PackedBatch:
  """The packed layout of a host RolloutBatch for scoring `spaces` (numpy arrays).

  row_tokens: tokens per row; 0 (or anything shorter than a space's longest segment) takes that
    space's longest segment rounded up to 32 * 2**i. multiple_of: rows and slots per micro-batch
    are multiple_of * 2**i (pass the number of batch devices under a mesh). bos_id: the marginal
    BOS, required when the marginal space is packed. Responses of length 0 score nothing and take
    no slot.
  share_prompts: in the conditional space, the responses of one prompt (rows with identical
    prompts) share one copy of it (module docstring); needs an attention backend that takes
    branch ids (`prerl_jax.models.attention.supports_branches`).
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
  live = [int(b) for b in np.flatnonzero(response_len_B > 0)]
  shared = {s: share_prompts and s == CONDITIONAL for s in spaces}

  if any(shared.values()):
    units = _prompt_groups(prompt_tokens, prompt_mask, live, micro_batches)
  else:
    units = [[b] for b in live]

  def unit_cost(unit, s):
    if shared[s]:
      return int(context_len[s][unit[0]] + sum(fed_len[s][b] - context_len[s][b] for b in unit))
    return int(sum(fed_len[s][b] for b in unit))

  costs = [max(unit_cost(unit, s) for s in spaces) for unit in units]
  unit_members = _assign_micro_batches(units, costs, micro_batches)
  members = [[b for unit in group for b in unit] for group in unit_members]
  num_slots = _bucket(max(len(g) for g in members), multiple_of)
  num_tokens = _bucket(max(int(response_len_B[g].sum()) for g in members),
                       int(np.lcm(32, multiple_of)))
  # Per space: its row width and, per micro-batch, its rows: lists of segments, each a list of
  # batch rows that share the segment's context (one row unless the space shares prompts).
  layout = {}
  for s in spaces:
    longest = int(max((fed_len[s][b] for b in live), default=1))
    if shared[s] and row_tokens < longest:
      longest_unit = max((unit_cost(unit, s) for unit in units), default=1)
      longest = max(longest, min(longest_unit, SHARED_ROW_TOKENS))
    width = row_tokens if row_tokens >= longest else padding.doubling_bucket(
        longest, cap=np.iinfo(np.int32).max)
    rows_of = []
    for group in unit_members:
      if shared[s]:  # Each unit's responses, first-fit into segments of one prompt each.
        segments = [tuple(seg) for unit in group for seg in _first_fit(
            unit, fed_len[s] - context_len[s], width - int(context_len[s][unit[0]]))]
      else:
        segments = [(b,) for unit in group for b in unit]
      seg_len = {seg: unit_cost(list(seg), s) for seg in segments}
      rows_of.append(_first_fit(segments, seg_len, width))
    layout[s] = (width, rows_of)
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
    branches = zeros(num_rows, width) if shared[s] else None
    for m, packed_rows in enumerate(rows_of):
      for k, row_segments in enumerate(packed_rows):
        start = 0
        for segment, seg in enumerate(row_segments, start=1):
          context = (prompt_tokens[seg[0]][prompt_mask[seg[0]]] if s == CONDITIONAL
                     else np.array([bos_id], np.int32))
          end = start + len(context)
          arrays["tokens"][m, k, start:end] = context
          arrays["positions"][m, k, start:end] = np.arange(len(context))
          arrays["segment_ids"][m, k, start:end] = segment
          for branch, b in enumerate(seg, start=1):
            r = int(response_len_B[b])
            columns = slice(end, end + r - 1)
            arrays["tokens"][m, k, columns] = response_tokens[b, :r - 1]
            arrays["positions"][m, k, columns] = len(context) + np.arange(r - 1)
            arrays["segment_ids"][m, k, columns] = segment
            if branches is not None:
              branches[m, k, columns] = branch
            tokens = slice(first_token[b], first_token[b] + r)
            arrays["token_row"][m, tokens] = k
            # Token 0 is predicted by the context's last token, token t by fed token t - 1.
            arrays["predict_col"][m, tokens] = np.concatenate([[start + len(context) - 1],
                                                               end + np.arange(r - 1)])
            end += r - 1
          start = end
    packed_spaces[s] = PackedRows(**arrays, branch_ids=branches)
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
