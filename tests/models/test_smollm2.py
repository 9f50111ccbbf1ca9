"""SmolLM2-135M from its GGUF file: parity with transformers' own GGUF loading, and export."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from prerl_jax.models.export import export_hf
from prerl_jax.models.decoder import positions_from_mask
from prerl_jax.models.presets import smollm2_gguf_path

PROMPTS = ("The capital of France is", "What is 12 + 35? Answer:", "def fibonacci(n):\n    ")


def _batch(tokenizer):
  encoded = [tokenizer(text)["input_ids"] for text in PROMPTS]
  width = max(map(len, encoded))
  tokens = np.zeros((len(encoded), width), np.int32)
  mask = np.zeros((len(encoded), width), bool)
  for row, ids in enumerate(encoded):
    tokens[row, width - len(ids):] = ids
    mask[row, width - len(ids):] = True
  return tokens, mask


def _torch_logits(model, tokens, mask):
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens).long(), attention_mask=torch.tensor(mask).long(),
                 position_ids=torch.tensor(positions).long()).logits.numpy()


@pytest.fixture(scope="module")
def our_logits(smollm2):
  model, tokenizer = smollm2
  tokens, mask = _batch(tokenizer)
  hidden, _ = model(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)),
                    jnp.asarray(mask))
  return np.asarray(model.logits(hidden)), tokens, mask


@pytest.fixture(scope="module")
def transformers_logits(our_logits):
  """Logits of transformers' own loading of the same GGUF file."""
  folder, name = os.path.split(smollm2_gguf_path())
  reference_model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, gguf_file=name, dtype=torch.float32).eval()
  _, tokens, mask = our_logits
  return _torch_logits(reference_model, tokens, mask)


def test_gguf_logits_match_transformers_gguf_loading(our_logits, transformers_logits):
  ours, tokens, mask = our_logits
  reference = transformers_logits
  assert np.abs(ours - reference)[mask].max() <= 1e-3
  assert ours[0, -1].argmax() == reference[0, -1].argmax()


def test_export_reloads_in_transformers_with_same_logits(smollm2, our_logits, transformers_logits,
                                                         tmp_path):
  model, tokenizer = smollm2
  export_hf(model, str(tmp_path), tokenizer)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                               dtype=torch.float32).eval()
  ours, tokens, mask = our_logits
  reloaded_logits = _torch_logits(reloaded, tokens, mask)
  # Same weights in the same framework as transformers' GGUF loading: equal up to float32 noise.
  assert np.abs(reloaded_logits - transformers_logits)[mask].max() <= 1e-5
  assert np.abs(reloaded_logits - ours)[mask].max() <= 1e-3
  reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert reloaded_tokenizer(PROMPTS[1])["input_ids"] == tokenizer(PROMPTS[1])["input_ids"]
