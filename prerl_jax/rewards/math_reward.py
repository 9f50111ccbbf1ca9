"""Math reward: the last \\boxed{} of a response against the ground truth with math-verify.

Answers are verified in a small pool of worker processes, each answer with a deadline; a worker
that misses it (a hung sympy call on `9^{9^{9^{9}}}`, say) is killed and replaced, and the answer
scores 0 with a timeout counted. Answers are only ever parsed as LaTeX, never evaluated as code.

What counts as the same answer beyond math-verify (prerl_jax.rewards.math_forms finds the forms):
- Letters: when either side is a letter answer (`(E)`, `\\text{(E)}`, `\\textbf{E}`, `A, C`), both
  must be, with the same letters in any case; `E` equals `(E)`, never Euler's number (2.718 vs
  `(E)` is wrong). Against a letter truth a lone small letter is a letter too (`e` is `(E)`).
- Constants: `i` and `e` are the imaginary unit and Euler's number however they are typeset
  (`7i`, `7\\mathrm{i}`, `7\\text{ i}`, `\\operatorname{i}`), never a unit: `7\\mathrm{i}` is 7i,
  not 7; `2\\mathrm{e}` equals `2e`; `3\\pi` is not 3. Other letters are variables (`7m`, `2s`);
  only the SI symbols m, g, s, h, L in a text command (`7\\,\\mathrm{m}`) are units.
- Units (a trailing `\\text{ cm}`, `5 cm`, `30^\\circ`, `\\%`, a dollar sign): when the truth has a
  unit, the answer may leave it out or must give the same one (`5\\text{ m}` against
  `5\\text{ cm}` is wrong). A unit the truth lacks makes the answer wrong under units="strict"
  (the default: an answer says more than the truth) and is dropped under units="free", for data
  whose truths had their units stripped, such as the MATH sets (`30^\\circ`, `5\\text{ cm}`,
  `10\\%`, `\\$5` against 30, 5, 10, 5 score 1; the run config's `reward.units`).
"""

import collections
import dataclasses
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time

import numpy as np

from prerl_jax.errors import UserError
from prerl_jax.rewards import answers

DEFAULT_TIMEOUT_S = 3.0
DEFAULT_MAX_ANSWER_CHARS = 1000
UNIT_RULES = ("free", "strict")  # What a unit the truth lacks does: dropped, or a wrong answer.
_STARTUP_TIMEOUT_S = 60.0
_CORRECT, _WRONG, _UNPARSABLE, _READY = "correct", "wrong", "unparsable", "ready"


@dataclasses.dataclass(frozen=True)
class MathRewards:
  """Rewards (1.0 or 0.0) for a batch of responses, and why some scored 0."""

  rewards: np.ndarray  # float32, one per response.
  missing_answers: int  # No \boxed{} in the response.
  parse_failures: int  # A box, but its content (or the truth) is too long or not parsable.
  timeouts: int  # Verification missed the deadline; the worker was replaced.

  @property
  def counts(self) -> dict[str, int]:
    return {"missing_answers": self.missing_answers, "parse_failures": self.parse_failures,
            "timeouts": self.timeouts}


def verify_answer(answer: str, ground_truth: str, units: str = "strict") -> str:
  """Compares one boxed answer with the truth in this process: "correct", "wrong" or "unparsable".

  No time limit: call it through MathVerifierPool unless the inputs are trusted. Letters, units
  (under the rule `units`, one of UNIT_RULES), equations, constants and repeating decimals are
  judged as this module's docstring and prerl_jax.rewards.math_forms describe.
  """
  import math_verify  # pylint: disable=import-outside-toplevel
  from prerl_jax.rewards import math_forms  # pylint: disable=import-outside-toplevel

  truth_letters = math_forms.letter_answer(ground_truth)
  answer_letters = math_forms.letter_answer(answer, any_case=truth_letters is not None)
  if truth_letters or answer_letters:
    return _CORRECT if truth_letters == answer_letters else _WRONG
  ground_truth, truth_units = math_forms.split_units(math_forms.readable_fonts(ground_truth))
  answer, answer_units = math_forms.split_units(math_forms.readable_fonts(answer))
  if not answer_units <= truth_units and (truth_units or units == "strict"):
    return _WRONG

  def parsed(latex: str) -> list:
    latex = math_forms.repeating_decimals_as_fractions(latex)
    return [math_forms.with_constants(expr) for expr in math_verify.parse(
        f"\\boxed{{{latex}}}", extraction_config=_latex_config(), parsing_timeout=None)]

  def equal(gold, predicted) -> bool:
    return math_verify.verify(gold, predicted, timeout_seconds=None)

  gold, predicted = parsed(ground_truth), parsed(answer)
  if not gold or not predicted:
    return _UNPARSABLE
  if not math_forms.has_relation(gold[0]) and not math_forms.equations_are_answer_forms(
      predicted[0], equal):
    return _WRONG
  return _CORRECT if equal(gold, predicted) else _WRONG


@functools.cache
def _latex_config() -> tuple:
  """math-verify's LaTeX extraction without its unit stripping (split_units decides units)."""
  import math_verify  # pylint: disable=import-outside-toplevel
  default = math_verify.LatexExtractionConfig()
  return (dataclasses.replace(
      default, normalization_config=dataclasses.replace(default.normalization_config,
                                                        units=False)),)


def _worker_loop(connection) -> None:
  """Worker process: answers (answer, truth, units) requests with verify_answer until sent None."""
  logging.getLogger("math_verify").setLevel(logging.ERROR)
  connection.send(_READY)
  while True:
    request = connection.recv()
    if request is None:
      return
    try:
      connection.send(verify_answer(*request))
    except Exception:  # pylint: disable=broad-except
      connection.send(_UNPARSABLE)


