"""cuDNN fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`) for
`model.attention=cudnn`.

jax 0.10.2's public API takes padding as per-row lengths (valid tokens first), which cannot say
left padding or packed segments, so the segment rule goes in as a boolean mask [B, 1, T, T]
(cuDNN turns it into an additive bias) with the causal mask computed by the kernel. cuDNN runs
only bfloat16 / float16 inputs; `unsupported_reason` says when the caller must fall back.
"""

import jax
import jax.numpy as jnp

DTYPES = (jnp.bfloat16, jnp.float16)


def unsupported_reason(q_BxTxNxH) -> str | None:
  """Why cuDNN cannot run these inputs here, or None when it can."""
  if jax.default_backend() != "gpu":
    return f"cuDNN needs a GPU (platform {jax.default_backend()})"
  if q_BxTxNxH.dtype not in DTYPES:
    return f"cuDNN attention takes bfloat16/float16, not {q_BxTxNxH.dtype}"
  return None


def attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT):
  """Causal grouped-query attention within segments by cuDNN; [B, T, N, H]."""
  same_segment = segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=same_segment,
                                      is_causal=True, implementation="cudnn")
