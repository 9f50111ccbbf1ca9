"""One-token decode steps over a KV cache kept as per-layer blocks (the sampler's inner loop).

The cache of layer i is a list of blocks; each block is (keys [rows, kv_heads, head_dim, C],
values [rows, kv_heads, C, head_dim], mask over its C slots) (see `model.CACHE_AXES`):

- the prompt block holds each prompt's keys and values once (rows = prompts); the `n` samples of
  a prompt (rows i*n .. i*n+n-1 of the decode batch) attend to it together, so the prompt part
  of the cache is read once per group rather than once per sample;
- generated blocks (rows = prompts * n) hold the decoded tokens, one block per decode segment.

Blocks are separate arrays, not slices of one [layers, ..., length, ...] array: XLA:CPU copies a
sliced operand before a dot, and on SmolLM2 at 64 rows those copies took more time than the
attention itself. A decode step writes its token into the last block and attends to all blocks.
"""

import functools

import jax
import jax.numpy as jnp

from prerl_jax.model import Decoder, decoder_layer, rms_norm
from prerl_jax.model_config import ModelConfig


def block_shapes(config: ModelConfig, rows: int, slots: int) -> dict[str, tuple[int, ...]]:
  """Shapes of one layer's cache block of `slots` slots for `rows` rows (see CACHE_AXES)."""
  c = config
  return {"k": (rows, c.num_kv_heads, c.head_dim, slots),
          "v": (rows, c.num_kv_heads, slots, c.head_dim)}


def block_attention(q_NxTxNHxH, blocks):
  """Attention of one query token per row over the cache blocks of one layer.

  Each block gets its own softmax statistics (max, sum, weighted values), combined at the end as
  in flash-decoding, so no block's scores are concatenated or copied.

  Args:
    q_NxTxNHxH: rotated queries, T == 1.
    blocks: [(keys_RxKxHxC, values_RxKxCxH, mask_RxC or mask_C)], where R is the query rows N or
      the prompts N // n (a block shared by each group of N // R consecutive rows).
  """
  rows, length, num_heads, head_dim = q_NxTxNHxH.shape
  num_kv = blocks[0][0].shape[1]
  q_NxKxGxH = q_NxTxNHxH.reshape(rows, num_kv, num_heads // num_kv, head_dim)
  maxima, sums, outs = [], [], []
  for keys, values, mask in blocks:
    groups = keys.shape[0]
    # Per-row blocks take 4-D products: with the 5-D grouped form (unit group axis) XLA:CPU laid
    # the scores out transposed; on SmolLM2 at 64 rows the per-row scores took 54 ms per step
    # then, 22 ms after this and the per-block softmax (changed together).
    if groups == rows:
      scores = jnp.einsum("nkgh,nkhc->nkgc", q_NxKxGxH, keys, preferred_element_type=jnp.float32)
    else:
      q = q_NxKxGxH.reshape(groups, rows // groups, *q_NxKxGxH.shape[1:])
      scores = jnp.einsum("bnkgh,bkhc->bnkgc", q, keys, preferred_element_type=jnp.float32)
      scores = scores.reshape(rows, *scores.shape[2:])
      mask = jnp.repeat(mask, rows // groups, axis=0) if mask.ndim == 2 else mask
    mask = mask[:, None, None, :] if mask.ndim == 2 else mask
    scores = jnp.where(mask, scores * head_dim**-0.5, -jnp.inf)
    maximum = jnp.max(scores, axis=-1, keepdims=True)
    maximum = jnp.where(jnp.isfinite(maximum), maximum, 0.0)  # A block with no valid slot.
    weights = jnp.exp(scores - maximum)
    if groups == rows:
      out = jnp.einsum("nkgc,nkch->nkgh", weights.astype(values.dtype), values,
                       preferred_element_type=jnp.float32)
    else:
      w = weights.reshape(groups, rows // groups, *weights.shape[1:]).astype(values.dtype)
      out = jnp.einsum("bnkgc,bkch->bnkgh", w, values, preferred_element_type=jnp.float32)
      out = out.reshape(rows, *out.shape[2:])
    maxima.append(maximum)
    sums.append(jnp.sum(weights, axis=-1, keepdims=True))
    outs.append(out)
  overall = functools.reduce(jnp.maximum, maxima)
  scales = [jnp.exp(m - overall) for m in maxima]
  total = sum(s * l for s, l in zip(scales, sums))
  out = sum(s * o for s, o in zip(scales, outs)) / total
  return out.astype(q_NxTxNHxH.dtype).reshape(rows, length, num_heads, head_dim)


def decode_step(model: Decoder, layer_weights: list[dict], cache: list[list], tokens_N,
                rotation, offset):
  """Hidden states [N, 1, D] of one new token per row, and the cache with its keys and values.

  `rotation` is `rope.rotation(positions_Nx1, ...)` of the new tokens.

  Each layer writes the token's keys and values at slot `offset` of its last block (whose mask
  must mark the slots up to `offset` valid) and attends over all of its blocks.
  """
  config = model.config
  x = jnp.take(model.embed[...], tokens_N[:, None], axis=0).astype(config.compute_dtype)
  new_cache = []
  for w, blocks in zip(layer_weights, cache):

    def attend(q, k, v, blocks=blocks):
      last_k, last_v, last_mask = blocks[-1]
      last_k = jax.lax.dynamic_update_slice_in_dim(last_k, k.astype(last_k.dtype), offset, axis=3)
      last_v = jax.lax.dynamic_update_slice_in_dim(last_v, v.astype(last_v.dtype), offset, axis=2)
      blocks = blocks[:-1] + [(last_k, last_v, last_mask)]
      return block_attention(q, blocks), blocks

    x, blocks = decoder_layer(config, x, w, rotation, attend)
    new_cache.append(blocks)
  return rms_norm(x, model.final_norm[...], config.rms_norm_eps), new_cache
