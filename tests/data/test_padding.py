"""Padding and bucket rules: left-padded prompts, right-padded responses, bucketed widths."""

import numpy as np
import pytest

from prerl_jax.data import padding


def test_left_pad_puts_each_row_at_the_right_edge():
  tokens, mask = padding.left_pad([[5, 6], [], [7, 8, 9]], pad_id=0, width=4)
  np.testing.assert_array_equal(tokens, [[0, 0, 5, 6], [0, 0, 0, 0], [0, 7, 8, 9]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]])
  assert tokens.dtype == np.int32 and mask.dtype == bool


def test_right_pad_defaults_to_the_longest_row():
  tokens, mask = padding.right_pad([[5], [6, 7, 8]], pad_id=2)
  np.testing.assert_array_equal(tokens, [[5, 2, 2], [6, 7, 8]])
  np.testing.assert_array_equal(mask, [[1, 0, 0], [1, 1, 1]])


def test_a_row_longer_than_the_width_is_an_error():
  with pytest.raises(ValueError, match="3 tokens does not fit the padded width 2"):
    padding.left_pad([[1, 2, 3]], 0, width=2)


def test_bucket_picks_the_smallest_that_holds_and_names_them_when_none_does():
  assert padding.bucket(64, (64, 128)) == 64
  assert padding.bucket(65, (64, 128)) == 128
  with pytest.raises(ValueError, match="largest prompt bucket 128"):
    padding.bucket(129, (64, 128), "prompt bucket")


@pytest.mark.parametrize("longest, cap, width", [
    (1, 128, 32), (32, 128, 32), (33, 128, 64), (64, 128, 64), (65, 128, 128), (128, 128, 128),
    (10, 16, 16), (90, 96, 96)])
def test_doubling_bucket_rounds_up_to_doublings_of_32_capped(longest, cap, width):
  assert padding.doubling_bucket(longest, cap) == width
