"""reasoning-gym reward: the answer in the task's format, scored by the dataset's score_answer."""

import dataclasses
import logging
from typing import Any

import numpy as np

from prerl_jax.rewards import answers


@dataclasses.dataclass(frozen=True)
class GymRewards:
  """Rewards in [0, 1] from a reasoning-gym scorer, and why some scored 0."""

  rewards: np.ndarray  # float32, one per response.
  missing_answers: int  # No answer in the expected format.
  scorer_errors: int  # score_answer raised; the response scored 0.

  @property
  def counts(self) -> dict[str, int]:
    return {"missing_answers": self.missing_answers, "scorer_errors": self.scorer_errors}


def score_gym(gym_dataset, responses: list[str], entries: list[dict[str, Any]],
              answer_format: str = "answer_tags") -> GymRewards:
  """Scores responses against reasoning-gym entries with `gym_dataset.score_answer`."""
  if len(responses) != len(entries):
    raise ValueError(f"{len(responses)} responses but {len(entries)} reasoning-gym entries")
  rewards = np.zeros(len(responses), np.float32)
  missing = errors = 0
  for index, (response, entry) in enumerate(zip(responses, entries)):
    answer = answers.extract_answer(response, answer_format)
    if answer is None:
      missing += 1
      continue
    try:
      rewards[index] = float(gym_dataset.score_answer(answer, entry))
    except Exception as error:  # pylint: disable=broad-except
      errors += 1
      logging.warning("reasoning-gym score_answer failed on response %d: %r", index, error)
  return GymRewards(rewards, missing, errors)
