"""Tests for the evaluation library: sampling loop, pass@k, behaviour, the text table."""

import json
import math

import pytest

from prerl_jax.data import datasets
from prerl_jax.evals import evaluation
from prerl_jax.rewards import math_reward
from prerl_jax.data import prompts

N = 4


@pytest.fixture(scope="module")
def chain_sum():
  gym_dataset = datasets.gym_dataset("chain_sum", 4, seed=11, min_terms=2, max_terms=2,
                                     min_digits=1, max_digits=1)
  return gym_dataset, datasets.gym_problems(gym_dataset)


def _fake_generate(problems, calls):
  """Prompt i (its only token id) gets i correct answers among N, a reflection in the first."""
  def generate(prompt_ids, n):
    calls.append(len(prompt_ids))
    outputs = []
    for (problem_number,) in prompt_ids:
      truth = int(problems[problem_number].ground_truth)
      answers = [truth if s < problem_number else truth + 1 for s in range(n)]
      outputs.append([f"Wait, check.\n\n<answer>{a}</answer>" if s == 0 else f"<answer>{a}</answer>"
                      for s, a in enumerate(answers)])
    return outputs
  return generate


def _evaluate(problems, scorer, calls, **kwargs):
  unique = datasets.dedupe_problems(problems)
  encode = lambda p: prompts.EncodedPrompt([unique.index(p)], False)
  return evaluation.evaluate_dataset(
      "chain_sum", problems, _fake_generate(unique, calls), scorer, encode,
      samples_per_problem=N, count_tokens=len, max_response_tokens=30, **kwargs)


def test_evaluate_dataset_gym(chain_sum):
  gym_dataset, problems = chain_sum
  calls = []
  result = _evaluate(problems * 3, evaluation.gym_scorer(gym_dataset), calls, dedupe=True,
                     prompts_per_call=3)
  assert calls == [3, 1]
  assert (result.num_problems, result.samples_per_problem) == (4, N)
  assert result.mean_at_n == pytest.approx((0 + 1 + 2 + 3) / 16)
  assert result.correct_per_problem == [0, 1, 2, 3]
  assert result.problem_ids == [p.index for p in problems]
  for k in (1, 2, 4):
    expected = sum(1 - math.comb(N - c, k) / math.comb(N, k) for c in range(4)) / 4
    assert result.pass_at_k[k] == pytest.approx(expected)
  assert result.behaviour["reflection_thoughts"] == 0.25
  assert result.behaviour["all_wrong_groups"] == 1 and result.behaviour["all_correct_groups"] == 0
  assert result.behaviour["truncated_fraction"] == 0.25  # The 34-character "Wait" responses.
  assert result.reward_counts == {"missing_answers": 0, "scorer_errors": 0}
  json.dumps(evaluation.results_as_dicts([result]))


def test_evaluate_with_math_scorer():
  problems = [datasets.Problem(({"role": "user", "content": "1/2?"},), "\\frac12", "toy", "0")]
  generate = lambda ids, n: [["\\boxed{0.5}", "\\boxed{2}", "no box"]]
  with math_reward.MathVerifierPool(num_workers=1) as pool:
    result = evaluation.evaluate_dataset(
        "toy", problems, generate, evaluation.math_scorer(pool),
        lambda p: prompts.EncodedPrompt([1], True), samples_per_problem=3, count_tokens=len,
        max_response_tokens=100)
  assert result.mean_at_n == pytest.approx(1 / 3)
  assert result.pass_at_k == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
  assert result.reward_counts["missing_answers"] == 1
  assert result.prompts_truncated == 1


def test_generate_returning_wrong_count_is_an_error(chain_sum):
  gym_dataset, problems = chain_sum
  with pytest.raises(ValueError, match="chain_sum: generate must return 4 responses for each of 4"):
    evaluation.evaluate_dataset("chain_sum", problems, lambda ids, n: [["x"]] * len(ids),
                                evaluation.gym_scorer(gym_dataset),
                                lambda p: prompts.EncodedPrompt([0], False),
                                samples_per_problem=N, count_tokens=len, max_response_tokens=9)


def test_format_table(chain_sum):
  gym_dataset, problems = chain_sum
  result = _evaluate(problems, evaluation.gym_scorer(gym_dataset), [])
  lines = evaluation.format_table([result]).splitlines()
  assert lines[0].split() == ["dataset", "problems", "n", "mean@n", "pass@1", "pass@2", "pass@4",
                              "tokens", "reflect", "transit", "trunc%", "all_ok", "all_bad",
                              "reward", "issues"]
  assert lines[1].split() == ["chain_sum", "4", "4", "37.5", "37.5", "58.3", "75.0", "22",
                              "0.25", "0.00", "25.0", "0", "1", "-"]
