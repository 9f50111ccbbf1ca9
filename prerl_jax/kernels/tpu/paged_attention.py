"""Paged decode attention on TPU: jax's ragged paged attention Pallas kernel behind the
signature of `prerl_jax.generate.paged_attention.gather_attention`. It sees one device's rows,
pages and kv heads: under a mesh, `paged_forward` runs it per shard in `shard_map` (Mosaic
kernels must run there)."""


import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as ragged

# Tokens of keys and values per kernel block, and queries per block: fixed here because the
# kernel's own tuning table reads the local device, which is not a TPU when compiling ahead of
# time on a CPU host.
KV_TOKENS_PER_BLOCK = 256
QUERIES_PER_BLOCK = 8


def _ragged_arguments(q_NxTxNHxH, kv_lens_N, positions_NxT):
  """(queries [tokens, NH, H], cu_q_lens, num_seqs) of one new token per row, or of one row's
  T new tokens (the prefill chunk: the row's valid tokens come first)."""
  rows, length, num_heads, head_dim = q_NxTxNHxH.shape
  if length == 1:
    return (q_NxTxNHxH.reshape(rows, num_heads, head_dim), jnp.arange(rows + 1, dtype=jnp.int32),
            jnp.array([rows], jnp.int32))
  if rows != 1:
    raise ValueError(f"the TPU paged attention takes one token per row or one row of tokens, "
                     f"got {rows} rows of {length} tokens")
  valid = kv_lens_N[0] - positions_NxT[0, 0]
  return q_NxTxNHxH[0], jnp.stack([jnp.int32(0), valid]).astype(jnp.int32), jnp.array(
      [1], jnp.int32)


def ragged_attention(q_NxTxNHxH, kv_pages, page_table_NxP, kv_lens_N, positions_NxT):
  """`gather_attention`'s computation in the Pallas TPU kernel (one device's share)."""
  queries, cu_q_lens, num_seqs = _ragged_arguments(q_NxTxNHxH, kv_lens_N, positions_NxT)
  page_size, head_dim = kv_pages.shape[1], kv_pages.shape[3]
  out = ragged.ragged_paged_attention(
      queries, kv_pages, kv_lens_N.astype(jnp.int32), page_table_NxP.astype(jnp.int32),
      cu_q_lens, num_seqs, sm_scale=head_dim**-0.5,
      num_kv_pages_per_block=max(1, min(page_table_NxP.shape[1],
                                        KV_TOKENS_PER_BLOCK // page_size)),
      num_queries_per_block=QUERIES_PER_BLOCK)
  return out.reshape(q_NxTxNHxH.shape)
