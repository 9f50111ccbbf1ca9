"""Pure jnp pieces of the RL losses: advantages, sample selection, PPO surrogate, KL, aggregation.

Every function here is shape-static and jit-friendly; the string and int arguments (estimator,
selection, aggregation mode, group size, max_len) are static. Rewards and advantages are per
response (`_B`, B = num_groups * group_size, each group's responses consecutive); per-token arrays
are `_BxT` over response positions, with a 0/1 `mask_BxT` marking real response tokens.
"""

import jax.numpy as jnp

ADVANTAGES = ("grpo", "mean_centered", "w_reinforce")
SELECTIONS = ("all", "negative", "positive")
KL_ESTIMATORS = ("k1", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-mean-token-sum-norm")

LOG_RATIO_CLAMP = 20.0  # |logp - old_logp| bound before exp, as in verl.
K3_CLAMP = 10.0  # |k3| bound per token, as verl's low_var_kl.


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
  """Raises ValueError naming `key` when `value` is not among `choices`."""
  if value not in choices:
    raise ValueError(f"{key}={value!r} is not one of {list(choices)}")


def _grouped(rewards_B, group_size: int):
  """rewards_B as float32 (num_groups, group_size); groups are consecutive responses."""
  rewards_B = jnp.asarray(rewards_B, jnp.float32)
  if group_size < 2:
    raise ValueError(f"group_size={group_size}: a group baseline needs at least 2 responses")
  if rewards_B.ndim != 1 or rewards_B.shape[0] % group_size:
    raise ValueError(
        f"rewards of shape {rewards_B.shape} do not split into groups of group_size={group_size}")
  return rewards_B.reshape(-1, group_size)


def _centered(rewards_NxG):
  """r - mean_group(r), exactly 0 where r equals its group's mean.

  A compiled group mean can be off by a rounding error (XLA multiplies the sum by 1 / G, inexact
  when G is not a power of two), so r - mean would be a few ulps from 0 at the mean and its sign
  would decide NSR / PSR selection; the exact 0 keeps such a response out of both, as the
  reference's division does. The rule: r is at the mean when G * r == sum_group(r) in float32,
  or when every reward of its group is equal. That test is exact when the rewards are multiples
  of 2^-k with G * max|r| * 2^k <= 2^24 (binary rewards, k / 2^m partial credit): then G * r and
  every partial sum are representable. Otherwise it holds up to the rounding of the float32 sum:
  a reward within that of the mean gets 0 (and when the mean is not a float32, no reward equals
  it exactly). Every other response keeps r - mean as computed.
  """
  group_size = rewards_NxG.shape[1]
  tied_Nx1 = rewards_NxG.max(axis=1, keepdims=True) == rewards_NxG.min(axis=1, keepdims=True)
  at_mean_NxG = group_size * rewards_NxG == rewards_NxG.sum(axis=1, keepdims=True)
  centered_NxG = rewards_NxG - rewards_NxG.mean(axis=1, keepdims=True)
  return jnp.where(tied_Nx1 | at_mean_NxG, 0.0, centered_NxG)


def mean_centered_advantages(rewards_B, group_size: int):
  """Dr. GRPO advantage r - mean_group(r), one value per response; 0 at the mean (_centered)."""
  return _centered(_grouped(rewards_B, group_size)).reshape(-1)


def grpo_advantages(rewards_B, group_size: int, eps: float = 1e-6):
  """GRPO advantage (r - mean_group r) / (std_group r + eps), with the unbiased (n - 1) std.

  A response at its group's mean (_centered), a tied group's included, gets exactly 0.
  """
  rewards_NxG = _grouped(rewards_B, group_size)
  std_Nx1 = rewards_NxG.std(axis=1, ddof=1, keepdims=True)
  return (_centered(rewards_NxG) / (std_Nx1 + eps)).reshape(-1)


def w_reinforce_advantages(rewards_B, lam: float = 0.1):
  """W-REINFORCE (arXiv 2506.01347) as an advantage: +lam for reward 1, -1 for reward 0.

  The companion paper's loss -(lam * sum_correct logp - sum_wrong logp) is the REINFORCE
  surrogate -A * logp with these advantages, so it shares the clipped-surrogate path. Rewards are
  binary; a fractional reward r gets lam * r - (1 - r). No group baseline is used.
  """
  rewards_B = jnp.asarray(rewards_B, jnp.float32)
  return lam * rewards_B - (1.0 - rewards_B)


def compute_advantages(rewards_B, group_size: int, estimator: str, w_reinforce_lambda: float = 0.1):
  """Advantages_B from rewards_B with the named estimator (one of ADVANTAGES)."""
  check_choice("advantage", estimator, ADVANTAGES)
  if estimator == "grpo":
    return grpo_advantages(rewards_B, group_size)
  if estimator == "mean_centered":
    return mean_centered_advantages(rewards_B, group_size)
  return w_reinforce_advantages(rewards_B, w_reinforce_lambda)


def selection_weights(advantages_B, selection: str):
  """Float 0/1 per response: 'all' keeps every one, 'negative' A < 0, 'positive' A > 0."""
  check_choice("sample_selection", selection, SELECTIONS)
  advantages_B = jnp.asarray(advantages_B)
  if selection == "all":
    return jnp.ones(advantages_B.shape, jnp.float32)
  kept_B = advantages_B < 0 if selection == "negative" else advantages_B > 0
  return kept_B.astype(jnp.float32)


def policy_loss_per_token(logp_BxT, old_logp_BxT, advantages, clip_low: float = 0.2,
                          clip_high: float = 0.2, dual_clip: float | None = 10.0):
  """PPO clipped surrogate per token, with dual-clip for negative advantages.

  loss = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high)), and where A < 0 it is
  further capped at -A * dual_clip (None turns dual-clip off). rho = exp(logp - old_logp), the
  log-ratio clamped to +-20. Defaults are the reference's (0.2 / 0.2, c = 10). `advantages` is
  (B,) per response or (B, T) per token.

  Returns (loss_BxT, clipped_BxT, dual_clipped_BxT): the 0/1 indicators are where the clipped term
  is the larger one (verl's clip fraction) and where the dual-clip cap is active.
  """
  logp_BxT = logp_BxT.astype(jnp.float32)
  advantages_BxT = jnp.asarray(advantages, jnp.float32)
  if advantages_BxT.ndim == 1:
    advantages_BxT = advantages_BxT[:, None]
  log_ratio_BxT = jnp.clip(logp_BxT - old_logp_BxT.astype(jnp.float32), -LOG_RATIO_CLAMP,
                           LOG_RATIO_CLAMP)
  ratio_BxT = jnp.exp(log_ratio_BxT)
  unclipped_BxT = -advantages_BxT * ratio_BxT
  clipped_term_BxT = -advantages_BxT * jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high)
  loss_BxT = jnp.maximum(unclipped_BxT, clipped_term_BxT)
  clipped_BxT = (clipped_term_BxT > unclipped_BxT).astype(jnp.float32)
  if dual_clip is None:
    return loss_BxT, clipped_BxT, jnp.zeros_like(loss_BxT)
  cap_BxT = -advantages_BxT * dual_clip
  negative_BxT = advantages_BxT < 0
  dual_clipped_BxT = (negative_BxT & (loss_BxT > cap_BxT)).astype(jnp.float32)
  loss_BxT = jnp.where(negative_BxT, jnp.minimum(loss_BxT, cap_BxT), loss_BxT)
  return loss_BxT, clipped_BxT, dual_clipped_BxT


