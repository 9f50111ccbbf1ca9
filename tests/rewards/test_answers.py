"""Tests for answer extraction: last boxed (nested braces), answer tags, final line."""

import time

import pytest

from prerl_jax.rewards import answers


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} and later \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\left\\{ 1, 2 \\right\\}}", "\\left\\{ 1, 2 \\right\\}"),
    ("$\\boxed{x^{2^{3}}}$ done", "x^{2^{3}}"),
    ("\\fbox{7}", "7"),
    ("\\boxed 9$ end", "9"),
    ("\\boxed{\\boxed{3}}", "3"),
    ("no box here", None),
    ("\\boxed{unclosed", None),
    ("\\boxed{7}. I used \\fbox.", "7"),
    ("\\fbox{7} and \\boxedfoo", "7"),
    ("\\boxed{7}\\fbox", "7"),
    ("\\boxed{5} then \\boxed{7", None),
    ("", None),
])
def test_last_boxed(text, expected):
  assert answers.last_boxed(text) == expected


def test_last_boxed_megabyte_string_is_fast():
  text = "x" * 1_000_000 + "\\boxed{" + "{" * 1_000_000
  start = time.monotonic()
  assert answers.last_boxed(text) is None
  assert answers.last_boxed("y" * 2_000_000 + "\\boxed{5}") == "5"
  assert time.monotonic() - start < 2.0


@pytest.mark.parametrize("text, expected", [
    ("think <answer> 12 </answer>", "12"),
    ("<answer>1</answer> no, <answer>-3</answer>", "-3"),
    ("<answer>open only", None),
    ("</answer> close only", None),
])
def test_last_answer_tag(text, expected):
  assert answers.last_answer_tag(text) == expected


def test_last_line_and_dispatch():
  assert answers.last_line("work\n\n  17  \n\n") == "17"
  assert answers.last_line(" \n") is None
  assert answers.extract_answer("a\n\\boxed{4}\n<answer>5</answer>", "boxed") == "4"
  assert answers.extract_answer("a\n\\boxed{4}\n<answer>5</answer>", "answer_tags") == "5"
  with pytest.raises(ValueError, match="'latex'.*boxed"):
    answers.extract_answer("x", "latex")
