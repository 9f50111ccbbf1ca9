"""Problem sources, validated: RL parquet / JSONL files (verl layout) and reasoning-gym tasks."""

import dataclasses
import json
import logging
import os
from typing import Any, NamedTuple

import pyarrow.parquet as pq

from prerl_jax.errors import UserError

GYM_INSTRUCTIONS = {
    "answer_tags": "Give your final answer inside <answer></answer> tags.",
    "boxed": "Put your final answer within \\boxed{}.",
    "last_line": "Give your final answer alone on the last line.",
    "last_number": "End your response with the final answer as a number.",
}
DEDUPE_KEYS = ("user_message", "index")


class DataError(UserError):
  """A data file or row that cannot be used; the message names the file and row."""


@dataclasses.dataclass(frozen=True)
class Problem:
  """One prompt with what is needed to score its responses."""

  messages: tuple[dict[str, str], ...]  # Chat messages, {"role": ..., "content": ...}.
  ground_truth: str
  data_source: str
  index: str  # extra_info.index, or "<file stem>_<row>" when the row has none.
  gym_entry: dict[str, Any] | None = None  # The reasoning-gym entry that score_answer needs.

  @property
  def user_message(self) -> str:
    """Content of the last user message."""
    return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


class LoadedFile(NamedTuple):
  """The usable problems of a file and the number of bad rows skipped."""

  problems: list[Problem]
  skipped: int


def _messages(prompt) -> tuple[dict[str, str], ...]:
  """Validated chat messages of a row's `prompt`."""
  if not isinstance(prompt, list) or not prompt:
    raise ValueError(f"`prompt` must be a non-empty list of chat messages, got "
                     f"{type(prompt).__name__}")
  messages = []
  for message in prompt:
    if not (isinstance(message, dict) and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)):
      raise ValueError(f"`prompt` holds {message!r}, not a {{'role': str, 'content': str}} message")
    messages.append({"role": message["role"], "content": message["content"]})
  if not any(m["role"] == "user" for m in messages):
    raise ValueError("`prompt` has no user message")
  return tuple(messages)


def _problem(row: Any, default_source: str, default_index: str) -> Problem:
  """A Problem from one row of the common RL layout; ValueError says what is wrong."""
  if not isinstance(row, dict):
    raise ValueError(f"a row must be an object, got {type(row).__name__}")
  messages = _messages(row.get("prompt"))
  reward_model = row.get("reward_model")
  if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
    raise ValueError("`reward_model.ground_truth` is missing")
  ground_truth = reward_model["ground_truth"]
  if not isinstance(ground_truth, str) or not ground_truth.strip():
    raise ValueError(f"`reward_model.ground_truth` must be a non-empty string, got "
                     f"{ground_truth!r}")
  data_source = row.get("data_source") or default_source
  if not isinstance(data_source, str):
    raise ValueError(f"`data_source` must be a string, got {type(data_source).__name__}")
  extra_info = row.get("extra_info")
  index = extra_info.get("index") if isinstance(extra_info, dict) else None
  return Problem(messages, ground_truth, data_source,
                 default_index if index is None else str(index))


