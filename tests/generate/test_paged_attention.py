"""Paged attention and the paged forward: the XLA gather over page tables equals dense attention,
and prefilling a prompt in chunks through the pool equals the full forward."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_models
from prerl_jax.generate import page_pool
from prerl_jax.generate.paged_attention import gather_attention
from prerl_jax.generate.paged_forward import compute_weights, paged_forward
from prerl_jax.models.config import ModelConfig
from prerl_jax.models.decoder import Decoder, positions_from_mask
from paged_cases import random_paged_case


def test_gather_attention_matches_dense_attention():
  q, kv_pages, table, kv_lens, positions, keys, values = random_paged_case()
  got = gather_attention(q, kv_pages, table, kv_lens, positions)
  slots = np.arange(keys.shape[1])
  allowed = (slots <= positions[:, :, None]) & (slots < kv_lens[:, None, None])
  keys = np.repeat(np.nan_to_num(keys), 2, axis=2)  # Each kv head serves two query heads.
  values = np.repeat(np.nan_to_num(values), 2, axis=2)
  scores = np.einsum("ntqh,nsqh->nqts", q, keys) * q.shape[-1]**-0.5
  scores = np.where(allowed[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  expected = np.einsum("nqts,nsqh->ntqh", probs / probs.sum(-1, keepdims=True), values)
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(got, expected, atol=1e-5)


def _tiny_decoder() -> Decoder:
  config = ModelConfig(model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, qk_norm=True)
  return Decoder(config, rngs=nnx.Rngs(0))


def test_chunked_paged_prefill_matches_forward():
  """A 13-token prompt written through the pool in chunks of 8 and 5 (the second chunk padded
  to 8), on pages out of order, gives the full forward's hidden states."""
  model = _tiny_decoder()
  tokens, mask = tiny_models.left_padded_batch(128, lengths=(13,))
  expected, _ = model(jnp.asarray(tokens), positions_from_mask(mask), jnp.asarray(mask))
  kv_pages = page_pool.empty_pool(model.config, pages=8, page_size=4)
  table = np.array([[5, 2, 7, 3]], np.int32)
  hidden = []
  for start in (0, 8):
    part = np.zeros((1, 8), np.int32)
    count = min(8, 13 - start)
    part[0, :count] = tokens[0, start:start + count]
    positions = start + np.arange(8)[None]
    out, kv_pages = paged_forward(model, compute_weights(model), kv_pages, part, positions,
                                  np.arange(8)[None] < count, table)
    hidden.append(out[:, :count])
  np.testing.assert_allclose(jnp.concatenate(hidden, axis=1), expected, atol=1e-5)
  untouched = np.setdiff1d(np.arange(8), table)
  assert not np.asarray(kv_pages)[:, untouched[1:]].any()  # Only the table's pages (and scratch).


def test_page_allocator_frees_a_shared_page_after_its_last_holder():
  allocator = page_pool.PageAllocator(6)
  shared = allocator.allocate(2)
  assert shared == [1, 2] and allocator.free_pages == 3
  allocator.share(shared * 2)  # Three samples hold the prompt's pages.
  own = allocator.allocate(3)
  assert allocator.release(shared + own[:1]) == [own[0]]
  assert allocator.release(shared) == []
  assert sorted(allocator.release(shared)) == shared
  assert allocator.free_pages == 3
  with pytest.raises(MemoryError, match="4 pages asked, 3 free"):
    allocator.allocate(4)
