"""Objectives as data: the Objective dataclass, named presets, and the loss an Objective defines.

An objective has up to two terms, one per scoring space, and a regularizer:

  L = rl_coef * L_post(conditional)  +  pretrain_coef * L_pre(marginal)  +  R

`space` switches the terms on: 'conditional' keeps the first, 'marginal' the second, 'both' both.
The conditional term uses `sample_selection` and `advantage`; the marginal term uses
`pretrain_sample_selection` and `pretrain_advantage` (the reference's separate
positive/negative_rl and positive/negative_pretrain flags). The fields of a switched-off term are
unused. Coefficients always apply, so a pure pre-train objective (nsr_prerl, ...) is
pretrain_coef * L_pre, as the reference's pretrain_only mode. Each term is the clipped surrogate
per token, aggregated over the tokens of the selected responses of its space.

R = kl_coef * KL(conditional, ref) - entropy_coef * entropy(conditional), per token, aggregated
over ALL responses, scaled by neither coefficient, and absent from objectives without a
conditional term (pretrain-only: the reference computes no reference log-probs there). That is
the reference's placement (regularizer_scope='conditional_all'). regularizer_scope=
'per_term_kept' instead adds kl_coef * KL - entropy_coef * entropy to each term's token loss, in
that term's space, over its selected responses, scaled by its coefficient.

How the train step uses it (the Objective is hashable: pass it as a static argument):
  once per batch, outside the gradient: `advantages = advantages_for(objective, rewards_B, G)`
  (a dict space -> advantages_B; host or device) and, if micro-batching,
  `dens = batch_denominators(objective, advantages, mask_BxT)` over the FULL batch;
  in the loss: for each space in `objective.spaces`,
  `logp[space], entropy[space] = score(params, batch, conditional=(space == CONDITIONAL))`, then
  `loss, metric_sums = objective_loss(objective, logp, old_logp, advantages, mask_BxT,
  entropy=entropy, ref_logp=..., denominators=dens)` (ref_logp for `objective.kl_spaces`).
  Summing `loss` (and its gradient) over micro-batches that share the full-batch `dens` gives the
  full-batch loss exactly; sum `metric_sums` the same way, then `finalize_metrics`.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from prerl_jax.rl import losses as objectives

CONDITIONAL = "conditional"
MARGINAL = "marginal"
SPACES = (CONDITIONAL, MARGINAL, "both")
REGULARIZER_SCOPES = ("conditional_all", "per_term_kept")


class Term(NamedTuple):
  """One space's share of an objective."""

  coef: float
  sample_selection: str
  advantage: str


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a training step optimizes; defaults are the reference's (GRPO in post-train space)."""

  name: str
  space: str = CONDITIONAL
  rl_coef: float = 1.0
  pretrain_coef: float = 0.01  # The reference's pretrain_loss_coef.
  sample_selection: str = "all"
  advantage: str = "grpo"
  pretrain_sample_selection: str = "all"
  pretrain_advantage: str = "mean_centered"  # Reference: pretrain_norm_adv_by_std=False.
  w_reinforce_lambda: float = 0.1
  clip_low: float = 0.2
  clip_high: float = 0.2
  dual_clip: float | None = 10.0
  kl_coef: float = 0.0
  kl_estimator: str = "k3"  # verl's default kl_loss_type, low_var_kl.
  entropy_coef: float = 0.0
  aggregation: str = "token-mean"
  regularizer_scope: str = "conditional_all"  # Where KL and entropy apply (module docstring).

  def __post_init__(self):
    for key, choices in (("space", SPACES), ("sample_selection", objectives.SELECTIONS),
                         ("pretrain_sample_selection", objectives.SELECTIONS),
                         ("advantage", objectives.ADVANTAGES),
                         ("pretrain_advantage", objectives.ADVANTAGES),
                         ("kl_estimator", objectives.KL_ESTIMATORS),
                         ("aggregation", objectives.AGGREGATIONS),
                         ("regularizer_scope", REGULARIZER_SCOPES)):
      objectives.check_choice(key, getattr(self, key), choices)
    for key in ("rl_coef", "pretrain_coef", "w_reinforce_lambda", "clip_high", "kl_coef"):
      if getattr(self, key) < 0:
        raise ValueError(f"{key}={getattr(self, key)} must be >= 0")
    if not 0 <= self.clip_low < 1:
      raise ValueError(f"clip_low={self.clip_low} must be in [0, 1)")
    if self.dual_clip is not None and self.dual_clip <= 1:
      raise ValueError(f"dual_clip={self.dual_clip} must be > 1 (or None to turn it off)")

  @property
  def spaces(self) -> tuple[str, ...]:
    """The spaces this objective scores in, conditional first."""
    return (CONDITIONAL, MARGINAL) if self.space == "both" else (self.space,)

  @property
  def regularized_spaces(self) -> tuple[str, ...]:
    """The spaces whose KL and entropy terms enter the loss (when their coefficients are set)."""
    if self.regularizer_scope == "per_term_kept":
      return self.spaces
    return (CONDITIONAL,) if CONDITIONAL in self.spaces else ()

  @property
  def kl_spaces(self) -> tuple[str, ...]:
    """The spaces that need reference-policy log-probs: none unless kl_coef > 0."""
    return self.regularized_spaces if self.kl_coef > 0 else ()

  def term(self, space: str) -> Term:
    """Coefficient, sample selection and advantage estimator of one space's term."""
    if space not in self.spaces:
      raise ValueError(f"space={space!r} is not used by objective {self.name!r} {self.spaces}")
    if space == CONDITIONAL:
      return Term(self.rl_coef, self.sample_selection, self.advantage)
    return Term(self.pretrain_coef, self.pretrain_sample_selection, self.pretrain_advantage)


