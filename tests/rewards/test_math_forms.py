"""Tests for the answer forms math-verify misses: repeating decimals, constants, equation sides."""

import pytest
import sympy

from prerl_jax.rewards import math_forms


@pytest.mark.parametrize("latex, expected", [
    ("0.\\overline{3}", "{\\frac{1}{3}}"),
    ("-0.1\\overline{6}", "-{\\frac{1}{6}}"),
    (".\\bar{3}", "{\\frac{1}{3}}"),
    ("0.12\\overline{34}", "{\\frac{611}{4950}}"),
    ("0.\\dot{1}4285\\dot{7}", "{\\frac{1}{7}}"),
    ("2.(3)", "{\\frac{7}{3}}"),
    ("0.\\overline{9}", "1"),
    ("x.(3) + 2.5", "x.(3) + 2.5"),
    ("3.14", "3.14"),
])
def test_repeating_decimals_as_fractions(latex, expected):
  assert math_forms.repeating_decimals_as_fractions(latex) == expected


def test_with_constants_evaluates_the_imaginary_unit_and_e():
  i, e = sympy.Symbol("i", real=False), sympy.Symbol("e", real=True)
  assert math_forms.with_constants(sympy.exp(sympy.pi * i, evaluate=False)) == -1
  assert math_forms.with_constants(sympy.log(e)) == 1
  assert math_forms.with_constants("x = 1") == "x = 1"


def test_equations_count_only_with_a_name_first():
  x = sympy.Symbol("x")
  assert math_forms.equation_chains(sympy.FiniteSet(sympy.Eq(x, 2, evaluate=False))) == [[x, 2]]
  numbers_equal = lambda a, b: a == b
  assert not math_forms.equations_are_answer_forms(sympy.Eq(8, 7, evaluate=False), numbers_equal)
  assert math_forms.equations_are_answer_forms(sympy.Eq(x, 7, evaluate=False), numbers_equal)
