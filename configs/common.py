"""The experiment every configs/<objective>.py shares: presets, the arg string, objective sections.

`get_config(arg)` reads `arg` in the big_vision style: comma-separated words and key=value pairs,
e.g. `cpu,steps=20` or `paper,data_dir=/data,path=/models/Qwen3-4B`. A bare word names the preset:
`cpu` (the default) or `paper`. `data_dir` is the paper preset's data directory; the other keys
are SHORTCUTS for the settings changed most. Every setting, these included, is also a
command-line override: `--config.<section>.<key>=value`.
"""

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from prerl_jax.errors import UserError
from prerl_jax.rl.objective import Objective

# SmolLM2-135M answers about 30% of one-digit sums with this prompt at temperature 0.7 (12% at
# 1.0, or with its default system prompt): inside the 20-60% band where RL has signal.
CPU_SYSTEM_PROMPT = "Reply with the result of the arithmetic only, for example: 3 + 4 = 7"
PAPER_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
# The paper preset's files, read from its data_dir (PAPER.md section 8).
PAPER_TRAIN_FILES = ("math_train.parquet",)
PAPER_EVAL_FILES = ("aime_2024_20times.parquet", "aime_2025_20times.parquet",
                    "amc2023_20times.parquet")

# Arg-string keys for the settings changed most: key -> (config key, type).
SHORTCUTS = {
    "model": ("model.name", str), "path": ("model.path", str), "steps": ("train.steps", int),
    "task": ("data.task", str), "prompts": ("rollout.prompts_per_step", int),
    "group": ("rollout.group_size", int), "new_tokens": ("rollout.max_new_tokens", int),
    "lr": ("optim.learning_rate", float), "run_dir": ("train.run_dir", str),
    "seed": ("train.seed", int),
}
# What every config file's arg string accepts: its defaults, or (None, type) for a shortcut.
ARGS = dict(cpu=False, paper=False, data_dir="",
            **{key: (None, kind) for key, (_, kind) in SHORTCUTS.items()})


def _typed(key: str, text: str, kind: type):
  if kind is bool:
    if text.lower() not in ("true", "false"):
      raise UserError(f"config argument {key}={text!r}: expected true or false")
    return text.lower() == "true"
  try:
    return kind(text)
  except ValueError:
    raise UserError(f"config argument {key}={text!r}: expected {kind.__name__}") from None


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """`arg` as a ConfigDict over `spec`'s keys (big_vision's parse_arg).

  spec maps each key to its default (whose type converts the text), or to (None, type) for a key
  with no default. A bare word sets a boolean key to True. An unknown key fails naming it.
  """
  result = ml_collections.ConfigDict(type_safe=False)
  for key, default in spec.items():
    result[key] = default[0] if isinstance(default, tuple) else default
  for item in filter(None, (arg or "").split(",")):
    key, equals, text = item.partition("=")
    if key not in spec:
      raise UserError(f"config argument {item!r}: unknown key {key!r}; valid: "
                       f"{', '.join(spec)}")
    default = spec[key]
    kind = default[1] if isinstance(default, tuple) else type(default)
    if not equals and kind is not bool:
      raise UserError(f"config argument {key!r} needs a value ({key}=...)")
    result[key] = _typed(key, text, kind) if equals else True
  return result


def preset(arg: ml_collections.ConfigDict) -> str:
  """The preset a parsed arg names: 'paper' or 'cpu'."""
  if arg.cpu and arg.paper:
    raise UserError("config argument: name one preset, cpu or paper")
  return "paper" if arg.paper else "cpu"


