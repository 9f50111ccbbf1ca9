"""Every padding and bucket rule: left-padded prompts, right-padded responses, widths by bucket.

Prompts are left-padded (their last token sits in the last column, next to the response);
responses are right-padded. Widths come from buckets so a run compiles few programs.
"""

from typing import Sequence

import numpy as np


def left_mask(lengths_B, width: int) -> np.ndarray:
  """(B, width) bool: the last `length` columns of each row."""
  return np.arange(width)[None] >= width - np.asarray(lengths_B)[:, None]


def right_mask(lengths_B, width: int) -> np.ndarray:
  """(B, width) bool: the first `length` columns of each row."""
  return np.arange(width)[None] < np.asarray(lengths_B)[:, None]


def _width(rows: Sequence[Sequence[int]], width: int | None) -> int:
  longest = max((len(r) for r in rows), default=0)
  if width is None:
    return longest
  if longest > width:
    raise ValueError(f"a row of {longest} tokens does not fit the padded width {width}")
  return width


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None):
  """(tokens_BxW int32, mask_BxW bool): token lists left-padded to `width` (default: longest)."""
  width = _width(rows, width)
  tokens = np.full((len(rows), width), pad_id, np.int32)
  for i, row in enumerate(rows):
    if len(row):
      tokens[i, width - len(row):] = row
  return tokens, left_mask([len(r) for r in rows], width)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None):
  """(tokens_BxW int32, mask_BxW bool): token lists right-padded to `width` (default: longest)."""
  width = _width(rows, width)
  tokens = np.full((len(rows), width), pad_id, np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  return tokens, right_mask([len(r) for r in rows], width)


PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)  # The sampler's default prompt widths.


def bucket(length: int, buckets: Sequence[int], what: str = "bucket", key: str = "") -> int:
  """The smallest of the ascending `buckets` that holds `length`; errors name `what` and `key`."""
  for size in buckets:
    if length <= size:
      return size
  raise ValueError(f"{length} tokens is longer than the largest {what} {buckets[-1]}"
                   + (f" ({key})" if key else ""))


def doubling_bucket(length: int, cap: int, smallest: int = 32) -> int:
  """`length` rounded up to smallest * 2**i, capped at `cap`: log2(cap / smallest) + 1 widths."""
  width = smallest
  while width < length:
    width *= 2
  return min(width, cap)
