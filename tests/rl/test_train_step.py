"""Train step: objective gradients, micro-batching, phase switches, sharding, skipped updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from prerl_jax.rl import objective as oc
from prerl_jax.rl import schedule as phases, scoring, train_step
from prerl_jax.rl.batch import rollout_batch
from prerl_jax import sharding
from prerl_jax.models.loading import random_model
from prerl_jax.models.config import ModelConfig

CONFIG = ModelConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16)
BOS = 1
GROUP = 4
# Every test compiles train steps, compared with formulas or each other within 1e-7 to 1e-5.
pytestmark = pytest.mark.usefixtures("unoptimized_machine_code")


def make_batch(rows=8, seed=0):
  rng = np.random.default_rng(seed)
  prompt_lengths = rng.integers(1, 6, rows)
  response_lengths = rng.integers(1, 8, rows)
  return rollout_batch(
      rng.integers(3, 128, (rows, 5)), prompt_lengths, rng.integers(3, 128, (rows, 7)),
      response_lengths, np.full((rows, 7), -4.8, np.float32),
      np.tile([1.0, 0.0, 0.0, 1.0], rows // 4))


def split(seed=0):
  return nnx.split(random_model(CONFIG, seed=seed))


def host(tree):
  """A host copy of the arrays of a pytree (PRNG keys left out), safe from donation."""
  return jax.tree.map(lambda x: None if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                      else np.asarray(x), tree)


accumulate = jax.jit(train_step.accumulate_gradients, static_argnums=(0, 3),
                     static_argnames=("group_size", "micro_batches", "bos_id",
                                      "other_space_metrics"))


def assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def reinforce_grads(graphdef, params, batch, advantages_B, kept_B, coef, conditional):
  """Gradient of -coef * (sum over kept tokens of A * logp) / (kept tokens)."""
  mask_BxR = batch.response_mask * kept_B[:, None]

  def loss(params):
    logp, _ = scoring.response_logprobs(nnx.merge(graphdef, params), batch, conditional,
                                        bos_id=BOS)
    return -coef * jnp.sum(advantages_B[:, None] * logp * mask_BxR) / jnp.sum(mask_BxR)

  return jax.jit(jax.grad(loss))(params)


def test_nsr_prerl_gradient_is_the_explicit_formula():
  graphdef, params = split()
  batch = make_batch()
  grads, _, sums, _ = accumulate(
      graphdef, params, batch, oc.get_objective("nsr_prerl"), group_size=GROUP, bos_id=BOS)
  advantages = batch.rewards - 0.5  # Every group has two right and two wrong.
  kept = (advantages < 0).astype(jnp.float32)
  expected = reinforce_grads(graphdef, params, batch, advantages, kept, 0.01, False)
  assert_trees_close(grads, expected, 1e-7)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4
  assert float(sums["marginal/kept_frac"][0]) == 4  # The four wrong responses.


def test_pretrain_only_objective_ignores_kl_and_entropy():
  # The DSRL warm-up: no reference policy is needed, and the gradient is NSR-PreRL's alone.
  graphdef, params = split()
  batch = make_batch()
  plain = accumulate(graphdef, params, batch, oc.get_objective("nsr_prerl"), group_size=GROUP,
                     bos_id=BOS)
  regularized = accumulate(graphdef, params, batch,
                           oc.get_objective("nsr_prerl", kl_coef=0.1, entropy_coef=0.01),
                           group_size=GROUP, bos_id=BOS)
  assert_trees_close(regularized[0], plain[0], 0)
  assert float(regularized[1]) == float(plain[1])


def test_clipped_loss_with_old_equal_current_is_reinforce():
  graphdef, params = split()
  batch = make_batch()
  current, _ = scoring.response_logprobs(nnx.merge(graphdef, params), batch, True)
  objective = oc.get_objective("grpo")
  grads, _, sums, _ = accumulate(
      graphdef, params, batch.replace(old_logp={"conditional": current}), objective,
      group_size=GROUP)
  advantages = oc.advantages_for(objective, batch.rewards, GROUP)["conditional"]
  np.testing.assert_allclose(advantages, np.tile([0.866, -0.866, -0.866, 0.866], 2), atol=1e-3)
  expected = reinforce_grads(graphdef, params, batch, advantages, jnp.ones(8), 1.0, True)
  assert_trees_close(grads, expected, 1e-6)
  assert float(sums["conditional/clip_frac"][0]) == 0


@pytest.mark.parametrize("name", ["grpo", "nsr_prerl"])
def test_four_micro_batches_equal_the_full_batch(name):
  graphdef, params = split()
  batch = make_batch(rows=16)
  objective = oc.get_objective(name)
  full = accumulate(graphdef, params, batch, objective, group_size=GROUP,
                    bos_id=BOS, other_space_metrics=True)
  micro = accumulate(graphdef, params, batch, objective, group_size=GROUP,
                     micro_batches=4, bos_id=BOS, other_space_metrics=True)
  assert_trees_close(micro[0], full[0], 1e-6)
  assert abs(float(micro[1]) - float(full[1])) < 1e-6
  for key, value in oc.finalize_metrics(full[2]).items():
    assert float(oc.finalize_metrics(micro[2])[key]) == pytest.approx(float(value), abs=1e-6)
  assert float(micro[3]) == pytest.approx(float(full[3]), abs=1e-6)


def test_dsrl_switch_step_and_resets():
  switch = 3
  schedule = phases.dsrl_schedule(switch, reset_optimizer=True, reset_reference=True)
  optimizer = train_step.make_optimizer(1e-3)
  graphdef, state = train_step.init_train_state(random_model(CONFIG), optimizer,
                                                with_reference=True)
  steps = {name: train_step.make_train_step(graphdef, oc.get_objective(name), optimizer,
                                            group_size=GROUP, bos_id=BOS)
           for name in ("nsr_prerl", "grpo")}
  trained = []
  for step in range(1, switch + 2):
    assert int(state.step) + 1 == step
    if schedule.is_switch(step):
      assert step == switch
      assert int(state.opt_state[1][0].count) == switch - 1
      state = train_step.enter_phase(state, schedule.phase_at(step), optimizer)
      fresh = optimizer.init(state.params)
      assert_trees_close(state.opt_state, fresh, 0)
      assert_trees_close(state.reference, state.params, 0)
    objective = schedule.objective_at(step)
    trained.append(objective.name)
    state, _ = steps[objective.name](state, make_batch(seed=step))
  assert trained == ["nsr_prerl"] * (switch - 1) + ["grpo"] * 2
  assert int(state.opt_state[1][0].count) == 2  # Counted again from the switch.
  # Without resets, moments and reference carry across the switch.
  reference = host(state.reference)
  carried = train_step.enter_phase(state, phases.Phase(oc.get_objective("grpo")), optimizer)
  assert int(carried.opt_state[1][0].count) == 2
  assert_trees_close(carried.reference, reference, 0)
  assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(host(carried.params)),
                                                  jax.tree.leaves(reference))) > 1e-4


SHARDED_OBJECTIVE = oc.get_objective("grpo", space="both", kl_coef=0.05)


@pytest.fixture(scope="module")
def single_device_step():
  """(optimizer, batch, host copy of the state and metrics) of one single-device step, the
  reference of both mesh shapes (make_train_step's program is compiled once per call)."""
  optimizer = optax.sgd(0.5)
  batch = make_batch(rows=16)
  graphdef, state = train_step.init_train_state(random_model(CONFIG), optimizer,
                                                with_reference=True)
  single = train_step.make_train_step(graphdef, SHARDED_OBJECTIVE, optimizer, group_size=GROUP,
                                      micro_batches=2, bos_id=BOS)
  return optimizer, batch, host(single(state, batch))


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (8, 1, 1)])
def test_sharded_step_equals_single_device(mesh_shape, single_device_step):
  assert jax.device_count() == 8
  optimizer, batch, (expected_state, expected) = single_device_step
  mesh = sharding.make_mesh(*mesh_shape)
  model = random_model(CONFIG, mesh=mesh)
  graphdef, state = train_step.init_train_state(model, optimizer, with_reference=True, mesh=mesh)
  sharded = train_step.make_train_step(graphdef, SHARDED_OBJECTIVE, optimizer, group_size=GROUP,
                                       micro_batches=2, bos_id=BOS, mesh=mesh, state=state)
  new_state, metrics = sharded(state, sharding.shard_batch(batch, mesh))
  assert len(new_state.params["layers"]["w_up"][...].sharding.device_set) == 8
  assert_trees_close(new_state.params, expected_state.params, 1e-5)
  assert metrics.keys() == expected.keys()
  for key, value in expected.items():
    assert float(metrics[key]) == pytest.approx(float(value), abs=1e-5), key
  assert float(expected["grad_norm"]) > 1e-2


