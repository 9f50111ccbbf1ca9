"""Evaluation: n samples per problem, mean@n, unbiased pass@k, behaviour metrics, a text table."""

import dataclasses
from typing import Any, Callable, Protocol

import numpy as np

from prerl_jax.evals import behaviour
from prerl_jax.data import datasets
from prerl_jax.rewards import gym_reward
from prerl_jax.rewards import math_reward
from prerl_jax.evals import pass_at_k
from prerl_jax.data import prompts

Generate = Callable[[list[list[int]], int], list[list[str]]]  # (prompt ids, n) -> n texts each.


class Scored(Protocol):
  """What a scorer returns: MathRewards or GymRewards."""

  rewards: np.ndarray
  counts: dict[str, int]


Scorer = Callable[[list[str], list[datasets.Problem]], Scored]


def math_scorer(pool: math_reward.MathVerifierPool) -> Scorer:
  """Scores responses to problems against their ground truths with math-verify."""
  return lambda responses, problems: pool.score(responses, [p.ground_truth for p in problems])


def gym_scorer(gym_dataset, answer_format: str = "answer_tags") -> Scorer:
  """Scores responses to reasoning-gym problems with the dataset's score_answer."""
  return lambda responses, problems: gym_reward.score_gym(
      gym_dataset, responses, [p.gym_entry for p in problems], answer_format)


@dataclasses.dataclass(frozen=True)
class DatasetResult:
  """Evaluation of one dataset (JSON-serialisable with dataclasses.asdict)."""

  name: str
  num_problems: int
  samples_per_problem: int
  mean_at_n: float  # Fraction of correct samples.
  mean_reward: float
  pass_at_k: dict[int, float]
  behaviour: dict[str, float]
  reward_counts: dict[str, int]
  prompts_truncated: int
  problem_ids: list[str]  # Problem.index, in evaluation order.
  correct_per_problem: list[int]  # Correct samples of each problem, for paired comparisons.


def evaluate_dataset(name: str, problems: list[datasets.Problem], generate: Generate,
                     scorer: Scorer,
                     encode: Callable[[datasets.Problem], prompts.EncodedPrompt], *,
                     samples_per_problem: int, count_tokens: Callable[[str], int],
                     max_response_tokens: int, prompts_per_call: int | None = None,
                     dedupe: bool = False) -> DatasetResult:
  """Samples n responses per problem with `generate`, scores them and summarises.

  A response counts as truncated when it has at least max_response_tokens tokens. With
  dedupe=True repeated problems (the "20 times" eval sets) are evaluated once each.
  """
  if dedupe:
    problems = datasets.dedupe_problems(problems)
  if not problems:
    raise ValueError(f"{name}: no problems to evaluate")
  n = samples_per_problem
  encoded = [encode(p) for p in problems]
  chunk_size = prompts_per_call or len(problems)
  responses = []
  for start in range(0, len(problems), chunk_size):
    chunk = encoded[start:start + chunk_size]
    outputs = generate([e.ids for e in chunk], n)
    if len(outputs) != len(chunk) or any(len(group) != n for group in outputs):
      raise ValueError(f"{name}: generate must return {n} responses for each of "
                       f"{len(chunk)} prompts")
    responses.extend(text for group in outputs for text in group)
  repeated = [p for p in problems for _ in range(n)]
  scored = scorer(responses, repeated)
  num_tokens = [count_tokens(text) for text in responses]
  rewards_PxN = np.asarray(scored.rewards, np.float32).reshape(len(problems), n)
  return DatasetResult(
      name=name, num_problems=len(problems), samples_per_problem=n,
      mean_at_n=pass_at_k.mean_at_k(rewards_PxN), mean_reward=float(rewards_PxN.mean()),
      pass_at_k=pass_at_k.pass_at_ks(rewards_PxN),
      behaviour=behaviour.behaviour_metrics(
          responses, num_tokens, [t >= max_response_tokens for t in num_tokens],
          scored.rewards, group_size=n),
      reward_counts=dict(scored.counts),
      prompts_truncated=sum(e.truncated for e in encoded),
      problem_ids=[p.index for p in problems],
      correct_per_problem=pass_at_k.correct_matrix(rewards_PxN).sum(axis=1).tolist())


def format_table(results: list[DatasetResult]) -> str:
  """A plain-text table, one row per dataset: accuracy, pass@k, behaviour, reward counts."""
  ks = sorted({k for r in results for k in r.pass_at_k})
  header = (["dataset", "problems", "n", "mean@n"] + [f"pass@{k}" for k in ks]
            + ["tokens", "reflect", "transit", "trunc%", "all_ok", "all_bad", "reward issues"])
  rows = [header]
  for r in results:
    b = r.behaviour
    rows.append(
        [r.name, str(r.num_problems), str(r.samples_per_problem), _percent(r.mean_at_n)]
        + [_percent(r.pass_at_k[k]) if k in r.pass_at_k else "-" for k in ks]
        + [f"{b['response_tokens']:.0f}", f"{b['reflection_thoughts']:.2f}",
           f"{b['transition_thoughts']:.2f}", _percent(b["truncated_fraction"]),
           f"{b['all_correct_groups']:.0f}", f"{b['all_wrong_groups']:.0f}",
           " ".join(f"{key}={value}" for key, value in r.reward_counts.items() if value) or "-"])
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                   for row in rows)


def _percent(fraction: float) -> str:
  return f"{100 * fraction:.1f}"


def results_as_dicts(results: list[DatasetResult]) -> list[dict[str, Any]]:
  """Results as plain dicts for --json output."""
  return [dataclasses.asdict(r) for r in results]
