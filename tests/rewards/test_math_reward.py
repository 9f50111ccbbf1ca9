"""Tests for the math-verify reward: a verifier table, hostile inputs, no code execution."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import run_fixtures
from prerl_jax.rewards import math_reward

TIMEOUT_S = 2.0

# (response, ground truth, expected reward)
VERIFIER_TABLE = [
    ("The answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", 1),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1),
    ("\\boxed{\\tfrac12}", "\\frac{1}{2}", 1),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1),
    ("\\boxed{1/2}", "0.5", 1),
    ("\\boxed{0.25}", "\\frac{1}{3}", 0),
    ("\\boxed{\\frac{2}{4}}", "\\frac12", 1),
    ("\\boxed{3.0}", "3", 1),
    ("\\boxed{3.5}", "\\frac72", 1),
    ("\\boxed{\\frac{7}{3}}", "2\\frac{1}{3}", 1),
    ("\\boxed{5 \\text{ cm}}", "5", 1),
    ("\\boxed{5\\text{ inches}}", "5", 1),
    ("\\boxed{\\$18.90}", "18.90", 1),
    ("\\boxed{10\\%}", "10", 1),
    ("\\boxed{90^\\circ}", "90", 1),
    ("\\boxed{x = 3}", "3", 1),
    ("So we get $\\boxed{42}$ apples in total.", "42", 1),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", 1),
    ("\\boxed{[-1, 3)}", "(-1,3]", 0),
    ("\\boxed{[2,5]}", "[2,5]", 1),
    ("\\boxed{(1,2) \\cup (3,4)}", "(1,2)\\cup(3,4)", 1),
    ("\\boxed{1} then, correcting myself, \\boxed{2}", "2", 1),
    ("\\boxed{2} then, correcting myself, \\boxed{1}", "2", 0),
    ("The answer is 7.", "7", 0),
    ("", "7", 0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt2}{2}", 1),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0),
    ("\\boxed{{{7}}}", "7", 1),
    ("\\boxed{\\frac{\\frac{1}{2}}{2}}", "\\frac14", 1),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1),
    ("\\boxed{x^2+1}", "(x+1)^2", 0),
    ("\\boxed{\\pi}", "\\pi", 1),
    ("\\boxed{3, 5}", "5,3", 1),
    ("\\boxed{(3, 5)}", "(3,5)", 1),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", 1),
    ("\\boxed{C}", "\\text{(C)}", 1),
    ("\\boxed{1,000}", "1000", 1),
    ("\\boxed{-4}", "4", 0),
    ("\\fbox{12}", "12", 1),
    ("\\boxed 9", "9", 1),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
     1),
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0),
    ("\\boxed{2^{10}}", "1024", 1),
    ("\\boxed{\\infty}", "\\infty", 1),
    # Equations: an answer form names the value on the left; other equations score 0.
    ("\\boxed{8 = 7}", "7", 0),
    ("\\boxed{1=2=3=4=5=6=7}", "7", 0),
    ("\\boxed{7 = 7}", "7", 0),
    ("\\boxed{2x = 7}", "7", 0),
    ("\\boxed{a = 7}", "7", 1),
    ("\\boxed{\\text{area} = 7}", "7", 1),
    ("\\boxed{x = 3 + 4 = 7}", "7", 1),
    ("\\boxed{x = 5 = 7}", "7", 0),
    ("\\boxed{(8 = 1, 9 = 2)}", "(1, 2)", 0),
    ("\\boxed{2x + 1 = y}", "y = 2x + 1", 1),
    # Commands after a box: a bare \fbox or \boxedfoo is not the last box.
    ("\\boxed{7}. I used \\fbox.", "7", 1),
    ("\\fbox{7}, not \\boxedanswer", "7", 1),
    ("\\boxed{7}\\fbox", "7", 1),
    ("\\boxed{8}. I used \\fbox.", "7", 0),
    # Constants: the imaginary unit, e and pi evaluate.
    ("\\boxed{e^{i\\pi}}", "-1", 1),
    ("\\boxed{e^{i\\pi} + 1}", "0", 1),
    ("\\boxed{e^{i\\pi/2}}", "i", 1),
    ("\\boxed{i^2}", "-1", 1),
    ("\\boxed{\\sqrt{-1}}", "i", 1),
    ("\\boxed{\\mathrm{e}^{2}}", "e^2", 1),
    ("\\boxed{e^{i\\pi}}", "1", 0),
    ("\\boxed{\\pi}", "3.14", 0),
    # Repeating decimals are exact fractions.
    ("\\boxed{0.\\overline{3}}", "\\frac{1}{3}", 1),
    ("\\boxed{0.1\\overline{6}}", "\\frac{1}{6}", 1),
    ("\\boxed{1.\\overline{142857}}", "\\frac{8}{7}", 1),
    ("\\boxed{0.\\dot{3}}", "\\frac{1}{3}", 1),
    ("\\boxed{0.(6)}", "\\frac{2}{3}", 1),
    ("\\boxed{0.\\overline{9}}", "1", 1),
    ("\\boxed{\\frac{1}{3}}", "0.\\overline{3}", 1),
    ("\\boxed{0.\\overline{3}}", "0.33", 0),
    ("\\boxed{0.\\overline{3}}", "\\frac{3}{10}", 0),
    # Letter answers compare as letters (any case, with or without parentheses or a font
    # command), never as Euler's number or a product of symbols.
    ("\\boxed{(E)}", "E", 1),
    ("\\boxed{E}", "\\text{(E)}", 1),
    ("\\boxed{\\textbf{(E)}}", "\\text{(E)}", 1),
    ("\\boxed{\\mathrm{(B)}}", "B", 1),
    ("\\boxed{\\left( C \\right)}", "\\text{(C)}", 1),
    ("\\boxed{{\\bf (C)}}", "C", 1),
    ("\\boxed{(e)}", "\\text{(E)}", 1),
    ("\\boxed{e}", "\\text{(E)}", 1),
    ("\\boxed{\\text{(d)}}", "D", 1),
    ("\\boxed{E}", "D", 0),
    ("\\boxed{\\text{(D)}}", "\\textbf{(E)}", 0),
    ("\\boxed{2.718}", "\\text{(E)}", 0),
    ("\\boxed{2.718281828}", "\\text{(E)}", 0),
    ("\\boxed{2.718282}", "{(E)}", 0),
    ("\\boxed{(E)\\ 2.718}", "\\text{(E)}", 0),
    ("\\boxed{\\text{(E) or (D)}}", "\\text{(E)}", 0),
    ("\\boxed{(E)}", "e", 0),
    ("\\boxed{E}", "2.718281828", 0),
    ("\\boxed{(B)}", "5", 0),
    ("\\boxed{A, C}", "C,A", 1),
    ("\\boxed{(A), (C)}", "\\{A,C\\}", 1),
    ("\\boxed{A, C}", "A", 0),
    ("\\boxed{A, B, 2.718281828}", "{A,B,E}", 0),
    ("\\boxed{ABCD}", "{CBAD}", 0),
    # A letter after a number is a constant or a variable, never a dropped unit.
    ("\\boxed{7\\mathrm{i}}", "7", 0),
    ("\\boxed{7\\text{i}}", "7", 0),
    ("\\boxed{7 \\text{ i}}", "7", 0),
    ("\\boxed{7\\,\\mathrm{i}}", "7", 0),
    ("\\boxed{7\\operatorname{i}}", "7", 0),
    ("\\boxed{7\\mathbf{i}}", "7", 0),
    ("\\boxed{7{\\rm i}}", "7", 0),
    ("\\boxed{\\mathrm{i}7}", "7", 0),
    ("\\boxed{7 \\cdot \\mathrm{i}}", "7", 0),
    ("\\boxed{7i}", "7", 0),
    ("\\boxed{1 + \\text{i}}", "1", 0),
    ("\\boxed{2\\mathrm{e}}", "2", 0),
    ("\\boxed{2\\,\\text{e}}", "2", 0),
    ("\\boxed{2e}", "2", 0),
    ("\\boxed{3\\pi}", "3", 0),
    ("\\boxed{3\\mathrm{\\pi}}", "3", 0),
    ("\\boxed{3\\text{ pi}}", "3", 0),
    ("\\boxed{5\\sqrt{2}}", "5", 0),
    ("\\boxed{7m}", "7", 0),
    ("\\boxed{7 m}", "7", 0),
    ("\\boxed{2}", "2s", 0),
    ("\\boxed{7x}", "7", 0),
    ("\\boxed{7\\mathrm{i}}", "7i", 1),
    ("\\boxed{\\mathrm{i}7}", "7i", 1),
    ("\\boxed{7\\operatorname{i}}", "7i", 1),
    ("\\boxed{-7\\mathrm{i}}", "7i", 0),
    ("\\boxed{1 + \\mathrm{i}}", "1+i", 1),
    ("\\boxed{3 - 4\\mathrm{i}}", "3-4i", 1),
    ("\\boxed{3 - 4\\mathrm{i}}", "3+4i", 0),
    ("\\boxed{\\mathrm{e}^{\\mathrm{i}\\pi}}", "-1", 1),
    ("\\boxed{2\\mathrm{e}}", "2e", 1),
    ("\\boxed{3\\mathrm{\\pi}}", "3\\pi", 1),
    ("\\boxed{7\\mathrm{x}}", "7x", 1),
    ("\\boxed{A^{\\mathrm{T}}}", "A^T", 1),
    ("\\boxed{\\frac{\\mathrm{d}y}{\\mathrm{d}x}}", "\\frac{dy}{dx}", 1),
    # Units (the table's pool has units="free"): the truth's unit may be left out or given the
    # same way; a unit the truth lacks is dropped; a different unit is wrong.
    ("\\boxed{5\\text{ cm}}", "5\\text{ centimeters}", 1),
    ("\\boxed{5}", "5\\text{ cm}", 1),
    ("\\boxed{5\\text{ m}}", "5\\text{ cm}", 0),
    ("\\boxed{5\\text{ cm}^2}", "5\\text{ cm}", 0),
    ("\\boxed{7\\,\\mathrm{cm}}", "7", 1),
    ("\\boxed{7\\,\\mathrm{m}}", "7", 1),
    ("\\boxed{7 cm}", "7", 1),
    ("\\boxed{5\\text{ cm}^2}", "5", 1),
    ("\\boxed{5\\text{ square units}}", "5", 1),
    ("\\boxed{5\\text{ sq. units}}", "5\\text{ units}^2", 1),
    ("\\boxed{60\\text{ mph}}", "60\\text{ miles per hour}", 1),
    ("\\boxed{7\\text{ km/h}}", "7\\text{ kph}", 1),
    ("\\boxed{12\\text{ students}}", "12", 1),
    ("\\boxed{2\\text{ months}}", "2", 1),
    ("\\boxed{3\\text{rd}}", "3", 1),
    ("\\boxed{x\\text{ cm}}", "x", 1),
    ("\\boxed{7\\text{ or more}}", "7", 0),
    ("\\boxed{5\\text{ hundred}}", "5", 0),
    ("\\boxed{3\\text{ halves}}", "3", 0),
    ("\\boxed{3\\text{ tenths}}", "3", 0),
    ("\\boxed{5\\text{ cm} + 3}", "8", 0),
    ("\\boxed{\\text{cm}}", "5", 0),
    ("\\boxed{30^{\\circ}}", "30", 1),
    ("\\boxed{30°}", "30", 1),
    ("\\boxed{30 \\text{ degrees}}", "30^\\circ", 1),
    ("\\boxed{30}", "30^{\\circ}", 1),
    ("\\boxed{25^\\circ\\text{C}}", "25", 1),
    ("\\boxed{\\frac{\\pi}{6}}", "30^\\circ", 0),
    ("\\boxed{30^\\circ}", "\\frac{\\pi}{6}", 0),
    ("\\boxed{10\\text{ percent}}", "0.1", 1),
    ("\\boxed{50\\%}", "\\frac{1}{2}", 1),
    ("\\boxed{5\\text{ dollars}}", "\\$5", 1),
    ("\\boxed{50\\text{ cents}}", "\\$0.50", 0),
]

# (response, ground truth, expected reward) when units are strict: a unit the truth lacks is
# a wrong answer; leaving out the truth's unit, or giving the same one, is not.
STRICT_UNITS_TABLE = [
    ("\\boxed{7\\,\\mathrm{cm}}", "7", 0),
    ("\\boxed{7 \\text{ cm}}", "7", 0),
    ("\\boxed{7 cm}", "7", 0),
    ("\\boxed{7\\,\\mathrm{m}}", "7", 0),
    ("\\boxed{5\\text{ cm}^2}", "5", 0),
    ("\\boxed{12\\text{ students}}", "12", 0),
    ("\\boxed{30^\\circ}", "30", 0),
    ("\\boxed{10\\%}", "10", 0),
    ("\\boxed{\\$5}", "5", 0),
    ("\\boxed{5\\text{ m}}", "5\\text{ cm}", 0),
    ("\\boxed{7\\mathrm{i}}", "7", 0),
    ("\\boxed{30}", "30^\\circ", 1),
    ("\\boxed{30\\text{ degrees}}", "30^\\circ", 1),
    ("\\boxed{0.1}", "10\\%", 1),
    ("\\boxed{10}", "10\\%", 1),
    ("\\boxed{5}", "\\$5", 1),
    ("\\boxed{5}", "5\\text{ cm}", 1),
    ("\\boxed{5\\text{ cm}}", "5\\text{ centimeters}", 1),
    ("\\boxed{7\\mathrm{i}}", "7i", 1),
    ("\\boxed{(E)}", "\\text{(E)}", 1),
    ("\\boxed{x = 3}", "3", 1),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1),
]


@pytest.fixture(scope="module")
def pools():
  """A verifier pool per units rule; "free" is the table's rule and the other tests' pool."""
  with math_reward.MathVerifierPool(num_workers=2, timeout_s=TIMEOUT_S, units="free") as free, \
       math_reward.MathVerifierPool(num_workers=1, timeout_s=TIMEOUT_S, units="strict") as strict:
    yield {"free": free, "strict": strict}


@pytest.fixture(scope="module")
def pool(pools):
  return pools["free"]


@pytest.mark.parametrize("units, response, truth, expected",
                         [("free", *row) for row in VERIFIER_TABLE]
                         + [("strict", *row) for row in STRICT_UNITS_TABLE])
def test_verifier_table(pools, units, response, truth, expected):
  assert pools[units].score([response], [truth]).rewards.tolist() == [expected]


def test_units_are_strict_unless_the_task_says_they_are_free():
  assert math_reward.verify_answer("7\\,\\mathrm{cm}", "7") == "wrong"
  assert math_reward.verify_answer("7\\,\\mathrm{cm}", "7", units="free") == "correct"


def test_an_unknown_unit_rule_is_an_error():
  with pytest.raises(ValueError, match=r"units must be one of \['free', 'strict'\], got 'loose'"):
    math_reward.MathVerifierPool(num_workers=1, units="loose")


def test_batch_rewards_and_missing_answer_count(pool):
  result = pool.score([case[0] for case in VERIFIER_TABLE], [case[1] for case in VERIFIER_TABLE])
  np.testing.assert_array_equal(result.rewards, [case[2] for case in VERIFIER_TABLE])
  assert result.missing_answers == 3  # No box, empty, unclosed box.
  assert result.timeouts == 0


def test_hostile_inputs_finish_within_the_time_limit(pool):
  hostile = [
      "\\boxed{9^{9^{9^{9}}}}",
      "\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",
      "\\boxed{" + "\\frac{1}{" * 100 + "2" + "}" * 100 + "}",
      "a" * 1_000_000 + "\\boxed{2}",
      "\\boxed{" + "1+" * 500_000 + "1}",
      "b" * 1_000_000,
  ]
  start = time.monotonic()
  result = pool.score(hostile + ["\\boxed{3}"], ["1", "1", "1", "2", "1", "1", "3"])
  elapsed = time.monotonic() - start
  assert elapsed < 3 * TIMEOUT_S  # Two workers, each overrun cut at TIMEOUT_S.
  assert result.rewards.tolist() == [0, 0, 0, 1, 0, 0, 1]
  assert result.timeouts >= 1  # 9^{9^{9^{9}}} cannot finish.
  assert result.parse_failures >= 1  # The megabyte box is over the length cap.
  assert result.missing_answers == 1
  replaced_workers_result = pool.score(["\\boxed{\\frac{3}{6}}"], ["0.5"])
  assert replaced_workers_result.rewards.tolist() == [1]


def test_boxed_python_is_never_executed(pool, tmp_path):
  marker = tmp_path / "PWNED"
  payloads = [
      f"\\boxed{{__import__('os').system('touch {marker}')}}",
      f"\\boxed{{eval(\"open('{marker}', 'w')\")}}",
      f"\\boxed{{exec(\"import os; os.system('touch {marker}')\")}}",
  ]
  result = pool.score(payloads, ["1"] * 3)
  assert result.rewards.tolist() == [0, 0, 0]
  assert not marker.exists()
  assert not list(tmp_path.iterdir())


def test_over_length_answer_or_empty_truth_is_a_parse_failure():
  with math_reward.MathVerifierPool(num_workers=1, timeout_s=TIMEOUT_S,
                                    max_answer_chars=10) as short_pool:
    result = short_pool.score(["\\boxed{12345678901}", "\\boxed{5}", "\\boxed{}"], ["1", "5", ""])
  assert result.rewards.tolist() == [0, 1, 0]
  assert result.counts == {"missing_answers": 0, "parse_failures": 2, "timeouts": 0}


def test_mismatched_lengths_are_an_error(pool):
  with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
    pool.score(["a", "b"], ["1"])


def test_dead_workers_are_replaced():
  with math_reward.MathVerifierPool(num_workers=2, timeout_s=TIMEOUT_S) as crash_pool:
    for worker in crash_pool._workers:  # pylint: disable=protected-access
      worker.process.kill()
      worker.process.join()
    result = crash_pool.score(["\\boxed{\\frac{4}{8}}", "\\boxed{0.2}", "\\boxed{3}"],
                              ["0.5", "\\frac15", "4"])
  assert result.rewards.tolist() == [1, 1, 0]


def test_pool_started_from_a_script_on_stdin_says_why_it_cannot(tmp_path):
  script = ("from prerl_jax.rewards import math_reward\n"
            "math_reward.MathVerifierPool(num_workers=1)\n")
  result = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True,
                          cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": run_fixtures.REPO_ROOT})
  assert result.returncode != 0
  assert "worker processes re-import the main script, which cannot be done from standard " \
      "input" in " ".join(result.stderr.split())
