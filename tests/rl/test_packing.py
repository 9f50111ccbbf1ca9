"""Sequence packing: the row layout, and packed loss, gradients and metrics equal to unpacked."""

import itertools

import jax
import numpy as np
import pytest
from flax import nnx

from prerl_jax.models.config import ModelConfig
from prerl_jax.models.loading import random_model
from prerl_jax.rl import losses, objective as oc, packing, train_step
from prerl_jax.rl.batch import rollout_batch

CONFIG = ModelConfig("qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True)
BOS = 1
GROUP = 4
BOTH = (oc.CONDITIONAL, oc.MARGINAL)
# Each loss case compiles two gradient programs, compared within 1e-6 (conftest.py).
pytestmark = pytest.mark.usefixtures("unoptimized_machine_code")


def make_batch(rows=8, seed=0, groups_share_prompts=False):
  """A long-tail mix: most responses short, one at the 12-column cap, one empty. Prompts are
  random per row, or one per group of GROUP rows (as a sampler's batch has them)."""
  rng = np.random.default_rng(seed)
  response_lengths = rng.integers(1, 4, rows)
  response_lengths[2], response_lengths[5] = 12, 0
  prompts, prompt_lengths = rng.integers(3, 128, (rows, 6)), rng.integers(1, 7, rows)
  if groups_share_prompts:
    prompts, prompt_lengths = prompts[::GROUP].repeat(GROUP, 0), prompt_lengths[::GROUP].repeat(
        GROUP)
  return rollout_batch(prompts, prompt_lengths,
                       rng.integers(3, 128, (rows, 12)), response_lengths,
                       rng.normal(-3.0, 0.5, (rows, 12)).astype(np.float32),
                       np.tile([1.0, 0.0, 0.0, 1.0], rows // 4))


def test_rows_hold_each_segment_with_positions_from_zero_and_point_at_its_tokens():
  batch = make_batch()
  packed = packing.pack(batch, BOTH, micro_batches=2, row_tokens=20, bos_id=BOS)
  prompt_len = batch.prompt_mask.sum(1)
  response_len = batch.response_mask.sum(1)
  seen = []
  for m in range(2):
    for slot, b in enumerate(packed.index[m]):
      if not packed.response_mask[m, slot].any():
        continue
      seen.append(int(b))
      np.testing.assert_array_equal(packed.response_mask[m, slot], batch.response_mask[b])
      tokens = np.flatnonzero(packed.token_slot[m] == slot)
      assert len(tokens) == response_len[b]
      np.testing.assert_array_equal(packed.token_target[m, tokens],
                                    batch.response_tokens[b, :response_len[b]])
      for space, context in ((oc.CONDITIONAL, batch.prompt_tokens[b][batch.prompt_mask[b]]),
                             (oc.MARGINAL, [BOS])):
        rows = packed.spaces[space]
        row = rows.token_row[m, tokens[0]]
        assert np.all(rows.token_row[m, tokens] == row)
        first = rows.predict_col[m, tokens[0]] - (len(context) - 1)
        fed = np.concatenate([context, batch.response_tokens[b, :response_len[b] - 1]])
        columns = slice(first, first + len(fed))
        np.testing.assert_array_equal(rows.tokens[m, row, columns], fed)
        np.testing.assert_array_equal(rows.positions[m, row, columns], np.arange(len(fed)))
        segment = rows.segment_ids[m, row, first]
        assert segment > 0 and np.sum(rows.segment_ids[m, row] == segment) == len(fed)
  assert sorted(seen) == [b for b in range(8) if response_len[b] > 0]  # The empty one: no slot.
  fed = prompt_len + response_len - 1
  loads = [sum(fed[b] for b, mask in zip(packed.index[m], packed.response_mask[m]) if mask.any())
           for m in range(2)]
  assert abs(loads[0] - loads[1]) <= fed.max()  # Cut by tokens: the longest first, then balanced.
  # Each space packs its own rows: 10 marginal segments of at most 12 tokens fill fewer rows of
  # 20 than their conditional segments (up to 6 + 12 - 1 = 17 tokens).
  conditional, marginal = packed.spaces[oc.CONDITIONAL], packed.spaces[oc.MARGINAL]
  assert conditional.tokens.shape[2] == marginal.tokens.shape[2] == 20
  assert marginal.tokens.shape[1] < conditional.tokens.shape[1]
  assert (marginal.segment_ids > 0).sum() < (conditional.segment_ids > 0).sum()
  # A row budget shorter than a space's longest segment is rounded up, per space.
  widths = {s: r.tokens.shape[2]
            for s, r in packing.pack(batch, BOTH, row_tokens=16, bos_id=BOS).spaces.items()}
  assert widths == {oc.CONDITIONAL: 32, oc.MARGINAL: 16}


def test_pack_errors_name_what_is_wrong():
  with pytest.raises(ValueError, match="bos_id="):
    packing.pack(make_batch(), BOTH)
  with pytest.raises(ValueError, match="unknown space 'post'"):
    packing.pack(make_batch(), ("post",))


accumulate = jax.jit(train_step.accumulate_gradients, static_argnums=(0, 3),
                     static_argnames=("group_size", "micro_batches", "bos_id",
                                      "other_space_metrics"))


def assert_packed_equals_unpacked(objective, batch, micro_batches=2, with_reference=False,
                                  share_prompts=False, attention="xla"):
  graphdef, params = nnx.split(random_model(CONFIG.replace(attention=attention), seed=4))
  reference = nnx.state(random_model(CONFIG, seed=5)) if with_reference else None
  options = dict(group_size=GROUP, micro_batches=micro_batches, bos_id=BOS,
                 other_space_metrics=True, reference=reference)
  spaces = train_step.scored_spaces(objective, other_space_metrics=True)
  packed = packing.pack(batch, spaces, micro_batches=micro_batches, bos_id=BOS,
                        share_prompts=share_prompts)
  grads, loss, sums, max_diff = accumulate(graphdef, params, batch, objective, **options)
  p_grads, p_loss, p_sums, p_max_diff = accumulate(graphdef, params, packed, objective, **options)
  assert abs(float(p_loss) - float(loss)) < 1e-6
  for a, b in zip(jax.tree.leaves(p_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4
  assert sums.keys() == p_sums.keys()
  for key in sums:
    np.testing.assert_allclose(np.asarray(p_sums[key]), np.asarray(sums[key]), rtol=1e-5,
                               atol=1e-5, err_msg=key)
  assert abs(float(p_max_diff) - float(max_diff)) < 1e-5
  return sums


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_packed_equals_unpacked_for_each_aggregation_with_kl_entropy_and_old_logp(aggregation):
  objective = oc.get_objective("grpo", space="both", aggregation=aggregation, kl_coef=0.05,
                               entropy_coef=0.01, sample_selection="negative")
  batch = make_batch()
  rng = np.random.default_rng(1)
  old = {s: (rng.normal(-3.0, 0.3, batch.response_mask.shape) * batch.response_mask
             ).astype(np.float32) for s in BOTH}
  sums = assert_packed_equals_unpacked(objective, batch.replace(old_logp=old),
                                       with_reference=True)
  assert float(sums["conditional/clip_frac"][0]) > 0  # The ratio is off 1: clipping is tested.


# Every preset, each with the next aggregation in turn; every aggregation is crossed with both
# spaces, KL, entropy and clipping in the test above.
@pytest.mark.parametrize("name, aggregation",
                         list(zip(sorted(oc.PRESETS), itertools.cycle(losses.AGGREGATIONS))))
def test_packed_equals_unpacked_for_every_preset(name, aggregation):
  assert_packed_equals_unpacked(oc.get_objective(name, aggregation=aggregation),
                                make_batch(rows=12, seed=2), micro_batches=3)


def test_shared_prompts_are_fed_once_per_segment_and_each_response_on_its_own_branch():
  batch = make_batch(rows=12, seed=3, groups_share_prompts=True)
  prompt_len = batch.prompt_mask.sum(1)
  response_len = batch.response_mask.sum(1)
  for micro_batches in (1, 2, 5):  # 3 prompts: 5 micro-batches cut each group in two.
    packed = packing.pack(batch, BOTH, micro_batches=micro_batches, bos_id=BOS,
                          share_prompts=True)
    rows = packed.spaces[oc.CONDITIONAL]
    assert packed.spaces[oc.MARGINAL].branch_ids is None  # A BOS is not worth sharing.
    fed_tokens = 0
    for m in range(micro_batches):
      live = packed.response_mask[m].any(axis=1)
      prompts = {int(b) // GROUP for b in packed.index[m][live]}
      # Whole groups per micro-batch while there are enough of them.
      assert micro_batches == 5 or all(
          (packed.index[m][live] // GROUP == g).sum() == (response_len[g * GROUP:][:GROUP] > 0)
          .sum() for g in prompts)
      fed_tokens += int((rows.segment_ids[m] > 0).sum())
      for slot in np.flatnonzero(live):
        b = packed.index[m, slot]
        tokens = np.flatnonzero(packed.token_slot[m] == slot)
        row, cols = rows.token_row[m, tokens[0]], rows.predict_col[m, tokens]
        context = batch.prompt_tokens[b][batch.prompt_mask[b]]
        # Token 0 is predicted by the prompt's last token; the others by the response's own
        # tokens, fed after the prompt's positions on one branch.
        assert rows.tokens[m, row, cols[0]] == context[-1]
        assert rows.branch_ids[m, row, cols[0]] == 0
        assert rows.positions[m, row, cols[0]] == len(context) - 1
        fed = cols[1:]  # The columns of response tokens 0 .. L - 2.
        np.testing.assert_array_equal(rows.tokens[m, row, fed],
                                      batch.response_tokens[b, :response_len[b] - 1])
        np.testing.assert_array_equal(rows.positions[m, row, fed],
                                      len(context) + np.arange(response_len[b] - 1))
        if len(fed):
          assert len(set(rows.branch_ids[m, row, fed])) == 1 and rows.branch_ids[m, row, fed[0]]
          segment = rows.segment_ids[m, row, fed[0]]
          first = np.flatnonzero(rows.segment_ids[m, row] == segment)[0]
          np.testing.assert_array_equal(rows.tokens[m, row, first:first + len(context)], context)
    pieces = {1: 1, 2: 1, 5: 2}[micro_batches]  # Prompt copies per group.
    expected = sum(prompt_len[g * GROUP] * pieces + (np.maximum(
        response_len[g * GROUP:][:GROUP] - 1, 0)).sum() for g in range(3))
    assert fed_tokens == expected


@pytest.mark.parametrize("name, micro_batches, attention", [
    ("grpo", 2, "xla"), ("nsr_prerl", 3, "chunked"), ("w_reinforce", 1, "xla")])
def test_shared_prompts_give_the_unshared_loss_gradients_and_metrics(name, micro_batches,
                                                                     attention):
  assert_packed_equals_unpacked(oc.get_objective(name, space="both"),
                                make_batch(rows=12, seed=2, groups_share_prompts=True),
                                micro_batches=micro_batches, share_prompts=True,
                                attention=attention)
