"""Logit parity of our decoder with transformers on tiny random Llama / Qwen2 / Qwen3 models."""

import jax.numpy as jnp
import numpy as np
import pytest

import tiny_models
from prerl_jax.loading import load_model
from prerl_jax.model import init_kv_cache, positions_from_mask


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


def test_cached_decode_matches_full_forward(tmp_path):
  model, _ = load_model(tiny_models.save_hf_model("qwen3", tmp_path), with_tokenizer=False)
  tokens, mask = tiny_models.left_padded_batch(model.config.vocab_size, lengths=(6, 3, 8))
  full = _our_logits(model, tokens, mask)
  prompt = 5
  cache = init_kv_cache(model.config, batch=3, length=tokens.shape[1])
  positions = positions_from_mask(jnp.asarray(mask))
  key_mask = jnp.asarray(mask)
  hidden, cache = model(jnp.asarray(tokens[:, :prompt]), positions[:, :prompt], key_mask,
                        cache=cache, cache_index=0)
  stepwise = [np.asarray(model.logits(hidden))]
  for slot in range(prompt, tokens.shape[1]):
    hidden, cache = model(jnp.asarray(tokens[:, slot:slot + 1]), positions[:, slot:slot + 1],
                          key_mask, cache=cache, cache_index=slot)
    stepwise.append(np.asarray(model.logits(hidden)))
  stepwise = np.concatenate(stepwise, axis=1)
  assert np.abs(stepwise - full)[mask].max() <= 1e-5
