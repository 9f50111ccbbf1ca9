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


@pytest.mark.parametrize("latex, letters", [
    ("\\text{(E)}", {"E"}),
    ("\\textbf{(E) }", {"E"}),
    ("\\mathrm{(B)}", {"B"}),
    ("{\\bf (C)}", {"C"}),
    ("\\left( C \\right)", {"C"}),
    ("(e)", {"E"}),
    ("{(E)},", {"E"}),
    ("\\{A, C\\}", {"A", "C"}),
    ("D,E,D", {"D", "E"}),
    ("CBAD", {"CBAD"}),
    ("e", None),
    ("2.718", None),
    ("(E)\\ 2.718", None),
    ("(a, b)", None),
    ("x + 1", None),
    (",", None),
])
def test_letter_answer(latex, letters):
  assert math_forms.letter_answer(latex) == (None if letters is None else frozenset(letters))


def test_a_lone_small_letter_is_a_letter_only_when_asked():
  assert math_forms.letter_answer("e") is None
  assert math_forms.letter_answer("\\mathrm{e}", any_case=True) == {"E"}
  assert math_forms.letter_answer("e + 1", any_case=True) is None


@pytest.mark.parametrize("latex, value, units", [
    ("5\\text{ cm}", "5", {"centimeter"}),
    ("5 \\text{ Centimeters}", "5", {"centimeter"}),
    ("7\\,\\mathrm{m}", "7", {"meter"}),
    ("5\\text{cm}^2", "5", {"centimeter^2"}),
    ("5\\,\\mathrm{cm^{3}}", "5", {"centimeter^3"}),
    ("5\\text{ sq. units}", "5", {"unit^2"}),
    ("5 square feet", "5", {"foot^2"}),
    ("60\\text{ miles per hour}", "60", {"mile/hour"}),
    ("60 mph", "60", {"mile/hour"}),
    ("\\frac{1}{2}\\text{ km/h}", "\\frac{1}{2}", {"kilometer/hour"}),
    ("12\\text{ students}", "12", {"student"}),
    ("30^\\circ", "30", {"degree"}),
    ("30^{\\circ}", "30", {"degree"}),
    ("30°", "30", {"degree"}),
    ("30 degrees", "30", {"degree"}),
    ("25^\\circ\\text{C}", "25", {"degree C"}),
    ("\\$18.90", "18.90", {"dollar"}),
    ("\\text{\\$}5 \\text{ dollars}", "5", {"dollar"}),
    ("10 \\%", "10\\%", {"percent"}),
    ("10\\text{ percent}", "10\\%", {"percent"}),
    ("7\\mathrm{i}", "7\\mathrm{i}", set()),
    ("7\\text{ e}", "7\\text{ e}", set()),
    ("7m", "7m", set()),
    ("2s", "2s", set()),
    ("5 in", "5 in", set()),
    ("3\\pi", "3\\pi", set()),
    ("5\\text{ hundred}", "5\\text{ hundred}", set()),
    ("7\\text{ or more}", "7\\text{ or more}", set()),
    ("\\text{even}", "\\text{even}", set()),
    ("5\\text{ cm} + 3", "5\\text{ cm} + 3", set()),
])
def test_split_units(latex, value, units):
  assert math_forms.split_units(latex) == (value, frozenset(units))


def test_readable_fonts_writes_old_and_operator_fonts_as_mathrm():
  assert math_forms.readable_fonts("7\\operatorname{i} + {\\rm e}") == "7\\mathrm{i} + \\mathrm{e}"
  assert math_forms.readable_fonts("\\operatorname{lcm}(a, b)") == "\\operatorname{lcm}(a, b)"
