"""The CPU paged decode-attention kernel (paged_attention_cpu.cc) as an FFI call.

`write_and_attend` computes, for one new token per row and one layer of a page pool
(`prerl_jax.generate.page_pool`), what `page_pool.write_tokens` then
`paged_attention.gather_attention` compute after rotating the queries and keys: it rotates them
itself, writes the live rows' keys and values into their pages in place, and attends over each
live row's filled slots only (float32 only). Built and registered by
`prerl_jax.kernels.cpu.library`.
"""

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "prerl_paged_attention"  # Registered by prerl_jax.kernels.cpu.library.


def write_and_attend(q_NxTxNHxH, k_NxTxKxH, v_NxTxKxH, rotation, kv_pages, layer: int,
                     page_table_NxP, positions_N, live_N, suffix: str = ""):
  """(attended like q, the pool with the live rows' new keys and values written), T == 1.

  Args:
    q_NxTxNHxH, k_NxTxKxH, v_NxTxKxH: the new token's queries, keys and values, not rotated.
    rotation: `rope.rotation` of the new tokens' positions.
    kv_pages: the whole pool [layers, pages, page_size, 2K, H]; the result aliases it, so inside
      a jitted loop the write is in place.
    layer: which layer of the pool this call reads and writes.
    page_table_NxP, positions_N: each row's pages and its new token's position; the token is
      written at that position and attends to positions 0 .. position.
    live_N: rows that decode; the others write nothing and attend to nothing (zeros).
    suffix: picks a library registered under other names (`library.register`).
  """
  rows, length, num_heads, head_dim = q_NxTxNHxH.shape
  num_kv = kv_pages.shape[3] // 2
  if length != 1:
    raise ValueError(f"the CPU paged-attention kernel decodes one token per row, got {length}")
  q_NxKxGxH = q_NxTxNHxH.reshape(rows, num_kv, num_heads // num_kv, head_dim)
  new_k_NxKxH = k_NxTxKxH.reshape(rows, num_kv, head_dim)
  new_v_NxKxH = v_NxTxKxH.reshape(rows, num_kv, head_dim)
  cos_NxH2, sin_NxH2 = (x.reshape(rows, head_dim // 2) for x in rotation)
  for x in (q_NxKxGxH, new_k_NxKxH, new_v_NxKxH, cos_NxH2, sin_NxH2, kv_pages):
    if x.dtype != jnp.float32:
      raise TypeError(f"the CPU paged-attention kernel takes float32 arrays, got {x.dtype}; use "
                      f"ContinuousSampler(kernels='xla') for {x.dtype} pools")
  operands = (q_NxKxGxH, new_k_NxKxH, new_v_NxKxH, cos_NxH2, sin_NxH2,
              jnp.asarray(page_table_NxP, jnp.int32), jnp.asarray(positions_N, jnp.int32),
              jnp.asarray(live_N, bool), kv_pages)
  out, kv_pages = jax.ffi.ffi_call(
      TARGET + suffix, (jax.ShapeDtypeStruct(q_NxKxGxH.shape, jnp.float32),
                        jax.ShapeDtypeStruct(kv_pages.shape, jnp.float32)),
      input_output_aliases={len(operands) - 1: 1},
  )(*operands, layer=np.int64(layer), scale=np.float32(head_dim**-0.5))
  return out.reshape(rows, length, num_heads, head_dim), kv_pages
