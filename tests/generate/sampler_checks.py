"""Checks shared by the sampler tests: tiny prompts, teacher-forced log-probs and the tokens
top-k / top-p may emit."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import tiny_models
from prerl_jax.models.decoder import positions_from_mask

STOP = tiny_models.TINY_SHAPE["eos_token_id"]
PAD = tiny_models.TINY_SHAPE["pad_token_id"]
BUCKETS = (8, 16, 32)


def _prompts(lengths, seed=0, vocab=128):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, vocab, length).tolist() for length in lengths]


def _teacher_forced_logp(model, out, temperature):
  """log_softmax(logits / temperature) [N, M, V] at each response step of [prompt][response]."""
  return np.asarray(_response_logp(model, out.prompt_tokens_NxP, out.prompt_mask_NxP,
                                   out.tokens_NxM, out.response_mask_NxM, temperature))


@nnx.jit
def _response_logp(model, prompt_tokens_NxP, prompt_mask_NxP, tokens_NxM, response_mask_NxM,
                   temperature):
  tokens = jnp.concatenate([prompt_tokens_NxP, tokens_NxM], axis=1)
  mask = jnp.concatenate([prompt_mask_NxP, response_mask_NxM], axis=1)
  hidden, _ = model(tokens, positions_from_mask(mask), mask)
  logits = model.logits(hidden)[:, prompt_tokens_NxP.shape[1] - 1:-1] / temperature
  return jax.nn.log_softmax(logits, axis=-1)


def _gather(logp_NxMxV, tokens_NxM):
  return np.take_along_axis(logp_NxMxV, np.asarray(tokens_NxM)[..., None], axis=-1)[..., 0]


def _allowed(logp_NxMxV, top_k, top_p):
  """Tokens that top-k, then top-p over the renormalized top-k distribution, may emit."""
  order = np.argsort(-logp_NxMxV, axis=-1)
  probs = np.exp(np.take_along_axis(logp_NxMxV, order, axis=-1))
  if top_k:
    probs[..., top_k:] = 0
  probs /= probs.sum(axis=-1, keepdims=True)
  keep = (np.cumsum(probs, axis=-1) - probs < top_p + 1e-5) & (probs > 0)
  allowed = np.zeros(logp_NxMxV.shape, bool)
  np.put_along_axis(allowed, order, keep, axis=-1)
  return allowed
