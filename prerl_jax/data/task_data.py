"""The problems, evaluation sets and reward scorer a run config describes (host side)."""

import dataclasses
import logging
import os

import ml_collections

from prerl_jax.data import datasets, prompts
from prerl_jax.errors import UserError
from prerl_jax.evals import evaluation
from prerl_jax.rewards import math_reward


@dataclasses.dataclass
class TaskData:
  """Train problems, named evaluation sets, and the scorer shared by training and evaluation."""

  train: list[datasets.Problem]
  eval_sets: list[tuple[str, list[datasets.Problem]]]
  scorer: evaluation.Scorer
  prompt_config: prompts.PromptConfig
  skipped_rows: int
  math_pool: math_reward.MathVerifierPool | None = None

  def close(self) -> None:
    if self.math_pool is not None:
      self.math_pool.close()


def data_files(data: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """The paths of data.train_files and data.eval_files under data.dir (none unless
  data.source='files'); fails naming the key and the first file that does not exist."""
  if data.source != "files":
    return [], []
  if not data.train_files:
    raise ValueError("config key data.train_files is empty while data.source='files'")
  paths = {}
  for key in ("train_files", "eval_files"):
    paths[key] = [os.path.join(data.dir, name) for name in data[key]]
    for path in paths[key]:
      if not os.path.exists(path):
        raise UserError(f"config key data.dir={data.dir!r}: {path} (in data.{key}) does not "
                         "exist; the paper preset takes its directory as `paper,data_dir=/path`")
  return paths["train_files"], paths["eval_files"]


def load_task_data(data: ml_collections.ConfigDict,
                   reward: ml_collections.ConfigDict) -> TaskData:
  """Builds TaskData from the `data` and `reward` sections of a run config.

  data.source is `reasoning_gym` (a generated task with a held-out split) or `files` (RL parquet
  / JSONL files under data.dir, scored with math-verify).
  """
  prompt_config = prompts.PromptConfig(
      max_prompt_tokens=data.max_prompt_length, system_prompt=data.system_prompt or None,
      enable_thinking=data.enable_thinking)
  if data.source == "reasoning_gym":
    gym, train, heldout = datasets.gym_train_heldout(
        data.task, data.train_size, data.eval_size, data.seed,
        answer_format=data.answer_format, **dict(data.task_config))
    return TaskData(train, [(data.task, heldout)],
                    evaluation.gym_scorer(gym, data.answer_format), prompt_config, 0)
  if data.source == "files":
    train_paths, eval_paths = data_files(data)
    train, skipped = [], 0
    for path in train_paths:
      loaded = datasets.load_rl_file(path, data.on_bad_row)
      train.extend(loaded.problems)
      skipped += loaded.skipped
    eval_sets = []
    for path in eval_paths:
      loaded = datasets.load_rl_file(path, data.on_bad_row)
      skipped += loaded.skipped
      problems = (datasets.dedupe_problems(loaded.problems) if data.dedupe_eval
                  else loaded.problems)
      eval_sets.append((os.path.splitext(os.path.basename(path))[0], problems))
    if skipped:
      logging.warning("Skipped %d bad rows (data.on_bad_row='skip')", skipped)
    pool = math_reward.MathVerifierPool(num_workers=reward.workers, timeout_s=reward.timeout_s,
                                         units=reward.units)
    return TaskData(train, eval_sets, evaluation.math_scorer(pool), prompt_config, skipped,
                    math_pool=pool)
  raise ValueError(f"config key data.source={data.source!r}: expected 'reasoning_gym' or "
                   "'files'")
