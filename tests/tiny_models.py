"""Tiny random Hugging Face models (Llama, Qwen2, Qwen3) built locally for parity tests."""

import numpy as np
import torch
import transformers

from prerl_jax.data import padding

TINY_SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**TINY_SHAPE, rope_theta=10000.0,
                                              tie_word_embeddings=False),
    "llama3_scaled": lambda: transformers.LlamaConfig(
        **TINY_SHAPE, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=32),
        rope_theta=500000.0),
    "qwen2": lambda: transformers.Qwen2Config(**TINY_SHAPE, rope_theta=1000000.0,
                                              tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**TINY_SHAPE, head_dim=32, rope_theta=1000000.0,
                                              tie_word_embeddings=False),
}


def build_hf_model(family: str, seed: int = 0):
  """A tiny float32 transformers model of the family, with every weight random (biases too)."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](),
                                                        dtype=torch.float32)
  with torch.no_grad():
    for param in model.parameters():
      param.copy_(torch.randn_like(param) * 0.1 + (1.0 if param.dim() == 1 else 0.0))
  return model.eval()


def save_hf_model(family: str, directory, seed: int = 0) -> str:
  build_hf_model(family, seed).save_pretrained(str(directory), safe_serialization=True)
  return str(directory)


def left_padded_batch(vocab_size: int, lengths=(7, 4, 9), seed: int = 0):
  """(tokens, mask) numpy int32/bool arrays, left-padded to the longest length with id 0."""
  rng = np.random.default_rng(seed)
  return padding.left_pad([rng.integers(3, vocab_size, length) for length in lengths], 0)


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Transformers logits with explicit positions counting only real tokens."""
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


def hf_greedy(model, tokens: np.ndarray, mask: np.ndarray, max_new: int, stop, pad: int):
  """Transformers' greedy decode: the [N, max_new] new tokens, padded with `pad` after a stop."""
  with torch.no_grad():
    out = model.generate(torch.tensor(tokens).long(), attention_mask=torch.tensor(mask).long(),
                         do_sample=False, max_new_tokens=max_new, eos_token_id=list(stop),
                         pad_token_id=pad)
  response = out[:, tokens.shape[1]:].numpy()
  return np.pad(response, ((0, 0), (0, max_new - response.shape[1])), constant_values=pad)