def kl_per_token(logp_BxT, ref_logp_BxT, estimator: str = "k3"):
  """Per-token KL(pi || pi_ref) estimate on sampled tokens.

  'k1': logp - ref_logp. 'k3' (verl's "low_var_kl"): exp(d) - d - 1 with d = ref_logp - logp
  clamped to +-20, the result clamped to +-10 as in verl.
  """
  check_choice("kl_estimator", estimator, KL_ESTIMATORS)
  logp_BxT = logp_BxT.astype(jnp.float32)
  ref_logp_BxT = ref_logp_BxT.astype(jnp.float32)
  if estimator == "k1":
    return logp_BxT - ref_logp_BxT
  delta_BxT = jnp.clip(ref_logp_BxT - logp_BxT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  return jnp.clip(jnp.exp(delta_BxT) - delta_BxT - 1.0, -K3_CLAMP, K3_CLAMP)


def masked_sum_count(values_BxT, mask_BxT):
  """(sum of values over mask, mask count): an additive pair, mean = sum / count."""
  mask_BxT = mask_BxT.astype(jnp.float32)
  return jnp.sum(values_BxT.astype(jnp.float32) * mask_BxT), jnp.sum(mask_BxT)


def mean_entropy(entropy_BxT, mask_BxT):
  """Mean per-token entropy over the masked tokens (0 when the mask is empty)."""
  return safe_divide(*masked_sum_count(entropy_BxT, mask_BxT))


def aggregation_denominator(mask_BxT, mode: str, max_len: int | None = None):
  """The denominator `aggregate` uses; it depends on the mask only, never on parameters.

  max_len (seq-mean-token-sum-norm only) defaults to T, the padded response length.
  """
  check_choice("aggregation", mode, AGGREGATIONS)
  mask_BxT = mask_BxT.astype(jnp.float32)
  if mode == "token-mean":
    return jnp.sum(mask_BxT)
  if mode == "seq-mean-token-sum-norm":
    return jnp.asarray(mask_BxT.shape[-1] if max_len is None else max_len, jnp.float32)
  return jnp.sum((jnp.sum(mask_BxT, axis=-1) > 0).astype(jnp.float32))


def aggregate(loss_BxT, mask_BxT, mode: str, max_len: int | None = None):
  """Reduces per-token losses to (numerator, denominator); the loss is their ratio.

  The mask must already include the sample selection: a deselected response is absent from both
  parts. Numerators are sums over responses, so summing them over micro-batches and dividing once
  by the full batch's denominator reproduces the full-batch loss exactly. "Live" sequences have
  at least one masked token.

  | mode                      | numerator                      | denominator            |
  | token-mean                | sum of token losses            | number of tokens       |
  | seq-mean-token-mean       | sum over seqs of token means   | live sequences         |
  | seq-mean-token-sum        | sum of token losses            | live sequences         |
  | seq-mean-token-sum-norm   | sum of token losses            | max_len (a constant)   |

  seq-mean-token-sum-norm is Dr. GRPO's constant normalizer as verl defines it: max_len defaults
  to T, the padded response width, whatever the number of responses.
  """
  denominator = aggregation_denominator(mask_BxT, mode, max_len)
  mask_BxT = mask_BxT.astype(jnp.float32)
  token_sums_B = jnp.sum(loss_BxT.astype(jnp.float32) * mask_BxT, axis=-1)
  if mode == "seq-mean-token-mean":
    token_counts_B = jnp.sum(mask_BxT, axis=-1)
    return jnp.sum(token_sums_B / jnp.maximum(token_counts_B, 1.0)), denominator
  return jnp.sum(token_sums_B), denominator


def safe_divide(numerator, denominator):
  """numerator / denominator, 0 where the denominator is 0 (nothing survived); grad-safe."""
  return numerator / jnp.where(denominator > 0, denominator, 1.0)
