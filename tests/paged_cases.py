"""Random page-pool attention inputs shared by the paged attention tests (XLA and TPU)."""

import numpy as np


def random_paged_case(rows=3, length=2, kv_lens=(5, 17, 9), page_size=4, pages=24, kv_heads=2,
                      heads=4, head_dim=8, seed=0):
  """(q, pool pages, page tables, kv_lens, positions, dense keys, dense values): each row's keys
  and values scattered over random pages; the slots past kv_lens hold NaN."""
  rng = np.random.default_rng(seed)
  per_row = -(-max(kv_lens) // page_size)
  kv_pages = np.full((pages, page_size, 2 * kv_heads, head_dim), np.nan, np.float32)
  order = rng.permutation(np.arange(1, pages))
  table = np.zeros((rows, per_row), np.int32)
  keys = rng.normal(size=(rows, per_row * page_size, kv_heads, head_dim)).astype(np.float32)
  values = rng.normal(size=keys.shape).astype(np.float32)
  for row, kv_len in enumerate(kv_lens):
    table[row] = order[row * per_row:(row + 1) * per_row]
    for position in range(kv_len):
      page, slot = table[row, position // page_size], position % page_size
      kv_pages[page, slot, 0::2] = keys[row, position]
      kv_pages[page, slot, 1::2] = values[row, position]
  kv_lens = np.asarray(kv_lens, np.int32)
  positions = kv_lens[:, None] - length + np.arange(length)
  q = rng.normal(size=(rows, length, heads, head_dim)).astype(np.float32)
  return q, kv_pages, table, kv_lens, positions, keys, values
