"""Tests for unbiased pass@k and mean@k against the closed form."""

import math

import numpy as np
import pytest

from prerl_jax.evals import pass_at_k


@pytest.mark.parametrize("n, c, k", [(20, 0, 1), (20, 1, 1), (20, 3, 4), (20, 19, 16), (8, 5, 2),
                                     (64, 7, 32), (1, 1, 1), (16, 10, 8)])
def test_pass_at_k_equals_closed_form(n, c, k):
  expected = 1 - math.comb(n - c, k) / math.comb(n, k)
  assert pass_at_k.pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_pass_at_k_is_stable_for_large_n():
  assert pass_at_k.pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000, rel=1e-9)
  assert pass_at_k.pass_at_k(2000, 1, 1000) == pytest.approx(0.5, rel=1e-9)
  assert pass_at_k.pass_at_k(2000, 1990, 11) == 1.0


def test_pass_at_ks_and_mean_over_problems():
  rewards_PxN = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], np.float32)
  result = pass_at_k.pass_at_ks(rewards_PxN)
  assert list(result) == [1, 2, 4]
  assert result[1] == pytest.approx((1 / 4 + 2 / 4 + 0) / 3)
  assert result[2] == pytest.approx((1 / 2 + 5 / 6 + 0) / 3)
  assert result[4] == pytest.approx(2 / 3)
  assert pass_at_k.mean_at_k(rewards_PxN) == pytest.approx(3 / 12)


def test_partial_credit_is_not_correct_and_ks():
  assert pass_at_k.mean_at_k(np.array([[0.5, 1.0]])) == 0.5
  assert pass_at_k.power_of_two_ks(20) == [1, 2, 4, 8, 16]
  assert pass_at_k.power_of_two_ks(1) == [1]
  with pytest.raises(ValueError, match="n=4, c=5, k=1"):
    pass_at_k.pass_at_k(4, 5, 1)