PRESETS = {
    o.name: o
    for o in (
        Objective("grpo"),
        Objective("nsr_rl", sample_selection="negative"),
        Objective("psr_rl", sample_selection="positive"),
        Objective("w_reinforce", advantage="w_reinforce"),
        Objective("prerl", space=MARGINAL),
        Objective("nsr_prerl", pretrain_sample_selection="negative", space=MARGINAL),
        Objective("psr_prerl", pretrain_sample_selection="positive", space=MARGINAL),
    )
}
_OVERRIDABLE = tuple(f.name for f in dataclasses.fields(Objective) if f.name != "name")


def get_objective(name: str, **overrides) -> Objective:
  """The named preset with `overrides` applied to its fields."""
  if name not in PRESETS:
    raise ValueError(f"unknown objective {name!r}; valid names: {sorted(PRESETS)}")
  unknown = sorted(set(overrides) - set(_OVERRIDABLE))
  if unknown:
    raise ValueError(f"unknown objective field(s) {unknown}; valid fields: {list(_OVERRIDABLE)}")
  return dataclasses.replace(PRESETS[name], **overrides)


def advantages_for(objective: Objective, rewards_B, group_size: int) -> dict[str, jax.Array]:
  """Advantages_B for each space of the objective; parameter-free, so computed once per batch."""
  return {
      space: objectives.compute_advantages(
          rewards_B, group_size, objective.term(space).advantage, objective.w_reinforce_lambda)
      for space in objective.spaces
  }


def _selected_mask(objective, space, advantages_B, mask_BxT):
  weights_B = objectives.selection_weights(advantages_B, objective.term(space).sample_selection)
  return mask_BxT.astype(jnp.float32) * weights_B[:, None]


class Denominators(NamedTuple):
  """A batch's aggregation denominators, shared by its micro-batches.

  terms: per space, over that space's selected responses; regularizer: over all responses (the
  conditional_all KL and entropy); rows: the number of responses in the batch.
  """

  terms: dict
  regularizer: jax.Array
  rows: int


def batch_denominators(objective: Objective, advantages: dict, mask_BxT,
                       max_len: int | None = None) -> Denominators:
  """The batch's Denominators; pass the full batch's to every micro-batch."""
  def denominator(m):
    return objectives.aggregation_denominator(m, objective.aggregation, max_len)
  return Denominators(
      terms={space: denominator(_selected_mask(objective, space, advantages[space], mask_BxT))
             for space in objective.spaces},
      regularizer=denominator(mask_BxT), rows=mask_BxT.shape[0])


def _require(arg: str, values, spaces):
  missing = [s for s in spaces if values is None or s not in values]
  if missing:
    raise ValueError(f"{arg} needs an entry for space(s) {missing}")


def _regularizer_per_token(objective: Objective, space: str, logp_BxT, ref_logp, entropy):
  """kl_coef * KL - entropy_coef * entropy per token in one space (0 when both are off)."""
  reg_BxT = jnp.zeros_like(logp_BxT)
  if objective.kl_coef > 0:
    reg_BxT = reg_BxT + objective.kl_coef * objectives.kl_per_token(
        logp_BxT, ref_logp[space], objective.kl_estimator)
  if objective.entropy_coef != 0:
    reg_BxT = reg_BxT - objective.entropy_coef * entropy[space].astype(jnp.float32)
  return reg_BxT