def _compact(text: str) -> str:
  """Text without whitespace, for the exact-match shortcut."""
  return "".join(text.split())


class _Worker:
  """One verifier process and the parent's end of its pipe."""

  def __init__(self, context):
    self.connection, child_end = context.Pipe()
    self.process = context.Process(target=_worker_loop, args=(child_end,), daemon=True)
    self.process.start()
    child_end.close()
    if not self.connection.poll(_STARTUP_TIMEOUT_S) or self.receive() != _READY:
      self.kill()
      raise RuntimeError(
          "A math-verify worker process failed to start. Worker processes re-import the main "
          "script: guard its entry point with `if __name__ == \"__main__\":`.")

  def receive(self):
    """The next message from the worker, or None if it died."""
    try:
      return self.connection.recv()
    except (EOFError, OSError):
      return None

  def kill(self) -> None:
    self.process.kill()
    self.process.join()
    self.connection.close()

  def stop(self) -> None:
    try:
      self.connection.send(None)
    except OSError:
      pass
    self.process.join(timeout=1.0)
    if self.process.is_alive():
      self.process.kill()
      self.process.join()
    self.connection.close()


def _check_main_is_importable() -> None:
  """An error when the main script came from standard input, which workers cannot re-import."""
  if getattr(sys.modules.get("__main__"), "__file__", None) == "<stdin>":
    raise UserError(
        "MathVerifierPool: the main script was read from standard input, and its worker "
        "processes re-import the main script, which cannot be done from standard input; save "
        "the script to a file and run `python FILE.py`")


class MathVerifierPool:
  """A pool of math-verify worker processes that scores batches of responses with a deadline."""

  def __init__(self, num_workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
               max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS, units: str = "strict"):
    if timeout_s <= 0:
      raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if units not in UNIT_RULES:
      raise ValueError(f"units must be one of {list(UNIT_RULES)}, got {units!r}")
    self.timeout_s = timeout_s
    self.units = units
    self.max_answer_chars = max_answer_chars
    _check_main_is_importable()
    self._context = multiprocessing.get_context("forkserver")
    self._context.set_forkserver_preload(["math_verify", __name__, "prerl_jax.rewards.math_forms"])
    count = num_workers or min(4, os.cpu_count() or 1)
    self._workers = [_Worker(self._context) for _ in range(count)]
    self._lock = threading.Lock()

  def __enter__(self) -> "MathVerifierPool":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    """Stops the workers."""
    for worker in self._workers:
      worker.stop()
    self._workers = []

  def score(self, responses: list[str], ground_truths: list[str]) -> MathRewards:
    """Rewards of responses (last box) against their ground truths, 1.0 if equivalent else 0.0."""
    if len(responses) != len(ground_truths):
      raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    if not self._workers:
      raise RuntimeError("MathVerifierPool is closed")
    rewards = np.zeros(len(responses), np.float32)
    counts = collections.Counter()
    pending = collections.deque()
    for index, (response, truth) in enumerate(zip(responses, ground_truths)):
      answer = answers.last_boxed(response)
      if answer is None:
        counts["missing"] += 1
      elif not truth.strip() or max(len(answer), len(truth)) > self.max_answer_chars:
        counts[_UNPARSABLE] += 1
      elif _compact(answer) == _compact(truth):
        rewards[index] = 1.0
      else:
        pending.append((index, answer, truth))
    with self._lock:
      self._run(pending, rewards, counts)
    return MathRewards(rewards, counts["missing"], counts[_UNPARSABLE], counts["timeout"])

  def _run(self, pending, rewards: np.ndarray, counts: collections.Counter) -> None:
    """Feeds pending (index, answer, truth) jobs to the workers, replacing any that overrun."""
    busy = {}  # worker slot -> (response index, deadline)
    while pending or busy:
      for slot in range(len(self._workers)):
        if slot not in busy and pending:
          index, answer, truth = pending.popleft()
          self._send(slot, (answer, truth, self.units))
          busy[slot] = (index, time.monotonic() + self.timeout_s)
      wait_s = max(0.0, min(deadline for _, deadline in busy.values()) - time.monotonic())
      ready = multiprocessing.connection.wait(
          [self._workers[slot].connection for slot in busy], timeout=wait_s)
      for slot in list(busy):
        index, deadline = busy[slot]
        worker = self._workers[slot]
        if worker.connection in ready:
          outcome = worker.receive()
          if outcome is None:  # The worker died (a C stack overflow, say): replace it.
            outcome = _UNPARSABLE
            self._replace(slot)
          rewards[index] = float(outcome == _CORRECT)
          counts[outcome] += 1
          del busy[slot]
        elif time.monotonic() >= deadline:
          self._replace(slot)
          counts["timeout"] += 1
          del busy[slot]

  def _send(self, slot: int, request: tuple[str, str, str]) -> None:
    """Sends a request to a worker, first replacing it if it died while idle."""
    try:
      self._workers[slot].connection.send(request)
    except OSError:
      self._replace(slot)
      self._workers[slot].connection.send(request)

  def _replace(self, slot: int) -> None:
    self._workers[slot].kill()
    self._workers[slot] = _Worker(self._context)


def score_math(responses: list[str], ground_truths: list[str], timeout_s: float = DEFAULT_TIMEOUT_S,
               num_workers: int | None = None, units: str = "strict") -> MathRewards:
  """One-off batch scoring with a temporary pool (keep a MathVerifierPool open in a loop)."""
  with MathVerifierPool(num_workers, timeout_s, units=units) as pool:
    return pool.score(responses, ground_truths)
