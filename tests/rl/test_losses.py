"""Tests for the loss pieces (objectives.py) and objectives as data (objective_config.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prerl_jax.rl import objective as oc
from prerl_jax.rl import losses as obj

# Unbiased std of [1, 0, 0, 0] is sqrt(0.75 / 3) = 0.5 (the biased one would be 0.433).
GRPO_1000 = [0.75 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6)]
SQRT_1_3 = math.sqrt(1 / 3)  # Unbiased std of [1, 1, 0, 0].


def test_grpo_advantages_unbiased_std_and_equal_groups():
  a = obj.grpo_advantages(jnp.array([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0.]), 4)
  h = 0.5 / (SQRT_1_3 + 1e-6)
  expected = [GRPO_1000[0]] + [GRPO_1000[1]] * 3 + [h, h, -h, -h] + [0.] * 8
  np.testing.assert_allclose(a, expected, rtol=1e-6, atol=1e-7)


def test_mean_centered_and_w_reinforce_advantages():
  np.testing.assert_allclose(obj.mean_centered_advantages([1, 0, 0, 0, 1, 1], 2),
                             [0.5, -0.5, 0, 0, 0, 0])
  np.testing.assert_allclose(obj.mean_centered_advantages([1., 0, 0, 0], 4),
                             [0.75, -0.25, -0.25, -0.25])
  np.testing.assert_allclose(obj.w_reinforce_advantages([1., 0, 1]), [0.1, -1.0, 0.1], rtol=1e-6)
  np.testing.assert_allclose(obj.compute_advantages([1., 0], 2, "w_reinforce", 0.5), [0.5, -1.0])


GROUP_BASELINES = tuple(e for e in obj.ADVANTAGES if e != "w_reinforce")


def _tied_group_advantages(rewards_B, group_size):
  advantages = {e: obj.compute_advantages(rewards_B, group_size, e) for e in GROUP_BASELINES}
  kept = {(e, s): obj.selection_weights(a, s)
          for e, a in advantages.items() for s in ("negative", "positive")}
  return advantages, kept


def test_tied_group_of_three_is_exactly_zero_under_jit():
  # The case: G = 3, rewards all 1 gave -0.0298 (GRPO) and -2.98e-8 (mean-centered);
  # eight groups, as XLA's vectorized group mean is the inexact one.
  advantages, kept = jax.jit(_tied_group_advantages, static_argnums=1)(jnp.ones(24), 3)
  for a in advantages.values():
    np.testing.assert_array_equal(a, np.zeros(24))
  assert sum(float(w.sum()) for w in kept.values()) == 0


def test_reward_at_its_group_mean_gets_exactly_zero_under_jit():
  # Issue 37: the mean is exactly 0.4375 (the fifth reward); it got -2.98e-8 (mean-centered) and
  # -9.6e-8 (GRPO), so NSR kept it.
  rewards = np.array([0.078125, 0.046875, 0.53125, 0.84375, 0.4375, 0.78125, 0.34375])
  advantages, kept = jax.jit(_tied_group_advantages, static_argnums=1)(jnp.asarray(rewards), 7)
  centered = rewards - rewards.mean()
  expected = {"mean_centered": centered, "grpo": centered / (rewards.std(ddof=1) + 1e-6)}
  for estimator, a in advantages.items():
    assert a[4] == 0, (estimator, a[4])
    np.testing.assert_allclose(a, expected[estimator], rtol=1e-6)
    assert kept[estimator, "negative"].tolist() == [1, 1, 0, 0, 0, 0, 1]
    assert kept[estimator, "positive"].tolist() == [0, 0, 1, 1, 0, 1, 0]


def _fractional_groups(group_size, num_groups, rng, off_by_one):
  """Integer numerators (num_groups, group_size) of rewards n / 2^16 in (0, 1), each group holding
  one reward mu whose group sum is G * mu (+ 1 with off_by_one: then mu sits 2^-16 / G below
  the mean). Every G * n and partial sum is below 2^24, so float32 holds them exactly."""
  groups = []
  for _ in range(num_groups):
    mu = rng.integers(2**14, 3 * 2**14)
    deviations = rng.integers(-200, 201, group_size - 1)
    deviations[-1] -= deviations.sum()
    deviations[0] += off_by_one
    groups.append(rng.permutation(np.append(mu + deviations, mu)))
  return np.array(groups)


@pytest.mark.slow  # 63 compilations: about 30 s on two busy cores.
def test_responses_at_their_group_mean_are_exactly_zero_under_jit_for_every_group_size():
  rng = np.random.default_rng(0)
  for group_size in range(2, 65):
    # Four tied groups of ones, four of 0.3, a mixed group [1, 0, 0, ...], then fractional groups
    # with a reward at their mean and fractional groups with one 2^-16 / G below it.
    tied = 8 * group_size
    mixed = np.zeros(group_size, np.float32)
    mixed[0] = 1.0
    numerators_NxG = np.concatenate([_fractional_groups(group_size, 4, rng, 0),
                                     _fractional_groups(group_size, 4, rng, 1)])
    fractional = numerators_NxG.reshape(-1) / 2**16
    rewards = jnp.asarray(
        np.concatenate([np.ones(tied // 2), np.full(tied // 2, 0.3), mixed, fractional]),
        jnp.float32)
    advantages, kept = jax.jit(_tied_group_advantages, static_argnums=1)(rewards, group_size)
    # The exact sign of each fractional reward's advantage: sign(G * n - sum of its group).
    sign_B = np.sign(group_size * numerators_NxG - numerators_NxG.sum(1, keepdims=True))
    sign_B = np.concatenate([np.zeros(tied), [1], -np.ones(group_size - 1), sign_B.reshape(-1)])
    for estimator, a in advantages.items():
      np.testing.assert_array_equal(np.sign(a), sign_B, err_msg=f"{group_size} {estimator}")
    fractional_NxG = fractional.reshape(-1, group_size)
    centered_NxG = fractional_NxG - fractional_NxG.mean(1, keepdims=True)
    np.testing.assert_allclose(advantages["mean_centered"][tied + group_size:],
                               centered_NxG.reshape(-1), rtol=1e-5, atol=1e-7)
    for (estimator, selection), weights in kept.items():
      np.testing.assert_array_equal(weights, sign_B == (1 if selection == "positive" else -1),
                                    err_msg=f"{group_size} {estimator} {selection}")
  with pytest.raises(ValueError, match="group_size=1"):  # No baseline: an error, not A = 0.
    jax.jit(_tied_group_advantages, static_argnums=1)(jnp.ones(3), 1)


@pytest.mark.parametrize("rewards,group_size,match", [
    ([1., 0, 0], 2, "group_size=2"),
    ([1., 0], 1, "group_size=1"),
])
def test_bad_groups_name_group_size(rewards, group_size, match):
  with pytest.raises(ValueError, match=match):
    obj.grpo_advantages(jnp.array(rewards), group_size)


def test_unknown_choices_name_the_key():
  with pytest.raises(ValueError, match="advantage='ppo'"):
    obj.compute_advantages([1., 0], 2, "ppo")
  with pytest.raises(ValueError, match="sample_selection='neg'"):
    obj.selection_weights(jnp.zeros(2), "neg")
  with pytest.raises(ValueError, match="aggregation='mean'"):
    obj.aggregate(jnp.zeros((1, 1)), jnp.ones((1, 1)), "mean")
  with pytest.raises(ValueError, match="kl_estimator='k2'"):
    obj.kl_per_token(jnp.zeros(1), jnp.zeros(1), "k2")


def test_selection_weights():
  a = jnp.array([1.5, -0.5, 0.0, -0.1])
  np.testing.assert_array_equal(obj.selection_weights(a, "all"), [1, 1, 1, 1])
  np.testing.assert_array_equal(obj.selection_weights(a, "negative"), [0, 1, 0, 1])
  np.testing.assert_array_equal(obj.selection_weights(a, "positive"), [1, 0, 0, 0])


LOSS = jnp.array([[1., 2, 3], [4, 5, 6], [7, 8, 9]])
MASK = jnp.array([[1., 1, 0], [1, 0, 0], [0, 0, 0]])  # The third row is empty.


@pytest.mark.parametrize("mode,max_len,numerator,denominator", [
    ("token-mean", None, 7.0, 3.0),
    ("seq-mean-token-mean", None, 1.5 + 4.0, 2.0),
    ("seq-mean-token-sum", None, 7.0, 2.0),
    ("seq-mean-token-sum-norm", 4, 7.0, 4.0),
    ("seq-mean-token-sum-norm", None, 7.0, 3.0),
])
def test_aggregate_hand_cases(mode, max_len, numerator, denominator):
  num, den = obj.aggregate(LOSS, MASK, mode, max_len)
  assert float(num) == pytest.approx(numerator)
  assert float(den) == pytest.approx(denominator)


def test_token_sum_norm_divides_by_the_padded_width_only():
  # The case: unit token losses, masks [1,1,0,0] and [1,1,1,1]: 6 / T = 1.5.
  mask = jnp.array([[1., 1, 0, 0], [1, 1, 1, 1]])
  loss = obj.safe_divide(*obj.aggregate(jnp.ones((2, 4)), mask, "seq-mean-token-sum-norm"))
  assert float(loss) == pytest.approx(1.5)


@pytest.mark.parametrize("mode", obj.AGGREGATIONS)
def test_four_micro_batches_reproduce_full_batch(mode):
  rng = np.random.default_rng(0)
  loss_BxT = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  lengths_B = np.array([6, 0, 3, 1, 5, 0, 2, 4])
  mask_BxT = jnp.asarray(np.arange(6)[None] < lengths_B[:, None], jnp.float32)
  numerator, denominator = obj.aggregate(loss_BxT, mask_BxT, mode, 10)
  parts = [obj.aggregate(loss_BxT[i:i + 2], mask_BxT[i:i + 2], mode, 10) for i in range(0, 8, 2)]
  assert abs(float(sum(p[0] for p in parts)) - float(numerator)) < 1e-6
  assert float(obj.aggregation_denominator(mask_BxT, mode, 10)) == float(denominator)
  if mode != "seq-mean-token-sum-norm":  # Its denominator is a constant, not a sum over rows.
    assert float(sum(p[1] for p in parts)) == float(denominator)


def test_safe_divide_empty_is_zero_with_finite_grad():
  g = jax.grad(lambda x: obj.safe_divide(*obj.aggregate(x, jnp.zeros((1, 2)), "token-mean")))
  np.testing.assert_array_equal(g(jnp.ones((1, 2))), [[0., 0.]])


def test_on_policy_clipped_gradient_is_reinforce():
  logp = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]])
  advantages = jnp.array([1.5, -0.5])

  def loss(x):
    token_loss, _, _ = obj.policy_loss_per_token(x, jax.lax.stop_gradient(x), advantages)
    return jnp.sum(token_loss)

  np.testing.assert_allclose(jax.grad(loss)(logp), [[-1.5] * 3, [0.5] * 3])


def test_clip_and_dual_clip_hand_cases():
  # Rows: (A, rho) = (-1, 20), (-1, 0.5), (2, 1.5), (2, 0.5).
  advantages = jnp.array([-1.0, -1.0, 2.0, 2.0])
  old = jnp.zeros((4, 1))
  logp = jnp.log(jnp.array([[20.0], [0.5], [1.5], [0.5]]))
  loss, clipped, dual = obj.policy_loss_per_token(logp, old, advantages)
  # -A*rho = 20 is capped at -A*c = 10; max(0.5, 0.8); max(-3, -2.4); max(-1, -1.6).
  np.testing.assert_allclose(loss[:, 0], [10.0, 0.8, -2.4, -1.0], rtol=1e-6)
  np.testing.assert_array_equal(clipped[:, 0], [0, 1, 1, 0])
  np.testing.assert_array_equal(dual[:, 0], [1, 0, 0, 0])
  no_dual, _, no_dual_flags = obj.policy_loss_per_token(logp, old, advantages, dual_clip=None)
  assert float(no_dual[0, 0]) == pytest.approx(20.0, rel=1e-6)
  assert float(no_dual_flags.sum()) == 0.0
  # A dual-clipped token is a constant: no gradient flows through it.
  g = jax.grad(lambda x: obj.policy_loss_per_token(x, old, advantages)[0].sum())(logp)
  assert float(g[0, 0]) == 0.0
  # Asymmetric clip: 1 + clip_high = 1.28 bounds a positive-advantage ratio of 1.5.
  wide, _, _ = obj.policy_loss_per_token(logp, old, advantages, clip_low=0.2, clip_high=0.28)
  assert float(wide[2, 0]) == pytest.approx(-2.56, rel=1e-6)


def test_kl_estimators():
  logp = jnp.array([-1.0, -2.0, 0.0, -100.0])
  ref = jnp.array([-2.0, -1.0, -100.0, 0.0])
  np.testing.assert_allclose(obj.kl_per_token(logp, ref, "k1"), [1.0, -1.0, 100.0, -100.0])
  # exp(d) - d - 1 with d = ref - logp: d=-1 -> e^-1, d=1 -> e - 2, |d| huge -> clamped to 10.
  np.testing.assert_allclose(obj.kl_per_token(logp, ref, "k3"),
                             [math.exp(-1), math.e - 2, 10.0, 10.0], rtol=1e-6)


def test_mean_entropy():
  assert float(obj.mean_entropy(LOSS, MASK)) == pytest.approx(7.0 / 3)
  assert float(obj.mean_entropy(LOSS, jnp.zeros_like(MASK))) == 0.0


# Four responses of one prompt with 2, 1, 2 and 3 response tokens.
BATCH_MASK = jnp.array([[1., 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]])


def test_presets_are_the_paper_table():
  spaces = {n: o.space for n, o in oc.PRESETS.items()}
  assert spaces == {"grpo": "conditional", "nsr_rl": "conditional", "psr_rl": "conditional",
                    "w_reinforce": "conditional", "prerl": "marginal", "nsr_prerl": "marginal",
                    "psr_prerl": "marginal"}
  nsr = oc.get_objective("nsr_prerl")
  assert nsr.term("marginal") == oc.Term(0.01, "negative", "mean_centered")
  assert oc.get_objective("psr_rl").term("conditional") == oc.Term(1.0, "positive", "grpo")
  assert oc.get_objective("w_reinforce").term("conditional").advantage == "w_reinforce"
  assert oc.get_objective("grpo", space="both").spaces == ("conditional", "marginal")
  assert len({oc.get_objective("grpo"), oc.get_objective("grpo")}) == 1  # Hashable, by value.


def test_objective_errors_name_the_key():
  with pytest.raises(ValueError, match="valid names: .*nsr_prerl"):
    oc.get_objective("nsr")
  with pytest.raises(ValueError, match=r"\['clip'\]; valid fields: .*clip_low"):
    oc.get_objective("grpo", clip=0.3)
  with pytest.raises(ValueError, match="space='pre'"):
    oc.get_objective("grpo", space="pre")
  with pytest.raises(ValueError, match="dual_clip=1.0"):
    oc.get_objective("grpo", dual_clip=1.0)
  with pytest.raises(ValueError, match="space='marginal' is not used"):
    oc.get_objective("grpo").term("marginal")


def test_objective_loss_both_spaces_hand_case():
  objective = oc.get_objective("grpo", space="both", pretrain_sample_selection="negative")
  rewards = jnp.array([1., 1, 0, 0])
  advantages = oc.advantages_for(objective, rewards, 4)
  logp = {s: jnp.full((4, 3), -1.0) for s in objective.spaces}
  loss, sums = oc.objective_loss(objective, logp, None, advantages, BATCH_MASK)
  a = 0.5 / (SQRT_1_3 + 1e-6)
  # Conditional: on-policy token loss -A over all 8 tokens: (-a * 3 + a * 5) / 8.
  # Marginal: A = r - 0.5, only the two wrong responses (5 tokens), token loss 0.5.
  expected = 2 * a / 8 + 0.01 * 0.5
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  metrics = oc.finalize_metrics(sums)
  assert float(metrics["marginal/kept_frac"]) == pytest.approx(0.5)
  assert float(metrics["conditional/kept_frac"]) == pytest.approx(1.0)
  assert float(metrics["marginal/loss"]) == pytest.approx(0.5)
  assert float(metrics["conditional/clip_frac"]) == 0.0


def test_objective_loss_nsr_prerl_gradient_and_coefficient():
  objective = oc.get_objective("nsr_prerl")
  advantages = oc.advantages_for(objective, jnp.array([1., 0, 0, 0]), 4)
  logp = jnp.full((4, 3), -1.0)

  def loss(x):
    return oc.objective_loss(objective, {"marginal": x}, None, advantages, BATCH_MASK)[0]

  # Three wrong responses kept, 1 + 2 + 3 = 6 tokens, A = -0.25: d/dlogp = 0.01 * 0.25 / 6.
  assert float(loss(logp)) == pytest.approx(0.01 * 0.25)
  g = 0.01 * 0.25 / 6
  np.testing.assert_allclose(jax.grad(loss)(logp),
                             [[0, 0, 0], [g, 0, 0], [g, g, 0], [g, g, g]], rtol=1e-6)


@pytest.mark.parametrize("scope", oc.REGULARIZER_SCOPES)
@pytest.mark.parametrize("mode", obj.AGGREGATIONS)
def test_objective_loss_micro_batches_with_shared_denominators(mode, scope):
  objective = oc.get_objective("grpo", space="both", aggregation=mode, kl_coef=0.1,
                               entropy_coef=0.01, pretrain_sample_selection="negative",
                               regularizer_scope=scope)
  rng = np.random.default_rng(1)
  rewards = jnp.asarray(rng.integers(0, 2, size=8), jnp.float32)
  lengths_B = np.array([3, 5, 1, 4, 2, 5, 5, 3])
  mask = jnp.asarray(np.arange(5)[None] < lengths_B[:, None], jnp.float32)
  arrays = {k: {s: jnp.asarray(rng.normal(size=(8, 5)) - 1, jnp.float32)
                for s in objective.spaces} for k in ("logp", "old", "ref", "entropy")}
  advantages = oc.advantages_for(objective, rewards, 4)

  def run(rows, dens=None):
    def cut(d):
      return {s: v[rows] for s, v in d.items()}
    return oc.objective_loss(objective, cut(arrays["logp"]), cut(arrays["old"]),
                             cut(advantages), mask[rows], ref_logp=cut(arrays["ref"]),
                             entropy=cut(arrays["entropy"]), denominators=dens, max_len=5)

  full_loss, full_sums = run(slice(0, 8))
  dens = oc.batch_denominators(objective, advantages, mask, max_len=5)
  parts = [run(slice(i, i + 2), dens) for i in range(0, 8, 2)]
  assert abs(sum(float(p[0]) for p in parts) - float(full_loss)) < 1e-6
  summed = jax.tree.map(lambda *x: sum(x), *[p[1] for p in parts])
  assert ("regularizer/loss" in full_sums) == (scope == "conditional_all")
  assert summed.keys() == full_sums.keys()
  for key, value in oc.finalize_metrics(summed).items():
    assert float(value) == pytest.approx(float(oc.finalize_metrics(full_sums)[key]), abs=1e-6)


def test_objective_loss_requires_reference_for_kl_and_jits():
  objective = oc.get_objective("grpo", kl_coef=0.1)
  args = ({"conditional": jnp.zeros((4, 3))}, None, {"conditional": jnp.ones(4)}, BATCH_MASK)
  with pytest.raises(ValueError, match=r"ref_logp \(kl_coef > 0\) needs .*'conditional'"):
    oc.objective_loss(objective, *args)
  step = jax.jit(oc.objective_loss, static_argnums=0)
  # k1 with ref = logp + 1 adds kl_coef * (-1) per token; on-policy pg token loss is -A = -1.
  loss, _ = step(oc.get_objective("grpo", kl_coef=0.1, kl_estimator="k1"), *args,
                 ref_logp={"conditional": jnp.ones((4, 3))})
  assert float(loss) == pytest.approx(-1.1)


# The KL and entropy cases: two one-token responses of one group, rewards [0, 1] (NSR
# keeps the first), per-token k1 KL 0.2 and 0.4, entropies 2 and 1.
def _two_responses_loss(objective, ref_logp=True):
  advantages = oc.advantages_for(objective, jnp.array([0., 1.]), 2)
  logp = {s: jnp.full((2, 1), -1.0) for s in objective.spaces}
  ref = {s: v - jnp.array([[0.2], [0.4]]) for s, v in logp.items()} if ref_logp else None
  entropy = {s: jnp.array([[2.0], [1.0]]) for s in objective.spaces}
  return oc.objective_loss(objective, logp, None, advantages, jnp.ones((2, 1)), ref_logp=ref,
                           entropy=entropy)


def _regularizer_share(name, **fields):
  """The loss with `fields` minus the loss without: what KL and entropy add."""
  with_fields = _two_responses_loss(oc.get_objective(name, **fields))[0]
  return float(with_fields - _two_responses_loss(oc.get_objective(name))[0])


@pytest.mark.parametrize("name,fields,expected", [
    # Over all responses, outside the coefficients: 0.05 * (0.2 + 0.4) / 2, -0.01 * (2 + 1) / 2.
    ("nsr_rl", {"kl_coef": 0.05}, 0.015),
    ("nsr_rl", {"entropy_coef": 0.01}, -0.015),
    ("grpo", {"kl_coef": 0.05, "space": "both"}, 0.015),
    # Pretrain-only objectives (the DSRL warm-up) carry neither.
    ("nsr_prerl", {"kl_coef": 0.05, "entropy_coef": 0.01}, 0.0),
    # per_term_kept: inside each term, over its kept responses, times its coefficient.
    ("nsr_rl", {"kl_coef": 0.05, "regularizer_scope": "per_term_kept"}, 0.010),
    ("nsr_rl", {"entropy_coef": 0.01, "regularizer_scope": "per_term_kept"}, -0.02),
    ("nsr_prerl", {"kl_coef": 0.05, "regularizer_scope": "per_term_kept"}, 0.01 * 0.05 * 0.2),
])
def test_kl_and_entropy_placement_hand_cases(name, fields, expected):
  fields = dict(fields, kl_estimator="k1")
  assert _regularizer_share(name, **fields) == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_kl_reaches_unselected_responses_and_skips_pretrain_only():
  objective = oc.get_objective("nsr_rl", kl_coef=0.05, kl_estimator="k1")
  advantages = oc.advantages_for(objective, jnp.array([0., 1.]), 2)

  def loss(logp_Bx1):
    ref = {"conditional": jnp.full((2, 1), -1.3)}
    return oc.objective_loss(objective, {"conditional": logp_Bx1}, None, advantages,
                             jnp.ones((2, 1)), ref_logp=ref)[0]

  # Row 0: pg (-A = 0.7071 per kept token, 1 token) + KL 0.05 / 2; row 1: KL only.
  a = 0.5 / (math.sqrt(0.5) + 1e-6)
  np.testing.assert_allclose(jax.grad(loss)(jnp.full((2, 1), -1.0))[:, 0],
                             [a + 0.025, 0.025], rtol=1e-5)
  pretrain_only = oc.get_objective("nsr_prerl", kl_coef=0.05)
  assert pretrain_only.kl_spaces == () and objective.kl_spaces == ("conditional",)
  loss_value, sums = _two_responses_loss(pretrain_only, ref_logp=False)  # No reference needed.
  assert float(loss_value) == pytest.approx(0.01 * 0.5)
  assert "regularizer/loss" not in sums


def test_regularizer_scope_is_validated():
  with pytest.raises(ValueError, match="regularizer_scope='kept'"):
    oc.get_objective("grpo", regularizer_scope="kept")
