"""Attention over a page-pool KV cache as an XLA gather over page tables (the reference, and the
GPU path); `prerl_jax.kernels.tpu.paged_attention` computes the same on TPU."""

import jax
import jax.numpy as jnp


def gather_attention(q_NxTxNHxH, kv_pages, page_table_NxP, kv_lens_N, positions_NxT):
  """Causal grouped-query attention of T new tokens per row over the row's pages.

  Args:
    q_NxTxNHxH: rotated queries.
    kv_pages: pages [pages, page_size, 2K, H] in the pool's layout (`page_pool`).
    page_table_NxP: each row's pages, in position order.
    kv_lens_N: how many positions of each row hold keys and values (>= 1); slots at or past it
      are never read, whatever they hold.
    positions_NxT: the queries' positions; a query attends to the positions at or before its own.
  """
  rows, length, num_heads, head_dim = q_NxTxNHxH.shape
  num_kv = kv_pages.shape[2] // 2
  kv_NxSx2KxH = kv_pages[page_table_NxP].reshape(rows, -1, 2 * num_kv, head_dim)
  slots_S = jnp.arange(kv_NxSx2KxH.shape[1])
  filled_NxS = slots_S < kv_lens_N[:, None]
  keys_NxSxKxH = kv_NxSx2KxH[:, :, 0::2]
  values_NxSxKxH = jnp.where(filled_NxS[:, :, None, None], kv_NxSx2KxH[:, :, 1::2], 0)
  q = q_NxTxNHxH.reshape(rows, length, num_kv, num_heads // num_kv, head_dim)
  scores = jnp.einsum("ntkgh,nskh->nkgts", q, keys_NxSxKxH, preferred_element_type=jnp.float32)
  allowed_NxTxS = filled_NxS[:, None, :] & (slots_S <= positions_NxT[:, :, None])
  scores = jnp.where(allowed_NxTxS[:, None, None], scores * head_dim**-0.5, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(values_NxSxKxH.dtype)
  out = jnp.einsum("nkgts,nskh->ntkgh", probs, values_NxSxKxH,
                   preferred_element_type=jnp.float32)
  return out.astype(q_NxTxNHxH.dtype).reshape(rows, length, num_heads, head_dim)