def test_non_finite_loss_skips_the_update_and_counts_it():
  optimizer = train_step.make_optimizer(1e-3)
  graphdef, state = train_step.init_train_state(random_model(CONFIG), optimizer)
  step = train_step.make_train_step(graphdef, oc.get_objective("grpo"), optimizer,
                                    group_size=GROUP)
  before = host(state)
  bad = make_batch()
  bad = bad.replace(rewards=np.where(np.arange(8) == 0, np.nan, bad.rewards))
  state, metrics = step(state, bad)
  assert not np.isfinite(float(metrics["loss"]))
  assert (int(state.skipped), int(state.step), float(metrics["update_skipped"])) == (1, 1, 1.0)
  assert_trees_close(state.params, before.params, 0)
  assert_trees_close(state.opt_state, before.opt_state, 0)
  state, metrics = step(state, make_batch())
  assert (int(state.skipped), int(state.step), float(metrics["skipped_updates"])) == (1, 2, 1.0)
  assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(host(state.params)),
                                                  jax.tree.leaves(before.params))) > 1e-4


def test_errors_name_what_is_missing():
  graphdef, _ = split()
  optimizer = train_step.make_optimizer()
  with pytest.raises(ValueError, match="bos_id="):
    train_step.make_train_step(graphdef, oc.get_objective("nsr_prerl"), optimizer,
                               group_size=GROUP)
  with pytest.raises(ValueError, match="state="):
    train_step.make_train_step(graphdef, oc.get_objective("grpo"), optimizer, group_size=GROUP,
                               mesh=sharding.make_mesh(8, 1, 1))
  graphdef, params = split()
  with pytest.raises(ValueError, match="with_reference=True"):
    train_step.accumulate_gradients(graphdef, params, make_batch(),
                                    oc.get_objective("grpo", kl_coef=0.1), group_size=GROUP)
  with pytest.raises(ValueError, match="micro_batches=3"):
    train_step.accumulate_gradients(graphdef, params, make_batch(), oc.get_objective("grpo"),
                                    group_size=GROUP, micro_batches=3)
