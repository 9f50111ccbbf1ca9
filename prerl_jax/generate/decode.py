"""One-token decode steps over a KV cache kept as per-layer blocks (the sampler's inner loop).

The cache of layer i is a list of blocks; each block is (keys [rows, kv_heads, head_dim, C],
values [rows, kv_heads, C, head_dim], mask over its C slots) (see `model.CACHE_AXES`):

- the prompt block holds each prompt's keys and values once (rows = prompts); the `n` samples of
  a prompt (rows i*n .. i*n+n-1 of the decode batch) attend to it together, so the prompt part
  of the cache is read once per group rather than once per sample;
- generated blocks (rows = prompts * n) hold the decoded tokens, one block per decode segment.

Blocks are separate arrays, not slices of one [layers, ..., length, ...] array: XLA:CPU copies a
sliced operand before a dot, and on SmolLM2 at 64 rows those copies took more time than the
attention itself. A decode step writes its token into the last block and attends to all blocks
(`write_and_attend`).
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from prerl_jax.models import rope
from prerl_jax import sharding
from prerl_jax.models.decoder import CACHE_AXES, Decoder, LayerOps, decoder_layer
from prerl_jax.models.config import ModelConfig


def block_shapes(config: ModelConfig, rows: int, slots: int) -> dict[str, tuple[int, ...]]:
  """Shapes of one layer's cache block of `slots` slots for `rows` rows (see CACHE_AXES)."""
  c = config
  return {"k": (rows, c.num_kv_heads, c.head_dim, slots),
          "v": (rows, c.num_kv_heads, slots, c.head_dim)}


def block_sharding(name: str, shape, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> NamedSharding:
  """Sharding of a cache array `name` ("k" or "v", see CACHE_AXES) of this shape; axes before
  the block's four are stacked layers (the prefill's keys and values)."""
  axes = ("layers",) * (len(shape) - 4) + CACHE_AXES[name]
  return NamedSharding(mesh, sharding.logical_to_spec(axes, shape, mesh, rules))


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
    if groups == rows:
      q_AxKxQxH, to_rows = q_NxKxGxH, lambda x: x
    else:
      # The queries of a group's rows, all of its kv head's query heads, as one matrix per
      # (group, kv head): products of [n * G, H] by [H, C] instead of n * G row-vector products
      # (9.0 vs 13.5 ms per SmolLM2 decode step for a 64-slot prompt block).
      q_AxKxQxH = (q_NxKxGxH.reshape(groups, rows // groups, *q_NxKxGxH.shape[1:])
                   .transpose(0, 2, 1, 3, 4).reshape(groups, num_kv, -1, head_dim))
      to_rows = lambda x: (x.reshape(groups, num_kv, rows // groups, -1, x.shape[-1])
                           .transpose(0, 2, 1, 3, 4).reshape(rows, num_kv, -1, x.shape[-1]))
    scores = jnp.einsum("akqh,akhc->akqc", q_AxKxQxH, keys, preferred_element_type=jnp.float32)
    mask = mask[:, None, None, :] if mask.ndim == 2 else mask
    scores = jnp.where(mask, scores * head_dim**-0.5, -jnp.inf)
    maximum = jnp.max(scores, axis=-1, keepdims=True)
    maximum = jnp.where(jnp.isfinite(maximum), maximum, 0.0)  # A block with no valid slot.
    weights = jnp.exp(scores - maximum)
    out = jnp.einsum("akqc,akch->akqh", weights.astype(values.dtype), values,
                     preferred_element_type=jnp.float32)
    maxima.append(to_rows(maximum))
    sums.append(to_rows(jnp.sum(weights, axis=-1, keepdims=True)))
    outs.append(to_rows(out))
  overall = functools.reduce(jnp.maximum, maxima)
  scales = [jnp.exp(m - overall) for m in maxima]
  total = sum(s * l for s, l in zip(scales, sums))
  out = sum(s * o for s, o in zip(scales, outs)) / total
  return out.astype(q_NxTxNHxH.dtype).reshape(rows, length, num_heads, head_dim)


def write_and_attend(q_NxTxNHxH, k_NxTxKxH, v_NxTxKxH, rotation, offset, blocks):
  """Rotates the new token's queries and keys by `rotation` (`rope.rotation` of its positions),
  writes its keys and values at slot `offset` of the last block (whose mask must mark the slots up
  to `offset` valid), then `block_attention` over all the blocks (T == 1).

  Returns (attended like q, the blocks with the last one updated).
  """
  q = rope.apply_rotation(q_NxTxNHxH, rotation)
  k_NxKxHx1 = rope.apply_rotation(k_NxTxKxH, rotation).transpose(0, 2, 3, 1)
  v_NxKx1xH = v_NxTxKxH.transpose(0, 2, 1, 3)
  last_k, last_v, last_mask = blocks[-1]
  last_k = jax.lax.dynamic_update_slice_in_dim(last_k, k_NxKxHx1.astype(last_k.dtype), offset,
                                               axis=3)
  last_v = jax.lax.dynamic_update_slice_in_dim(last_v, v_NxKx1xH.astype(last_v.dtype), offset,
                                               axis=2)
  blocks = blocks[:-1] + [(last_k, last_v, last_mask)]
  return block_attention(q, blocks), blocks


def decode_step(model: Decoder, layer_weights: list[dict], cache: list[list], tokens_N,
                rotation, offset, attention=write_and_attend, ops: LayerOps = LayerOps()):
  """Hidden states [N, 1, D] of one new token per row, and the cache with its keys and values.

  `rotation` is `rope.rotation(positions_Nx1, ...)` of the new tokens.

  Each layer rotates the token's queries and keys, writes its keys and values at slot `offset` of
  its last block and attends over all of its blocks with `attention(q, k, v, rotation, offset,
  blocks)`: `write_and_attend`, or `cpu_attention.write_and_attend`, which computes the same.
  `ops` computes the weight products and norms (`decoder_layer`): XLA's over `layer_weights`, or
  the CPU kernels (`cpu_matmul`, `cpu_norm`) over weights packed by `cpu_matmul.pack_layer`.
  """
  x = model.embed_tokens(tokens_N[:, None])
  new_cache = []
  for w, blocks in zip(layer_weights, cache):

    def attend(q, k, v, blocks=blocks):
      return attention(q, k, v, rotation, offset, blocks)

    x, blocks = decoder_layer(model.config, x, w, None, attend, ops)
    new_cache.append(blocks)
  return model.normalize_output(x), new_cache
