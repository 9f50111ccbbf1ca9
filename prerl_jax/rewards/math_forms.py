"""Answer forms math-verify gets wrong: equations, named constants and repeating decimals.

- An equation answer (`x = 7`) counts as its last side only when its first side is a name and
  its middle sides equal the last; math-verify alone keeps the right-hand side of any equation,
  so `8 = 7` or `1 = 2 = 7` would match 7.
- The imaginary unit `i` and an upright `\\mathrm{e}` parse as plain symbols; they become sympy's
  I and E, so `e^{i\\pi}` equals -1.
- Repeating decimals (`0.\\overline{3}`, `0.1\\bar{6}`, `0.\\dot{3}`, `0.(3)`) are not parsed at
  all; they are rewritten as exact fractions first.
"""

import fractions
import re

import sympy
from sympy.core.function import AppliedUndef

_DIGIT_GROUP = r"(?:\{\s*(\d+)\s*\}|\s*(\d))"
_REPEATING = re.compile(
    r"(?<![\w.\\])(\d*)\.(\d*)(?:\\(?:overline|bar|dot)" + _DIGIT_GROUP + r"|\((\d+)\))")
_DOTTED_PERIOD = re.compile(  # 0.\dot{1}4285\dot{7}: dots over the first and last repeated digit.
    r"(?<![\w.\\])(\d*)\.(\d*)\\dot" + _DIGIT_GROUP + r"(\d*)\\dot" + _DIGIT_GROUP)
_CONSTANTS = {"i": sympy.I, "e": sympy.E}


def _fraction_latex(whole: str, fixed: str, period: str) -> str:
  """LaTeX of whole.fixed(period) repeating, as a reduced fraction (or an integer)."""
  scale = 10 ** len(fixed)
  value = fractions.Fraction(int(whole or "0") * scale + int(fixed or "0"), scale)
  value += fractions.Fraction(int(period), scale * (10 ** len(period) - 1))
  if value.denominator == 1:
    return str(value.numerator)
  return f"{{\\frac{{{value.numerator}}}{{{value.denominator}}}}}"


def repeating_decimals_as_fractions(latex: str) -> str:
  """latex with every repeating decimal written as an exact fraction: 0.1\\overline{6} -> 1/6."""
  if "." not in latex:
    return latex
  latex = _DOTTED_PERIOD.sub(
      lambda m: _fraction_latex(m[1], m[2], (m[3] or m[4]) + m[5] + (m[6] or m[7])), latex)
  return _REPEATING.sub(lambda m: _fraction_latex(m[1], m[2], m[3] or m[4] or m[5]), latex)


def with_constants(expr):
  """expr with the symbols `i` and `e` replaced by the imaginary unit and Euler's number."""
  if not isinstance(expr, (sympy.Basic, sympy.MatrixBase)):
    return expr
  names = {s: _CONSTANTS[s.name] for s in expr.free_symbols
           if isinstance(s, sympy.Symbol) and s.name in _CONSTANTS}
  return expr.subs(names) if names else expr


def has_relation(expr) -> bool:
  """Whether a parsed expression holds an equation or inequality anywhere."""
  return (isinstance(expr, (sympy.Basic, sympy.MatrixBase))
          and bool(expr.atoms(sympy.core.relational.Relational)))


def _is_name(expr) -> bool:
  """A variable or short name: `x`, `a_1`, `\\text{area}`, `f(x)`, `AB`."""
  if isinstance(expr, sympy.Symbol):
    return True
  if isinstance(expr, AppliedUndef):
    return all(isinstance(arg, (sympy.Symbol, sympy.Number)) for arg in expr.args)
  return isinstance(expr, sympy.Mul) and all(isinstance(a, sympy.Symbol) for a in expr.args)


def equation_chains(expr) -> list[list]:
  """Sides of every equation in a parsed expression, in order: `a = b = c` -> [a, b, c]."""
  chains, stack = [], [expr]
  while stack:
    node = stack.pop()
    if isinstance(node, sympy.Eq):
      chains.append([node.lhs, node.rhs])
    elif isinstance(node, sympy.And) and all(
        isinstance(arg, sympy.Eq) for arg in getattr(node, "_unsorted_args", node.args)):
      relations = getattr(node, "_unsorted_args", node.args)
      chains.append([relations[0].lhs] + [relation.rhs for relation in relations])
    elif isinstance(node, (sympy.Basic, sympy.MatrixBase)):
      stack.extend(node.args)
  return chains


def equations_are_answer_forms(expr, equal) -> bool:
  """Whether every equation in expr names its value: a name first, middle sides equal the last.

  `equal(a, b)` decides equality of two sides.
  """
  for sides in equation_chains(expr):
    if not _is_name(sides[0]):
      return False
    if not all(equal(sides[-1], side) for side in sides[1:-1]):
      return False
  return True
