"""Unbiased pass@k (Chen et al. 2021) and mean@k from n samples per problem."""

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """1 - C(n-c, k) / C(n, k), computed as a stable product: n samples, c correct."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def power_of_two_ks(n: int) -> list[int]:
  """k = 1, 2, 4, ... up to n."""
  return [2**i for i in range(n.bit_length()) if 2**i <= n]


def correct_matrix(rewards_PxN: np.ndarray) -> np.ndarray:
  """Which samples count as correct: reward 1 (full credit)."""
  return np.asarray(rewards_PxN) >= 1.0


def pass_at_ks(rewards_PxN: np.ndarray, ks: list[int] | None = None) -> dict[int, float]:
  """Mean over problems of pass@k for each k (default 1, 2, 4, ... up to n)."""
  correct_P = correct_matrix(rewards_PxN).sum(axis=1)
  n = rewards_PxN.shape[1]
  return {k: float(np.mean([pass_at_k(n, int(c), k) for c in correct_P]))
          for k in (ks or power_of_two_ks(n))}


def mean_at_k(rewards_PxN: np.ndarray) -> float:
  """Fraction of correct samples over all problems (mean@n, also called avg@n)."""
  return float(np.mean(correct_matrix(rewards_PxN)))
