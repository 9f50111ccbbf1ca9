"""The decoder run over new tokens against a page-pool KV cache (the continuous sampler's prefill
chunks and decode steps): each layer writes the tokens' keys and values into their pages, then
attends over the row's pages. The layers run under `lax.scan` with the pool in the carry.

Under a mesh the rows and the pool's pages are split alike over the batch axes (`page_pool`):
each shard's rows list pages of its own part of the pool, by local index, so the write and the
attention run per shard under `shard_map` (kv heads over the tensor axis), with no
communication; the weight products around them are partitioned as everywhere else.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from prerl_jax import sharding
from prerl_jax.generate import page_pool
from prerl_jax.generate.paged_attention import gather_attention
from prerl_jax.models import rope
from prerl_jax.models.decoder import Decoder, decoder_layer


def compute_weights(model: Decoder) -> dict:
  """The stacked layer weights in the compute dtype (cast once, outside a decode loop)."""
  return {name: p[...].astype(model.config.compute_dtype) for name, p in model.layers.items()}


def _write_and_attend(attention, kv_pages, q, k, v, page_table_NxP, positions_NxT, valid_NxT,
                      kv_lens_N, layer):
  """One layer's write of the tokens' keys and values, then `attention` over the rows' pages
  (the pool [layers, pages, ...] and the tables as one shard sees them)."""
  layers, pages = kv_pages.shape[:2]
  flat = kv_pages.reshape(layers * pages, *kv_pages.shape[2:])
  table_NxP = page_table_NxP + layer * pages  # Pages of this layer in the flattened pool.
  flat = page_pool.write_tokens(flat, page_pool.combine_kv(k, v), table_NxP, positions_NxT,
                                valid_NxT)
  out = attention(q, flat, table_NxP, kv_lens_N, positions_NxT)
  return out, flat.reshape(kv_pages.shape)


def write_and_attend_on_shards(attention, mesh: Mesh | None, rules=sharding.DEFAULT_RULES):
  """`_write_and_attend` with `attention`, run per batch shard under `shard_map` on a mesh
  (module docstring)."""
  local = functools.partial(_write_and_attend, attention)
  if mesh is None:
    return local

  def run(kv_pages, q, k, v, page_table_NxP, positions_NxT, valid_NxT, kv_lens_N, layer):
    pool = page_pool.pool_sharding(kv_pages.shape, mesh, rules).spec
    rows, heads = pool[1], pool[3]
    tokens, per_row = PartitionSpec(rows, None, heads, None), PartitionSpec(rows, None)
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(pool, tokens, tokens, tokens, per_row, per_row, per_row, PartitionSpec(rows),
                  PartitionSpec()),
        out_specs=(tokens, pool), check_vma=False,
    )(kv_pages, q, k, v, page_table_NxP, positions_NxT, valid_NxT, kv_lens_N, layer)

  return run


def paged_forward(model: Decoder, weights: dict, kv_pages, tokens_NxT, positions_NxT, valid_NxT,
                  page_table_NxP, attention=gather_attention, mesh: Mesh | None = None,
                  rules=sharding.DEFAULT_RULES):
  """(hidden [N, T, D] after the final norm, the pool with the valid tokens written).

  Args:
    weights: `compute_weights(model)`.
    kv_pages: the pool [layers, pages, page_size, 2K, H] (`page_pool`).
    tokens_NxT, positions_NxT: the new tokens and their positions in their sequences.
    valid_NxT: which tokens are real; the others write to the scratch page and their hidden
      states are meaningless.
    page_table_NxP: each row's pages (one table for all layers), indices into its shard's part
      of the pool under a mesh.
    attention: `gather_attention` or a kernel with its signature (it sees one shard).
    mesh, rules: where rows and pages are split over the batch axes (module docstring).
  """
  config = model.config
  kv_lens_N = jnp.maximum(jnp.max(jnp.where(valid_NxT, positions_NxT + 1, 0), axis=1), 1)
  rotation = rope.rotation(positions_NxT, rope.inverse_frequencies(config))
  write_and_attend = write_and_attend_on_shards(attention, mesh, rules)

  def layer(carry, inputs):
    x, kv_pages = carry
    weights, index = inputs

    def attend(q, k, v):
      return write_and_attend(kv_pages, q, k, v, page_table_NxP, positions_NxT, valid_NxT,
                              kv_lens_N, index)

    return decoder_layer(config, x, weights, rotation, attend), None

  (x, kv_pages), _ = jax.lax.scan(layer, (model.embed_tokens(tokens_NxT), kv_pages),
                                  (weights, jnp.arange(config.num_layers)))
  return model.normalize_output(x), kv_pages
