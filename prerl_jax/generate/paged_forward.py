"""The decoder run over new tokens against a page-pool KV cache (the continuous sampler's prefill
chunks and decode steps): each layer writes the tokens' keys and values into their pages, then
attends over the row's pages. The layers run under `lax.scan` with the pool in the carry."""

import jax
import jax.numpy as jnp

from prerl_jax.generate import page_pool
from prerl_jax.generate.paged_attention import gather_attention
from prerl_jax.models import rope
from prerl_jax.models.decoder import Decoder, decoder_layer


def compute_weights(model: Decoder) -> dict:
  """The stacked layer weights in the compute dtype (cast once, outside a decode loop)."""
  return {name: p[...].astype(model.config.compute_dtype) for name, p in model.layers.items()}


def paged_forward(model: Decoder, weights: dict, kv_pages, tokens_NxT, positions_NxT, valid_NxT,
                  page_table_NxP, attention=gather_attention):
  """(hidden [N, T, D] after the final norm, the pool with the valid tokens written).

  Args:
    weights: `compute_weights(model)`.
    kv_pages: the pool [layers, pages, page_size, 2K, H] (`page_pool`).
    tokens_NxT, positions_NxT: the new tokens and their positions in their sequences.
    valid_NxT: which tokens are real; the others write to the scratch page and their hidden
      states are meaningless.
    page_table_NxP: each row's pages (one table for all layers).
    attention: `gather_attention` or a kernel with its signature.
  """
  config = model.config
  layers, pages = kv_pages.shape[:2]
  kv_lens_N = jnp.maximum(jnp.max(jnp.where(valid_NxT, positions_NxT + 1, 0), axis=1), 1)
  rotation = rope.rotation(positions_NxT, rope.inverse_frequencies(config))

  def layer(carry, inputs):
    x, kv_pages = carry
    weights, index = inputs
    table_NxP = page_table_NxP + index * pages  # Pages of this layer in the flattened pool.

    def attend(q, k, v):
      flat = kv_pages.reshape(layers * pages, *kv_pages.shape[2:])
      flat = page_pool.write_tokens(flat, page_pool.combine_kv(k, v), table_NxP, positions_NxT,
                                    valid_NxT)
      out = attention(q, flat, table_NxP, kv_lens_N, positions_NxT)
      return out, flat.reshape(kv_pages.shape)

    return decoder_layer(config, x, weights, rotation, attend), None

  (x, kv_pages), _ = jax.lax.scan(layer, (model.embed_tokens(tokens_NxT), kv_pages),
                                  (weights, jnp.arange(layers)))
  return model.normalize_output(x), kv_pages
