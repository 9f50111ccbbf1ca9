"""Prompt batches on grain: deterministic shuffle per epoch, per-process shards, resumable state.

Every process computes the same global order (shuffled with `seed`, reshuffled each epoch) and
takes its own contiguous slice of each global batch, so a step's global batch does not depend on
the number of processes. An epoch drops its last partial batch. The iterator's state is a small
JSON-serialisable dict (`get_state()` / `set_state()`): store it with the checkpoint and a resumed
run continues the same order.
"""

from typing import Any, Callable

import grain
import jax
import numpy as np

from prerl_jax.data import datasets, padding
from prerl_jax.data import prompts


def collate(problems: list[datasets.Problem], encoded: list[prompts.EncodedPrompt], pad_id: int,
            width: int) -> dict[str, Any]:
  """A batch: left-padded prompt ids [B, width], lengths, truncation flags and the problems."""
  ids_BxL, _ = padding.left_pad([p.ids for p in encoded], pad_id, width)
  return {
      "prompt_ids": ids_BxL,
      "prompt_lengths": np.array([len(p.ids) for p in encoded], np.int32),
      "prompt_truncated": np.array([p.truncated for p in encoded], bool),
      "problems": problems,
  }


def prompt_batches(problems: list[datasets.Problem],
                   encode: Callable[[datasets.Problem], prompts.EncodedPrompt], *,
                   global_batch_size: int, num_epochs: int, seed: int, pad_id: int,
                   max_prompt_tokens: int, shuffle: bool = True,
                   process_index: int | None = None,
                   process_count: int | None = None) -> grain.MapDataset:
  """This process's prompt batches for num_epochs epochs, one element per training step.

  Each element is `collate`'s dict with global_batch_size / process_count rows, padded to
  max_prompt_tokens (a fixed shape, the same on every process).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                     f"process_count {process_count}")
  steps_per_epoch = len(problems) // global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(problems)} problems do not fill one batch of {global_batch_size}")
  local_batch_size = global_batch_size // process_count
  rows = grain.MapDataset.source(problems)
  if shuffle:
    rows = rows.seed(seed).shuffle()  # Index epoch * len + i reads epoch `epoch`'s permutation.

  def batch_of_step(step: int) -> dict[str, Any]:
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    start = (epoch * len(problems) + step_in_epoch * global_batch_size
             + process_index * local_batch_size)
    batch_problems = [rows[i] for i in range(start, start + local_batch_size)]
    return collate(batch_problems, [encode(p) for p in batch_problems], pad_id, max_prompt_tokens)

  return grain.MapDataset.range(num_epochs * steps_per_epoch).map(batch_of_step)


def resumable_iterator(batches: grain.MapDataset) -> grain.DatasetIterator:
  """An iterator over batches with get_state() / set_state(); the next batch is prepared ahead."""
  read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
  return iter(batches.to_iter_dataset(read_options))
