"""Response scoring in both spaces against plain forward passes; chunking changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prerl_jax.rl import scoring
from prerl_jax.rl.batch import rollout_batch
from prerl_jax.models.loading import random_model
from prerl_jax.models.decoder import forward_logits
from prerl_jax.models.config import ModelConfig

CONFIG = ModelConfig("qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True)
BOS = 1
# Scores and gradients compared with a forward pass or each other within 1e-6 to 2e-5.
pytestmark = pytest.mark.usefixtures("unoptimized_machine_code")


@pytest.fixture(scope="module")
def model():
  return random_model(CONFIG, seed=3)


def make_batch(seed=0, prompt_lengths=(5, 3, 1), response_lengths=(7, 2, 5)):
  rng = np.random.default_rng(seed)
  prompt_len, response_len = max(prompt_lengths), max(response_lengths)
  return rollout_batch(rng.integers(3, 128, (3, prompt_len)), prompt_lengths,
                       rng.integers(3, 128, (3, response_len)), response_lengths)


def gathered(logits_BxTxV, tokens_BxR, start, temperature=1.0):
  logp = jax.nn.log_softmax(np.asarray(logits_BxTxV) / temperature, axis=-1)
  return np.take_along_axis(np.asarray(logp[:, start:start + tokens_BxR.shape[1]]),
                            tokens_BxR[..., None], -1)[..., 0]


def test_conditional_equals_full_forward_at_response_positions(model):
  batch = make_batch()
  tokens = np.concatenate([batch.prompt_tokens, batch.response_tokens], 1)
  mask = np.concatenate([batch.prompt_mask, batch.response_mask], 1)
  logits = forward_logits(model, tokens, mask)
  prompt_len = batch.prompt_tokens.shape[1]
  for temperature in (1.0, 0.7):
    expected = gathered(logits, batch.response_tokens, prompt_len - 1, temperature)
    logp, _ = scoring.score(model, batch, True, temperature=temperature)
    np.testing.assert_allclose(np.asarray(logp), expected * batch.response_mask, atol=2e-5)
  assert np.all(np.asarray(logp)[~batch.response_mask] == 0)


def test_marginal_equals_forward_over_bos_and_response_alone(model):
  batch = make_batch()
  logp, _ = scoring.score(model, batch, False, bos_id=BOS)
  for row in range(3):
    response = batch.response_tokens[row][batch.response_mask[row]]
    alone = np.concatenate([[BOS], response])[None]
    logits = forward_logits(model, alone, np.ones_like(alone, bool))
    expected = gathered(logits, response[None], 0)[0]
    np.testing.assert_allclose(np.asarray(logp)[row, :len(response)], expected, atol=2e-5)


def test_prompt_changes_conditional_scores_but_not_marginal(model):
  batch = make_batch()
  other = batch.replace(prompt_tokens=make_batch(seed=9).prompt_tokens)
  marginal, _ = scoring.score(model, batch, False, bos_id=BOS)
  marginal_other, _ = scoring.score(model, other, False, bos_id=BOS)
  conditional, _ = scoring.score(model, batch, True)
  conditional_other, _ = scoring.score(model, other, True)
  np.testing.assert_array_equal(np.asarray(marginal), np.asarray(marginal_other))
  assert np.abs(np.asarray(conditional) - np.asarray(conditional_other)).max() > 1e-3
  # A different BOS changes the scores; the marginal space needs one.
  other_bos, _ = scoring.score(model, batch, False, bos_id=BOS + 1)
  assert np.abs(np.asarray(other_bos) - np.asarray(marginal)).max() > 1e-3
  with pytest.raises(ValueError, match="pass bos_id="):
    scoring.response_logprobs(model, batch, False)


@pytest.mark.parametrize("conditional", [True, False])
def test_chunked_equals_unchunked_with_gradients(model, conditional):
  batch = make_batch()
  graphdef, params = nnx.split(model)

  def total(params, chunk_size):
    logp, entropy = scoring.response_logprobs(nnx.merge(graphdef, params), batch, conditional,
                                              0.8, BOS, chunk_size)
    return jnp.sum(logp) + 0.1 * jnp.sum(entropy), (logp, entropy)

  # Compiled, as the train step scores (op by op, the eager gradient took longer).
  grad_fn = jax.jit(jax.value_and_grad(total, has_aux=True), static_argnums=1)
  (_, (logp, entropy)), grads = grad_fn(params, None)
  (_, (logp3, entropy3)), grads3 = grad_fn(params, 3)
  np.testing.assert_allclose(np.asarray(logp3), np.asarray(logp), atol=1e-6)
  np.testing.assert_allclose(np.asarray(entropy3), np.asarray(entropy), atol=1e-6)
  assert float(jnp.sum(entropy)) > 0
  for a, b in zip(jax.tree.leaves(grads3), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3


def test_entropy_is_that_of_the_tempered_distribution(model):
  batch = make_batch()
  tokens = np.concatenate([batch.prompt_tokens, batch.response_tokens], 1)
  mask = np.concatenate([batch.prompt_mask, batch.response_mask], 1)
  prompt_len = batch.prompt_tokens.shape[1]
  logits = np.asarray(forward_logits(model, tokens, mask))[:, prompt_len - 1:-1] / 0.5
  logp = jax.nn.log_softmax(logits, axis=-1)
  expected = -np.sum(np.exp(logp) * logp, axis=-1) * batch.response_mask
  _, entropy = scoring.score(model, batch, True, temperature=0.5, chunk_size=4)
  np.testing.assert_allclose(np.asarray(entropy), expected, atol=2e-5)