def objective_loss(objective: Objective, logp: dict, old_logp: dict | None, advantages: dict,
                   mask_BxT, *, ref_logp: dict | None = None, entropy: dict | None = None,
                   denominators: Denominators | None = None, max_len: int | None = None):
  """The scalar loss of one (micro-)batch and its additive metric sums.

  logp, old_logp, advantages, ref_logp, entropy are dicts keyed by space, with an entry for every
  space in `objective.spaces`: per-token (B, T) arrays over response positions, advantages (B,).
  mask_BxT marks response tokens (the same positions in both spaces). old_logp=None means
  on-policy (stop_gradient of logp, so rho == 1). ref_logp is required for `objective.kl_spaces`,
  entropy for `objective.regularized_spaces` when entropy_coef != 0; given otherwise they only
  feed metrics. `denominators` (from batch_denominators) default to this batch's own.

  Returns (loss, metric_sums): metric_sums maps '<space>/<metric>' to an additive (sum, count)
  pair: loss (the term before its coefficient), clip_frac, dual_clip_frac, approx_kl (old vs
  current), kept_frac (selected responses), and when given ref_kl and entropy (over all
  responses); 'regularizer/loss' (R) when R is on.
  """
  spaces = objective.spaces
  _require("logp", logp, spaces)
  _require("advantages", advantages, spaces)
  if old_logp is not None:
    _require("old_logp", old_logp, spaces)
  _require("ref_logp (kl_coef > 0)", ref_logp, objective.kl_spaces)
  if objective.entropy_coef != 0:
    _require("entropy (entropy_coef != 0)", entropy, objective.regularized_spaces)
  mask_BxT = mask_BxT.astype(jnp.float32)
  shared = batch_denominators(objective, advantages, mask_BxT, max_len)
  if denominators is not None:
    shared = denominators
  share = mask_BxT.shape[0] / shared.rows  # This batch's part of the shared denominators.
  per_term = objective.regularizer_scope == "per_term_kept"
  live_B = (jnp.sum(mask_BxT, axis=-1) > 0).astype(jnp.float32)
  loss = jnp.zeros((), jnp.float32)
  metric_sums = {}
  for space in spaces:
    term = objective.term(space)
    logp_BxT = logp[space].astype(jnp.float32)
    current_BxT = jax.lax.stop_gradient(logp_BxT)
    old_BxT = current_BxT if old_logp is None else old_logp[space].astype(jnp.float32)
    kept_BxT = _selected_mask(objective, space, advantages[space], mask_BxT)
    token_loss_BxT, clipped_BxT, dual_BxT = objectives.policy_loss_per_token(
        logp_BxT, old_BxT, advantages[space], objective.clip_low, objective.clip_high,
        objective.dual_clip)
    sums = {
        "clip_frac": objectives.masked_sum_count(clipped_BxT, kept_BxT),
        "dual_clip_frac": objectives.masked_sum_count(dual_BxT, kept_BxT),
        "approx_kl": objectives.masked_sum_count(old_BxT - current_BxT, kept_BxT),
        "kept_frac": (jnp.sum(kept_BxT.max(axis=-1)), jnp.sum(live_B)),
    }
    if ref_logp is not None and space in ref_logp:
      kl_BxT = objectives.kl_per_token(current_BxT, ref_logp[space], objective.kl_estimator)
      sums["ref_kl"] = objectives.masked_sum_count(kl_BxT, mask_BxT)
    if entropy is not None and space in entropy:
      sums["entropy"] = objectives.masked_sum_count(
          jax.lax.stop_gradient(entropy[space].astype(jnp.float32)), mask_BxT)
    if per_term:
      token_loss_BxT = token_loss_BxT + _regularizer_per_token(objective, space, logp_BxT,
                                                               ref_logp, entropy)
    numerator, _ = objectives.aggregate(token_loss_BxT, kept_BxT, objective.aggregation, max_len)
    sums["loss"] = (jax.lax.stop_gradient(numerator), shared.terms[space] * share)
    loss = loss + term.coef * objectives.safe_divide(numerator, shared.terms[space])
    metric_sums.update({f"{space}/{k}": v for k, v in sums.items()})
  regularized = objective.kl_coef > 0 or objective.entropy_coef != 0
  if regularized and not per_term and objective.regularized_spaces:
    reg_BxT = _regularizer_per_token(objective, CONDITIONAL,
                                     logp[CONDITIONAL].astype(jnp.float32), ref_logp, entropy)
    numerator, _ = objectives.aggregate(reg_BxT, mask_BxT, objective.aggregation, max_len)
    loss = loss + objectives.safe_divide(numerator, shared.regularizer)
    metric_sums["regularizer/loss"] = (jax.lax.stop_gradient(numerator),
                                       shared.regularizer * share)
  return loss, metric_sums


def finalize_metrics(metric_sums: dict) -> dict[str, jax.Array]:
  """Means from (sum, count) pairs, after summing them over micro-batches."""
  return {k: objectives.safe_divide(s, c) for k, (s, c) in metric_sums.items()}
