"""Gradient alignment between spaces and the summary numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prerl_jax.rl import grad_alignment, scoring
from prerl_jax.rl.batch import from_token_lists
from prerl_jax.models.loading import random_model
from prerl_jax.models.config import ModelConfig

CONFIG = ModelConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16)
BOS = 1


@pytest.fixture(scope="module")
def model():
  return random_model(CONFIG, seed=5)


def test_alignment_matches_explicit_gradients(model):
  batch = from_token_lists([[BOS], [7, 8, 9, 10]], [[20, 21, 22], [30, 31, 32, 33]], 0)
  result = grad_alignment.alignment(model, batch, BOS)
  # Row 0's prompt is the BOS alone, so both spaces are the same: cosine 1, inner = |g|^2.
  assert result["cosine"][0] == pytest.approx(1.0, abs=1e-5)
  assert result["inner"][0] == pytest.approx(result["marginal_norm"][0] ** 2, rel=1e-5)
  np.testing.assert_allclose(result["conditional_logp"][0], result["marginal_logp"][0], atol=1e-6)
  graphdef, params = nnx.split(model)
  row = batch.rows(1, 2)

  def flat_grad(conditional):
    grads = jax.grad(lambda p: jnp.sum(scoring.response_logprobs(
        nnx.merge(graphdef, p), row, conditional, bos_id=BOS)[0]))(params)
    return np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])

  marginal, conditional = flat_grad(False), flat_grad(True)
  assert result["inner"][1] == pytest.approx(float(marginal @ conditional), rel=1e-4)
  cosine = marginal @ conditional / np.linalg.norm(marginal) / np.linalg.norm(conditional)
  assert result["cosine"][1] == pytest.approx(float(cosine), abs=1e-5)
  assert abs(result["cosine"][1]) < 0.999


def test_summary_numbers():
  result = {"inner": np.array([2.0, -1.0, 5.0, 2.0]), "cosine": np.array([0.5, -0.1, 0.3, 0.2]),
            "conditional_logp": np.array([[-1.0, -2.0], [-1.0, 0.0], [0, 0], [0, 0]]),
            "marginal_logp": np.array([[-3.0, -2.0], [-2.0, 0.0], [0, 0], [0, 0]])}
  mask = np.array([[True, True], [True, False], [False, False], [False, False]])
  summary = grad_alignment.summarize(result, mask)
  assert (summary["inner_mean"], summary["inner_min"], summary["inner_max"]) == (2.0, -1.0, 5.0)
  assert summary["percent_negative"] == 25.0
  assert summary["cosine_mean"] == pytest.approx(0.225)
  assert summary["token_logp_diff_mean"] == pytest.approx(1.0)  # (2 + 0 + 1) / 3 tokens.
