"""Logit parity of our decoder with transformers on tiny random Llama / Qwen2 / Qwen3 models."""

import jax.numpy as jnp
import numpy as np
import pytest

import tiny_models
from prerl_jax.models.loading import load_model
from prerl_jax.generate.decode import decode_step
from prerl_jax.models import rope
from prerl_jax.models.decoder import positions_from_mask


def _our_logits(model, tokens, mask):
  hidden, _ = model(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)),
                    jnp.asarray(mask))
  return np.asarray(model.logits(hidden))


@pytest.mark.parametrize("family", sorted(tiny_models.FAMILIES))
def test_left_padded_logits_match_transformers(family, tmp_path):
  hf_model = tiny_models.build_hf_model(family)
  hf_model.save_pretrained(str(tmp_path))
  model, _ = load_model(str(tmp_path), with_tokenizer=False)
  tokens, mask = tiny_models.left_padded_batch(model.config.vocab_size)
  ours = _our_logits(model, tokens, mask)
  reference = tiny_models.hf_logits(hf_model, tokens, mask)
  assert np.abs(reference).max() > 1.0  # The comparison is not between near-zero numbers.
  assert np.abs(ours - reference)[mask].max() <= 1e-4


def test_block_cache_decode_matches_full_forward(tmp_path):
  """Prefill, then one-token decode steps over a shared prompt block and a generated block."""
  model, _ = load_model(tiny_models.save_hf_model("qwen3", tmp_path), with_tokenizer=False)
  c = model.config
  prompt_tokens, prompt_mask = tiny_models.left_padded_batch(c.vocab_size, lengths=(6, 2, 8))
  n, steps = 2, 5  # Two continuations per prompt, decoded together against one prompt block.
  rows = 3 * n
  continuation = np.random.default_rng(1).integers(3, c.vocab_size, (rows, steps)).astype(np.int32)
  full_tokens = np.concatenate([np.repeat(prompt_tokens, n, 0), continuation], axis=1)
  full_mask = np.concatenate([np.repeat(prompt_mask, n, 0), np.ones((rows, steps), bool)], 1)
  full = _our_logits(model, full_tokens, full_mask)

  hidden, (keys, values) = model(jnp.asarray(prompt_tokens),
                                 positions_from_mask(jnp.asarray(prompt_mask)),
                                 jnp.asarray(prompt_mask), return_kv=True)
  block = [(jnp.zeros((rows, c.num_kv_heads, c.head_dim, steps)),
            jnp.zeros((rows, c.num_kv_heads, steps, c.head_dim)))] * c.num_layers
  positions = np.asarray(positions_from_mask(jnp.asarray(full_mask)))[:, prompt_tokens.shape[1]:]
  layer_weights = model.layer_weights()
  inv_freq = rope.inverse_frequencies(c)
  stepwise = [np.repeat(np.asarray(model.logits(hidden[:, -1:])), n, 0)]
  for offset in range(steps):
    cache = [[(keys[i], values[i], jnp.asarray(prompt_mask)),
              block[i] + (jnp.arange(steps) <= offset,)] for i in range(c.num_layers)]
    rotation = rope.rotation(jnp.asarray(positions[:, offset:offset + 1]), inv_freq)
    hidden, cache = decode_step(model, layer_weights, cache, jnp.asarray(continuation[:, offset]),
                                rotation, offset)
    block = [blocks[-1][:2] for blocks in cache]
    stepwise.append(np.asarray(model.logits(hidden)))
  stepwise = np.concatenate(stepwise, axis=1)[:, :steps]  # Predictions of continuation tokens.
  reference = full[:, prompt_tokens.shape[1] - 1:-1]
  assert np.abs(reference).max() > 0.1
  assert np.abs(stepwise - reference).max() <= 1e-5