def _cpu() -> ml_collections.ConfigDict:
  """SmolLM2-135M on a generated arithmetic task, sized for a 2-core CPU in under 20 minutes."""
  c = ml_collections.ConfigDict()
  # marginal_bos_id: the token a pre-train-space sequence starts with (-1: the chat turn start).
  c.model = dict(name="smollm2-135m", path="", param_dtype="float32", dtype="float32",
                 remat="none", attention="auto",  # prerl_jax.models.remat / .attention
                 marginal_bos_id=-1)
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.data = dict(
      source="reasoning_gym",  # reasoning_gym | files
      task="chain_sum",
      task_config=dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1),
      train_size=96,
      eval_size=96,
      seed=1,
      answer_format="last_number",
      dir="",  # Where train_files and eval_files are (source=files); "": as given.
      train_files=(),
      eval_files=(),
      dedupe_eval=True,
      system_prompt=CPU_SYSTEM_PROMPT,
      enable_thinking=False,
      max_prompt_length=128,
      on_bad_row="error",
  )
  c.rollout = dict(prompts_per_step=8, group_size=8, max_new_tokens=32, temperature=0.7,
                   top_k=0, top_p=1.0,
                   # "static": one program per prompt batch; "continuous": continuous batching
                   # over a page pool (docs/continuous_batching.md) of kv_cache_gib GiB per shard
                   # (0: room for every live row at full length), live_rows decode rows per
                   # data/fsdp shard.
                   engine="static", live_rows=64, kv_cache_gib=0.0, page_size=16,
                   chunk_steps=16)
  # pack: the update scores packed rows (prerl_jax.rl.packing) rather than rows padded to the
  # longest response; row_tokens: tokens per packed row (0: the longest segment, rounded up);
  # share_prompts: packed conditional rows score each prompt once for all of its responses
  # (where model.attention takes branch ids: xla, chunked; auto on CPU).
  c.optim = dict(learning_rate=1e-5, weight_decay=0.01, grad_clip=1.0, b1=0.9, b2=0.999,
                 micro_batches=2, pack=True, row_tokens=0, share_prompts=True)
  c.reward = dict(timeout_s=5.0, workers=2)
  c.eval = dict(every=0, samples_per_problem=4, temperature=0.7, max_new_tokens=32,
                prompts_per_call=16, at_start=True, at_end=True)
  c.train = dict(steps=12, seed=0, checkpoint_every=4, keep_checkpoints=2, run_dir="runs/{name}",
                 export_hf=False, log_samples=2,
                 # Steps 1, 1 + N, 1 + 2N, ... also score the space the objective does not
                 # train in (its entropy; the sampler comparison in marginal phases): one more
                 # forward pass on those steps. 0: never.
                 log_both_spaces=5,
                 compilation_cache=True)  # XLA programs kept under $PRERL_JAX_CACHE/xla
  return c


def _paper(c: ml_collections.ConfigDict, data_dir: str) -> None:
  """The reference setting of PAPER.md section 8 (Qwen3-4B, MATH train, AIME/AMC eval)."""
  c.model.update(name="qwen3-4b", param_dtype="float32", dtype="bfloat16", remat="full")
  c.data.update(source="files", dir=data_dir, train_files=PAPER_TRAIN_FILES,
                eval_files=PAPER_EVAL_FILES, system_prompt=PAPER_SYSTEM_PROMPT,
                answer_format="boxed", max_prompt_length=1024,
                on_bad_row="skip")  # 4 MATH train rows have an empty ground truth; they are logged.
  # The continuous engine over a 32 GiB page pool per chip: a static cache for 1,024 rows of
  # 9k tokens would need 146 GiB per chip on 8 chips (docs/dry_run_table.md).
  c.rollout.update(prompts_per_step=128, group_size=8, max_new_tokens=8192, temperature=1.0,
                   engine="continuous", live_rows=64, kv_cache_gib=32.0)
  c.optim.update(learning_rate=1e-6, weight_decay=0.01, grad_clip=1.0, micro_batches=16)
  c.eval.update(every=20, samples_per_problem=32, temperature=1.0, max_new_tokens=8192)
  c.train.update(steps=348, checkpoint_every=10, keep_checkpoints=3, export_hf=True)


def experiment(name: str, arg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Every section but `objective`: the preset of a parsed `arg`, with its shortcuts applied."""
  config = _cpu()
  if preset(arg) == "paper":
    _paper(config, arg.data_dir)
  elif arg.data_dir:
    raise UserError("config argument data_dir= is read by the paper preset only (`paper,"
                     "data_dir=/path`); the cpu preset generates its data")
  config.name = f"{name}_{preset(arg)}"
  for key, (dotted, _) in SHORTCUTS.items():
    if arg[key] is not None:
      section, leaf = dotted.split(".")
      config[section][leaf] = arg[key]
  return config


def objective_section(objective: Objective) -> ml_collections.ConfigDict:
  """One key per Objective field, holding `objective`'s value.

  A field that may be None takes Python literals on the command line, so
  `--config.objective.dual_clip=None` turns the dual clip off.
  """
  hints = typing.get_type_hints(Objective)
  section = ml_collections.ConfigDict()
  for field in dataclasses.fields(Objective):
    value = getattr(objective, field.name)
    if type(None) in typing.get_args(hints[field.name]):
      value = config_dict.FieldReference(value, field_type=object)
    section[field.name] = value
  return section
