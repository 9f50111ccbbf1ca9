"""A run's train.seed changes its data order and sampling key, not its problems or base weights."""

import jax
import numpy as np
import pytest

import run_fixtures
from prerl_jax.training import trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  model_dir = run_fixtures.save_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")))
  built = {}
  for seed in (0, 1):
    config = run_fixtures.tiny_config(
        "grpo", model_dir, str(tmp_path_factory.mktemp(f"seed_{seed}")), steps=8,
        overrides=[f"--config.train.seed={seed}"])
    built[seed] = trainer.Trainer(config)
  yield built
  for run in built.values():
    run.close()


def _order(run) -> list[str]:
  """Problem ids of the first four steps' batches."""
  iterator = run.batches()
  return [p.index for _ in range(4) for p in next(iterator)["problems"]]


def test_seed_changes_the_order_of_the_same_problems(runs):
  assert [p.index for p in runs[0].data.train] == [p.index for p in runs[1].data.train]
  assert _order(runs[0]) == _order(runs[0])  # The order is a function of the config.
  assert _order(runs[0]) != _order(runs[1])


def test_seed_changes_the_sampling_key_not_the_weights(runs):
  keys = [jax.random.key_data(runs[s].state.rng) for s in (0, 1)]
  assert not np.array_equal(*keys)
  weights = [jax.tree.leaves(runs[s].state.params) for s in (0, 1)]
  assert len(weights[0]) == len(weights[1]) > 0
  for first, second in zip(*weights):
    np.testing.assert_array_equal(first, second)
