"""Gradient alignment between the two spaces: <grad log P(y), grad log P(y|x)> per sample.

The paper's first-order argument (PAPER.md section 6): a step along R * grad log P(y) moves
log P(y|x) by eta * R * <grad log P(y), grad log P(y|x)>, so a positive inner product means a
pre-train-space update moves the conditional the same way.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prerl_jax.rl import scoring
from prerl_jax.models.decoder import Decoder
from prerl_jax.rl.batch import RolloutBatch

EARLY_TOKENS = 8  # The summary compares the first EARLY_TOKENS response tokens with the rest.


def alignment(model: Decoder, batch: RolloutBatch, bos_id: int,
              temperature=1.0) -> dict[str, np.ndarray]:
  """Per-sample gradient alignment of summed log P(y) (marginal) and log P(y|x) (conditional).

  Gradients are over all parameters, one sample at a time (two
  parameter-sized gradients live at once). Returns numpy arrays: inner_B, cosine_B,
  conditional_norm_B, marginal_norm_B, and the per-token conditional_logp_BxR, marginal_logp_BxR
  (0 at padding).
  """
  graphdef, params = nnx.split(model)

  @jax.jit
  def one(params, row):
    def summed(params, conditional):
      logp_1xR, _ = scoring.response_logprobs(nnx.merge(graphdef, params), row, conditional,
                                              temperature, bos_id)
      return jnp.sum(logp_1xR), logp_1xR[0]

    (_, conditional_R), conditional_grad = jax.value_and_grad(summed, has_aux=True)(params, True)
    (_, marginal_R), marginal_grad = jax.value_and_grad(summed, has_aux=True)(params, False)

    def dot(a, b):
      return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
                 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    inner = dot(marginal_grad, conditional_grad)
    conditional_norm = jnp.sqrt(dot(conditional_grad, conditional_grad))
    marginal_norm = jnp.sqrt(dot(marginal_grad, marginal_grad))
    return {"inner": inner, "cosine": inner / (conditional_norm * marginal_norm),
            "conditional_norm": conditional_norm, "marginal_norm": marginal_norm,
            "conditional_logp": conditional_R, "marginal_logp": marginal_R}

  rows = [one(params, batch.rows(i, i + 1)) for i in range(batch.num_rows)]
  return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


def summarize(result: dict[str, np.ndarray], response_mask_BxR) -> dict[str, float]:
  """Mean / min / max inner product, percent negative, mean cosine, token log-prob differences.

  token_abs_diff_early / _late: mean |log P(y_t|x) - log P(y_t)| over the first EARLY_TOKENS
  response tokens and over the rest (the paper: they differ on early tokens).
  """
  inner, mask = result["inner"], np.asarray(response_mask_BxR, bool)
  diff = np.abs(result["conditional_logp"] - result["marginal_logp"])
  early = mask & (np.arange(mask.shape[1])[None] < EARLY_TOKENS)
  late = mask & ~early
  return {
      "samples": int(len(inner)),
      "inner_mean": float(inner.mean()),
      "inner_min": float(inner.min()),
      "inner_max": float(inner.max()),
      "percent_negative": float(100 * np.mean(inner < 0)),
      "cosine_mean": float(result["cosine"].mean()),
      "token_logp_diff_mean": float(np.sum((result["conditional_logp"] - result["marginal_logp"])
                                           * mask) / max(mask.sum(), 1)),
      "token_abs_diff_early": float(diff[early].mean()) if early.any() else 0.0,
      "token_abs_diff_late": float(diff[late].mean()) if late.any() else 0.0,
  }
