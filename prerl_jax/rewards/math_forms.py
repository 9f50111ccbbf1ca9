"""Answer forms math-verify gets wrong: equations, constants, letters, units, repeating decimals.

- An equation answer (`x = 7`) counts as its last side only when its first side is a name and
  its middle sides equal the last; math-verify alone keeps the right-hand side of any equation,
  so `8 = 7` or `1 = 2 = 7` would match 7.
- A letter in a font command (`\\mathrm{i}`, `\\text{ e}`, `\\operatorname{i}`, `{\\rm i}`) is that
  letter, and the letters `i` and `e` become sympy's I and E, so `e^{i\\pi}` equals -1 and
  `7\\mathrm{i}` is 7i; math-verify's own unit stripping, which drops any trailing `\\mathrm{...}`
  and scores `7\\mathrm{i}` as 7, is turned off.
- A letter answer (`(E)`, `\\text{(E)}`, `\\textbf{E}`, `(e)`, `A, C`, `CBAD`: items of capital
  letters, or one letter of either case in parentheses) is compared as letters, ignoring case,
  never as Euler's number or a product; a lone small letter (`e`) is a letter only when asked.
- Units are a trailing label after the value, found here rather than by math-verify's word list
  (which also drops letters such as the `s` of `2s`): a word in a text command (`5\\text{ cm}`,
  `12\\text{ students}`, `\\text{cm}^2`, `\\text{ square units}`, or a one-letter SI symbol m, g,
  s, h, L), a known unit word written bare (`5 cm`, `30 degrees`), degrees (`30^\\circ`, `30°`),
  a dollar sign and percent. A bare letter is never a unit (`7i`, `2e`, `7m`, `2s` keep it).
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


_FONT_COMMAND = (r"\\(?:text(?:rm|up|normal|it|bf|sf|tt)?|math(?:rm|up|it|bf|sf|tt|normal)"
                 r"|boldsymbol|bm|mbox|hbox|operatorname\*?)")
_OLD_FONT = re.compile(r"\{\s*\\(?:rm|bf|it|sf|tt)\s+([^{}]*?)\s*\}")  # {\rm cm}
_OPERATOR_LETTER = re.compile(r"\\operatorname\*?\s*\{\s*([A-Za-z])\s*\}")  # \operatorname{i}
_FONT_NAME = re.compile(_FONT_COMMAND + r"\s*(?=\{)|\\(?:rm|bf|it|sf|tt)\b")
_LAYOUT = re.compile(r"\\(?:left|right)\b|\\[,;:! ]|\\q?quad\b|\\?[{}]|[\s~$]")
_LETTER_ITEM = re.compile(r"\([A-Za-z]\)|\([A-Z]+\)|[A-Z]+")
_ANY_CASE_LETTER_ITEM = re.compile(_LETTER_ITEM.pattern + r"|[a-z]")

_SPACING = r"(?:\s|~|\\[,;:! ]|\\q?quad\b)*"
_POWER = r"(?:\s*\^\s*\{?\s*([23])\s*\}?)?"
_TEXT_UNIT = re.compile(_SPACING + _FONT_COMMAND + r"\s*\{\s*([A-Za-z][A-Za-z./ ]*?)" + _POWER
                        + r"\s*\}" + _POWER + r"\s*$")
_BARE_UNIT = re.compile(
    _SPACING + r"(?<![A-Za-z\\])([A-Za-z]+(?:\.?\s+[A-Za-z]+)*)\.?" + _POWER + r"\s*$")
_DEGREES = re.compile(_SPACING + r"(?:\^\s*\{?\s*\\(?:circ|degree)\s*\}?|\\degree|°|\\circ)"
                      r"(?:\s*(?:" + _FONT_COMMAND + r"\s*\{\s*([CF])\s*\}|([CF])))?\s*$")
_PERCENT = re.compile(_SPACING + r"(?:" + _FONT_COMMAND + r"\s*\{\s*(?:\\%|percent|pct)\s*\}"
                      r"|\\?%|(?<![A-Za-z\\])(?:percent|pct))\s*$")
_DOLLAR = re.compile(r"\\\$|" + _FONT_COMMAND + r"\s*\{\s*\\\$\s*\}")
_UNIT_SPELLING = re.compile(r"(?:(square|sq|cubic|cu)\.?\s+)?([A-Za-z]+)"
                            r"(?:\s*/\s*|\s+per\s+)?([A-Za-z]+)?", re.IGNORECASE)
_UNIT_SPELLINGS = {  # canonical name: other spellings (a plural adds s or es to any of them)
    "millimeter": "mm millimetre", "centimeter": "cm centimetre", "meter": "m metre",
    "kilometer": "km kilometre", "inch": "in", "foot": "ft feet", "yard": "yd", "mile": "mi",
    "gram": "g gm", "kilogram": "kg", "pound": "lb", "ounce": "oz", "liter": "l litre",
    "milliliter": "ml millilitre", "gallon": "gal", "second": "s sec", "minute": "min",
    "hour": "h hr", "day": "", "week": "", "month": "", "year": "yr", "degree": "deg",
    "radian": "rad", "dollar": "", "cent": "", "unit": "",
    "mile/hour": "mph", "kilometer/hour": "kph kmh",
}
_UNIT_NAMES = {spelling: name for name, spellings in _UNIT_SPELLINGS.items()
               for spelling in [name, *spellings.split()]}
_UNIT_SYMBOLS = ("m", "g", "s", "h", "l", "L")  # One-letter units, only inside a text command.
_POWERS = {"square": "2", "sq": "2", "cubic": "3", "cu": "3"}
_UNIT_CHARS = 100  # Units are looked for in this many last characters: linear time on any input.
_NOT_A_LABEL = re.compile(  # Words after a number that change its value: `5\text{ hundred}`.
    r"pi|inf|infinity|squared|cubed|factorial|times|half|halves|dozens?|thirds?|quarters?"
    r"|(?:hundred|thousand|million|billion|trillion)s?|[a-z]+ths", re.IGNORECASE)


def letter_answer(latex: str, any_case: bool = False) -> frozenset[str] | None:
  """The items of a letter answer in capitals (`\\text{(E)}`, `(e)` -> {"E"}; `A, C`), else None.

  Items are capital letters (`E`, `CBAD`) or one letter of either case in parentheses; with
  any_case, a lone small letter (`e`) too.
  """
  items = _LAYOUT.sub("", _FONT_NAME.sub("", latex)).split(",")
  pattern = _ANY_CASE_LETTER_ITEM if any_case else _LETTER_ITEM
  matches = [pattern.fullmatch(item) for item in items if item]
  if not matches or not all(matches):
    return None
  return frozenset(match[0].strip("()").upper() for match in matches)


def _known_unit(word: str, bare: bool) -> str | None:
  """Canonical name of a unit word (`cms` -> "centimeter"), or None when it is not one."""
  if len(word) == 1:
    return None if bare or word not in _UNIT_SYMBOLS else _UNIT_NAMES[word.lower()]
  lower = word.lower()
  if bare and lower == "in":  # `x in S` is not 'x inches'.
    return None
  for spelling in (lower, lower.removesuffix("s"), lower.removesuffix("es")):
    if spelling in _UNIT_NAMES:
      return _UNIT_NAMES[spelling]
  return None


def _unit_name(spelling: str, power: str | None, bare: bool) -> str | None:
  """Canonical name of a unit (`sq. ft` -> "foot^2", `km/h` -> "kilometer/hour"), or None.

  Written bare, every word must be a known unit; in a text command one other word of two
  letters or more is a label too (`12\\text{ students}`), unless it changes the value
  (`\\text{ hundred}`).
  """
  match = _UNIT_SPELLING.fullmatch(spelling.strip())
  if not match:
    return None
  modifier, first, second = match.groups()
  names = [_known_unit(word, bare) for word in (first, second) if word]
  if None in names:
    if bare or modifier or second or len(first) < 2 or _NOT_A_LABEL.fullmatch(first):
      return None
    names = [first.lower().removesuffix("s")]
  power = power or (_POWERS[modifier.lower()] if modifier else None)
  return "/".join(names) + (f"^{power}" if power else "")


def _trailing_unit(latex: str) -> tuple[int, str] | None:
  """Where the unit that ends latex starts (spacing before it included) and its name, or None."""
  tail = max(0, len(latex) - _UNIT_CHARS)
  if match := _DEGREES.search(latex, tail):
    scale = match[1] or match[2]
    return match.start(), f"degree {scale}" if scale else "degree"
  if match := _TEXT_UNIT.search(latex, tail):
    name = _unit_name(match[1], match[2] or match[3], bare=False)
  elif match := _BARE_UNIT.search(latex, tail):
    name = _unit_name(match[1], match[2], bare=True)
  return (match.start(), name) if match and name else None


def split_units(latex: str) -> tuple[str, frozenset[str]]:
  """latex without its trailing units, and their names: `5\\text{ cm}^2` -> ("5", {"centimeter^2"}).

  A dollar sign anywhere is a unit. A trailing percent (`\\%`, `\\text{ percent}`) is named but
  stays in the value as `\\%`, which math-verify reads as both 10 and 0.1. A unit needs a value
  before it: `\\text{even}` alone is an answer, not a unit.
  """
  units = set()
  latex, dollar_signs = _DOLLAR.subn("", latex)
  if dollar_signs:
    units.add("dollar")
  if percent := _PERCENT.search(latex, max(0, len(latex) - _UNIT_CHARS)):
    latex = latex[:percent.start()] + "\\%"
    units.add("percent")
  while (unit := _trailing_unit(latex)) and latex[:unit[0]].strip():
    latex = latex[:unit[0]]
    units.add(unit[1])
  return latex, frozenset(units)


def readable_fonts(latex: str) -> str:
  """latex with `{\\rm x}` and a one-letter `\\operatorname{x}` written `\\mathrm{x}`."""
  return _OPERATOR_LETTER.sub(r"\\mathrm{\1}", _OLD_FONT.sub(r"\\mathrm{\1}", latex))


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
