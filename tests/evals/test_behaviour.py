"""Tests for reasoning-behaviour metrics: thought counts, group outcomes, batch means."""

import numpy as np
import pytest

from prerl_jax.evals import behaviour

RESPONSE = """Let x = 3.

Wait, that is wrong. x = 4.

Waiting is not reflection here.

Let me check: 4 + 1 = 5. Good.

Alternatively, solve it another way.

We could THINK DIFFERENTLY about it.
Still the same paragraph, hold on.

\\boxed{4}"""


def test_thought_counts():
  assert len(behaviour.paragraphs(RESPONSE)) == 7
  assert behaviour.count_thoughts(RESPONSE, behaviour.REFLECTION) == 3
  assert behaviour.count_thoughts(RESPONSE, behaviour.TRANSITION) == 2
  assert behaviour.count_thoughts("", behaviour.REFLECTION) == 0


def test_custom_keywords():
  keywords = behaviour.ThoughtKeywords(starts=("Hmm",), phrases=("Double-Check",))
  text = "hmm, odd.\n\nhmmm.\n\nI double-check it.\n\nDone."
  assert behaviour.count_thoughts(text, keywords) == 2


def test_group_outcomes():
  rewards = np.array([1, 1, 1, 0, 0, 0, 1, 0, 0.5, 1, 1, 1])
  assert behaviour.group_outcomes(rewards, 3) == (2, 1)
  with pytest.raises(ValueError, match="12 rewards do not split into groups of 5"):
    behaviour.group_outcomes(rewards, 5)


def test_behaviour_metrics_batch_means():
  texts = [RESPONSE, "plain", "wait.\n\nAnother approach.", "x"]
  metrics = behaviour.behaviour_metrics(texts, [100, 10, 30, 20], [True, False, False, False],
                                        np.array([1, 1, 0, 0]), group_size=2)
  assert metrics == {
      "response_tokens": 40.0,
      "reflection_thoughts": 1.0,
      "transition_thoughts": 0.75,
      "truncated_fraction": 0.25,
      "all_correct_groups": 1.0,
      "all_wrong_groups": 1.0,
  }
