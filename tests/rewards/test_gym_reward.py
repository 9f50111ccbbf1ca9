"""Tests for the reasoning-gym reward on chain_sum: extraction, score_answer, scorer errors."""

import numpy as np
import pytest

from prerl_jax.data import datasets
from prerl_jax.rewards import gym_reward

CHAIN_SUM_EASY = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}


@pytest.fixture(scope="module")
def chain_sum():
  return datasets.gym_dataset("chain_sum", size=8, seed=3, **CHAIN_SUM_EASY)


@pytest.mark.parametrize("answer_format, template", [
    ("answer_tags", "Adding up... <answer>{}</answer>"),
    ("boxed", "so the sum is \\boxed{{{}}}."),
    ("last_line", "4 plus 5\n\n{}\n"),
])
def test_correct_answers_score_one_end_to_end(chain_sum, answer_format, template):
  problems = datasets.gym_problems(chain_sum, answer_format)
  responses = [template.format(p.ground_truth) for p in problems]
  result = gym_reward.score_gym(chain_sum, responses, [p.gym_entry for p in problems],
                                answer_format)
  np.testing.assert_array_equal(result.rewards, np.ones(8))
  assert result.counts == {"missing_answers": 0, "scorer_errors": 0}


def test_wrong_and_missing_answers(chain_sum):
  entries = [chain_sum[0], chain_sum[1], chain_sum[2]]
  wrong = str(int(entries[1]["answer"]) + 1)
  responses = [f"<answer>{entries[0]['answer']}</answer>", f"<answer>{wrong}</answer>",
               f"the answer is {entries[2]['answer']}"]
  result = gym_reward.score_gym(chain_sum, responses, entries)
  assert result.rewards.tolist() == [1, 0, 0]
  assert result.missing_answers == 1


class _BrokenScorer:
  def score_answer(self, answer, entry):
    if answer == "boom":
      raise RuntimeError("scorer bug")
    return 1.0


def test_scorer_exception_scores_zero_and_is_counted():
  result = gym_reward.score_gym(_BrokenScorer(), ["<answer>boom</answer>", "<answer>1</answer>"],
                                [{}, {}])
  assert result.rewards.tolist() == [0, 1]
  assert result.scorer_errors == 1
