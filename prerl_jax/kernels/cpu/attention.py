"""The CPU decode-attention kernel (decode_attention_cpu.cc) as an FFI call.

`write_and_attend(q, k, v, rotation, offset, blocks)` has the signature and the results of
`decode.write_and_attend` (float32 only) and runs as one XLA:CPU custom call per layer, which
also rotates the queries and keys and writes the new token into the last block in place. On
SmolLM2-135M at 64 rows the first version cut a 256-token decode step from 0.23 to 0.19 s, and
the tuned one from 0.22-0.25 to 0.20-0.21 s, in interleaved A/Bs (README, Performance).

The kernel is built and registered by `prerl_jax.kernels.cpu.library`, with the packed-weight matmul.
"""

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "prerl_decode_attention"  # Registered by prerl_jax.kernels.cpu.library.


def write_and_attend(q_NxTxNHxH, k_NxTxKxH, v_NxTxKxH, rotation, offset, blocks,
                     suffix: str = ""):
  """`decode.write_and_attend` as one FFI call (float32 queries, keys and values); `suffix` picks
  a library registered under other names (`library.register`).

  The last block's keys and values are results aliased to their operands, so inside the decode
  loop the new token is written in place."""
  rows, length, num_heads, head_dim = q_NxTxNHxH.shape
  num_kv = blocks[0][0].shape[1]
  q_NxKxGxH = q_NxTxNHxH.reshape(rows, num_kv, num_heads // num_kv, head_dim)
  new_k_NxKxH = k_NxTxKxH.reshape(rows, num_kv, head_dim)
  new_v_NxKxH = v_NxTxKxH.reshape(rows, num_kv, head_dim)
  cos_NxH2, sin_NxH2 = (x.reshape(rows, head_dim // 2) for x in rotation)
  new_token = [q_NxKxGxH, new_k_NxKxH, new_v_NxKxH, cos_NxH2, sin_NxH2]
  block_arrays = [x for block in blocks for x in block]
  for x in new_token + block_arrays:
    if x.dtype not in (jnp.float32, jnp.bool_):
      raise TypeError(f"the CPU decode-attention kernel takes float32 and bool arrays, got "
                      f"{x.dtype}; use Sampler(kernels='xla') for {x.dtype} caches")
  last_k, last_v, last_mask = blocks[-1]
  last_keys_index = len(new_token) + 1 + len(block_arrays) - 3  # Operand index (after offset).
  out, last_k, last_v = jax.ffi.ffi_call(
      TARGET + suffix, (jax.ShapeDtypeStruct(q_NxKxGxH.shape, jnp.float32),
               jax.ShapeDtypeStruct(last_k.shape, jnp.float32),
               jax.ShapeDtypeStruct(last_v.shape, jnp.float32)),
      input_output_aliases={last_keys_index: 1, last_keys_index + 1: 2},
  )(*new_token, jnp.asarray(offset, jnp.int32), *block_arrays, scale=np.float32(head_dim**-0.5))
  return (out.reshape(rows, length, num_heads, head_dim),
          blocks[:-1] + [(last_k, last_v, last_mask)])
