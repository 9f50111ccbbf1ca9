"""cuDNN fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`) for
`model.attention=cudnn`.

jax 0.10.2's public API takes padding as per-row lengths (valid tokens first), which cannot say
left padding or packed segments, so the segment rule goes in as a boolean mask [B, 1, T, T]
(cuDNN turns it into an additive bias) with the causal mask computed by the kernel. cuDNN runs
only bfloat16 / float16 inputs; `unsupported_reason` says when the caller must fall back.
cuDNN's flash attention with a mask takes only sequence lengths that are multiples of 64, so the
inputs are padded at the end to one (causal attention never lets a real query see those keys) and
the padded rows are dropped.
"""

import jax
import jax.numpy as jnp

DTYPES = (jnp.bfloat16, jnp.float16)
LENGTH_MULTIPLE = 64  # cuDNN flash attention's sequence-length granularity with a mask.


def unsupported_reason(q_BxTxNxH) -> str | None:
  """Why cuDNN cannot run these inputs here, or None when it can."""
  if jax.default_backend() != "gpu":
    return f"cuDNN needs a GPU (platform {jax.default_backend()})"
  if q_BxTxNxH.dtype not in DTYPES:
    return f"cuDNN attention takes bfloat16/float16, not {q_BxTxNxH.dtype}"
  return None


def attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT):
  """Causal grouped-query attention within segments by cuDNN; [B, T, N, H]."""
  length = q_BxTxNxH.shape[1]
  pad = -length % LENGTH_MULTIPLE
  if pad:
    at_end = lambda x, value=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2),
                                        constant_values=value)
    padded = attention(at_end(q_BxTxNxH), at_end(k_BxTxKxH), at_end(v_BxTxKxH),
                       at_end(segment_ids_BxT, -1))
    return padded[:, :length]
  same_segment = segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=same_segment,
                                      is_causal=True, implementation="cudnn")