def _read_rows(path: str) -> list[Any]:
  """Rows of a .parquet or .jsonl file as Python objects."""
  if path.endswith(".parquet"):
    return pq.read_table(path).to_pylist()
  if path.endswith((".jsonl", ".json")):
    rows = []
    with open(path, "rb") as file:
      for line_number, raw in enumerate(file, start=1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
          raise DataError(f"{path}, line {line_number}: not valid UTF-8 (byte {error.start} "
                          f"of the line is {raw[error.start]:#04x})") from error
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {line_number}: not valid JSON ({error})") from error
    return rows
  raise DataError(f"{path}: unsupported file type; expected .parquet or .jsonl")


def load_rl_file(path: str, on_bad_row: str = "error") -> LoadedFile:
  """Problems of an RL parquet / JSONL file (`prompt` messages, `reward_model.ground_truth`).

  A bad row raises DataError naming the file and row, or with on_bad_row="skip" is logged,
  counted and left out. An empty file, or one with no usable row, is always an error.
  """
  if on_bad_row not in ("error", "skip"):
    raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file")
  rows = _read_rows(path)
  if not rows:
    raise DataError(f"{path}: the file has no rows")
  stem = os.path.splitext(os.path.basename(path))[0]
  problems, skipped = [], 0
  for row_number, row in enumerate(rows):
    try:
      problems.append(_problem(row, stem, f"{stem}_{row_number}"))
    except ValueError as error:
      if on_bad_row == "error":
        raise DataError(f"{path}, row {row_number}: {error}") from error
      skipped += 1
      logging.warning("Skipping %s, row %d: %s", path, row_number, error)
  if not problems:
    raise DataError(f"{path}: none of its {len(rows)} rows is usable (all skipped)")
  return LoadedFile(problems, skipped)


def dedupe_problems(problems: list[Problem], key: str = "user_message") -> list[Problem]:
  """The first problem of each distinct user message (or extra_info.index), in order."""
  if key not in DEDUPE_KEYS:
    raise ValueError(f"Unknown dedupe key {key!r}; valid: {list(DEDUPE_KEYS)}")
  seen, unique = set(), []
  for problem in problems:
    value = problem.user_message if key == "user_message" else problem.index
    if value not in seen:
      seen.add(value)
      unique.append(problem)
  return unique


def gym_dataset(task: str, size: int, seed: int, **config):
  """The reasoning-gym generator `task` with its settings; unknown names list the valid ones."""
  import reasoning_gym  # pylint: disable=import-outside-toplevel
  from reasoning_gym import factory  # pylint: disable=import-outside-toplevel

  if task not in factory.DATASETS:
    raise ValueError(f"Unknown reasoning-gym task {task!r}; valid: {sorted(factory.DATASETS)}")
  try:
    return reasoning_gym.create_dataset(task, size=size, seed=seed, **config)
  except (TypeError, AssertionError, ValueError) as error:
    raise ValueError(f"reasoning-gym task {task!r} rejects config {config}: {error}") from error


def gym_problems(dataset, answer_format: str = "answer_tags") -> list[Problem]:
  """One Problem per entry of a reasoning-gym dataset, the answer format asked for in the prompt."""
  if answer_format not in GYM_INSTRUCTIONS:
    raise ValueError(f"Unknown answer_format {answer_format!r}; valid: {list(GYM_INSTRUCTIONS)}")
  problems = []
  for entry in dataset:
    task = entry["metadata"]["source_dataset"]
    content = f"{entry['question']}\n{GYM_INSTRUCTIONS[answer_format]}"
    problems.append(Problem(({"role": "user", "content": content},), str(entry["answer"]),
                            f"reasoning_gym/{task}",
                            f"{task}_{dataset.seed}_{entry['metadata']['source_index']}", entry))
  return problems


def gym_train_heldout(task: str, train_size: int, heldout_size: int, seed: int,
                      heldout_seed: int | None = None, answer_format: str = "answer_tags",
                      **config) -> tuple[Any, list[Problem], list[Problem]]:
  """(scoring dataset, train problems, held-out problems); held-out drawn with another seed.

  reasoning-gym seeds entry i with seed + i, so the default heldout_seed is seed + train_size,
  the first seed the train split does not use. Held-out questions that also occur in the train
  split are dropped, so the held-out split can come out smaller than heldout_size.
  """
  heldout_seed = seed + train_size if heldout_seed is None else heldout_seed
  if heldout_seed == seed:
    raise ValueError(f"heldout_seed must differ from seed ({seed})")
  train_dataset = gym_dataset(task, train_size, seed, **config)
  train = gym_problems(train_dataset, answer_format)
  seen = {p.user_message for p in train}
  heldout = [p for p in gym_problems(gym_dataset(task, heldout_size, heldout_seed, **config),
                                     answer_format) if p.user_message not in seen]
  return train_dataset, train, heldout
