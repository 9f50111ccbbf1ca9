"""Reasoning-behaviour metrics: reflection / transition thoughts, lengths, group outcomes.

A response is split into paragraphs on blank lines; a paragraph is a thought of a kind when it
starts with one of the kind's opening words or contains one of its phrases (case-insensitive).
"""

import dataclasses
import re

import numpy as np

from prerl_jax.evals import pass_at_k


@dataclasses.dataclass(frozen=True)
class ThoughtKeywords:
  """Opening words and contained phrases that mark a paragraph as one kind of thought."""

  starts: tuple[str, ...]
  phrases: tuple[str, ...]

  def matches(self, paragraph: str) -> bool:
    text = paragraph.strip().lower()
    return (any(re.match(rf"{re.escape(word.lower())}\b", text) for word in self.starts)
            or any(phrase.lower() in text for phrase in self.phrases))


REFLECTION = ThoughtKeywords(
    starts=("wait",),
    phrases=("verify", "make sure", "hold on", "think again", "let me check"))
TRANSITION = ThoughtKeywords(
    starts=("alternatively",),
    phrases=("another way", "another approach", "another method", "think differently"))


def paragraphs(text: str) -> list[str]:
  """Non-blank paragraphs of a response, split on blank lines."""
  return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def count_thoughts(text: str, keywords: ThoughtKeywords) -> int:
  """Number of paragraphs of text that are thoughts of the given kind."""
  return sum(keywords.matches(p) for p in paragraphs(text))


def group_outcomes(rewards: np.ndarray, group_size: int) -> tuple[int, int]:
  """(all-correct, all-wrong) counts over groups of group_size consecutive responses."""
  rewards = np.asarray(rewards)
  if rewards.size % group_size:
    raise ValueError(f"{rewards.size} rewards do not split into groups of {group_size}")
  correct_GxN = pass_at_k.correct_matrix(rewards.reshape(-1, group_size))
  return int(correct_GxN.all(axis=1).sum()), int((~correct_GxN).all(axis=1).sum())


def behaviour_metrics(texts: list[str], num_tokens: list[int], truncated: list[bool],
                      rewards: np.ndarray, group_size: int,
                      reflection: ThoughtKeywords = REFLECTION,
                      transition: ThoughtKeywords = TRANSITION) -> dict[str, float]:
  """Batch means of per-response length and thought counts, truncation rate, group outcomes."""
  all_correct, all_wrong = group_outcomes(rewards, group_size)
  return {
      "response_tokens": float(np.mean(num_tokens)),
      "reflection_thoughts": float(np.mean([count_thoughts(t, reflection) for t in texts])),
      "transition_thoughts": float(np.mean([count_thoughts(t, transition) for t in texts])),
      "truncated_fraction": float(np.mean(truncated)),
      "all_correct_groups": float(all_correct),
      "all_wrong_groups": float(all_wrong),
  }
