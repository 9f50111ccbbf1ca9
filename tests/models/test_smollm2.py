"""SmolLM2-135M from its GGUF file: parity with transformers' own GGUF loading (logits and greedy
decode), and export. All slow: they share one GGUF load of each model, so they run together."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import tiny_models
from prerl_jax.generate.sampler import Sampler, SamplingConfig, prompt_batch
from prerl_jax.models.export import export_hf
from prerl_jax.models.decoder import positions_from_mask
from prerl_jax.models.loading import load_model
from prerl_jax.models.presets import smollm2_gguf_path

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is", "What is 12 + 35? Answer:", "def fibonacci(n):\n    ")


@pytest.fixture(scope="module")
def smollm2():
  """(model, tokenizer) of the bundled SmolLM2-135M GGUF."""
  return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def transformers_model():
  """transformers' own loading of the same GGUF file."""
  folder, name = os.path.split(smollm2_gguf_path())
  return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                           dtype=torch.float32).eval()


def _batch(tokenizer):
  encoded = [tokenizer(text)["input_ids"] for text in PROMPTS]
  width = max(map(len, encoded))
  tokens = np.zeros((len(encoded), width), np.int32)
  mask = np.zeros((len(encoded), width), bool)
  for row, ids in enumerate(encoded):
    tokens[row, width - len(ids):] = ids
    mask[row, width - len(ids):] = True
  return tokens, mask


@pytest.fixture(scope="module")
def our_logits(smollm2):
  model, tokenizer = smollm2
  tokens, mask = _batch(tokenizer)
  hidden, _ = model(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)),
                    jnp.asarray(mask))
  return np.asarray(model.logits(hidden)), tokens, mask


@pytest.fixture(scope="module")
def transformers_logits(transformers_model, our_logits):
  _, tokens, mask = our_logits
  return tiny_models.hf_logits(transformers_model, tokens, mask)


def test_gguf_logits_match_transformers_gguf_loading(our_logits, transformers_logits):
  ours, tokens, mask = our_logits
  reference = transformers_logits
  assert np.abs(ours - reference)[mask].max() <= 1e-3
  assert ours[0, -1].argmax() == reference[0, -1].argmax()


def test_greedy_matches_transformers_gguf_loading(smollm2, transformers_model):
  model, tokenizer = smollm2
  texts = ("The capital of France is", "def add(a, b):\n", "Once upon a time, in a land far "
           "away, there lived a", "Q: What is 7 times 8?\nA:")
  config = SamplingConfig.from_tokenizer(tokenizer, max_new_tokens=32, greedy=True,
                                         prompt_buckets=(32,))
  tokens, mask = prompt_batch([tokenizer(t)["input_ids"] for t in texts], config)
  assert len(set(mask.sum(axis=1))) == 4
  out = Sampler(model).sample(nnx.state(model), tokens, mask, jax.random.key(0), config)
  expected = tiny_models.hf_greedy(transformers_model, tokens, mask, 32, config.stop_ids,
                                   config.pad_id)
  for row in range(len(texts)):
    np.testing.assert_array_equal(np.asarray(out.tokens_NxM[row]), expected[row],
                                  err_msg=texts[row])


def test_export_reloads_in_transformers_with_same_logits(smollm2, our_logits, transformers_logits,
                                                         tmp_path):
  model, tokenizer = smollm2
  export_hf(model, str(tmp_path), tokenizer)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                               dtype=torch.float32).eval()
  ours, tokens, mask = our_logits
  reloaded_logits = tiny_models.hf_logits(reloaded, tokens, mask)
  # Same weights in the same framework as transformers' GGUF loading: equal up to float32 noise.
  assert np.abs(reloaded_logits - transformers_logits)[mask].max() <= 1e-5
  assert np.abs(reloaded_logits - ours)[mask].max() <= 1e-3
  reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert reloaded_tokenizer(PROMPTS[1])["input_ids"] == tokenizer(PROMPTS[1])["input_ids"]
