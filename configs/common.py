"""The experiment every configs/<objective>.py shares: presets, the arg string, objective sections.

`get_config(arg)` reads `arg` in the big_vision style: comma-separated words and key=value pairs,
e.g. `cpu,steps=20` or `paper,data_dir=/data,path=/models/Qwen3-4B`. A bare word names the preset:
`cpu` (the default) or `paper`. `data_dir` is the paper preset's data directory; the other keys
are SHORTCUTS for the settings changed most. Every setting, these included, is also a
command-line override: `--config.<section>.<key>=value`.
"""

import dataclasses
import os
import typing

import ml_collections
from ml_collections import config_dict

from prerl_jax.data import datasets, padding
from prerl_jax.errors import UserError
from prerl_jax.generate import rollout_weights
from prerl_jax.models import attention, presets, remat
from prerl_jax.rewards import math_reward
from prerl_jax.rl.objective import Objective
from prerl_jax.training import checkpointing, evaluator, config_rules as rules

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


FLOAT_DTYPES = ("float32", "bfloat16", "float16")
MESH_AXIS = rules.integer(1, special=-1, note="the devices the other axes leave")


# Relations of a setting to others, the devices or the disk: None, or what the key takes.
def _model_found(name, run):
  run.require_disk()
  try:
    presets.resolve(name, run["model.path"] or None)
  except UserError as error:
    return str(error)
  return None


def _gym_task(task, run):
  if run["data.source"] != "reasoning_gym":
    return None
  from reasoning_gym import factory  # pylint: disable=import-outside-toplevel
  if task not in factory.DATASETS:
    return f"must be a reasoning-gym task: {', '.join(sorted(factory.DATASETS))}"
  return None


def _gym_task_config(task_config, run):
  if run["data.source"] != "reasoning_gym":
    return None
  try:
    datasets.gym_dataset(run["data.task"], 1, 0, **dict(task_config))
  except ValueError as error:
    return str(error)
  return None


def _fills_a_step(train_size, run):
  prompts = run["rollout.prompts_per_step"]
  if run["data.source"] == "reasoning_gym" and train_size < prompts:
    return f"must be >= rollout.prompts_per_step = {prompts}, the problems of one step"
  return None


def _data_files(required: bool):
  def relation(names, run):
    if run["data.source"] != "files":
      return None
    if required and not names:
      return "must name at least one file while data.source='files'"
    run.require_disk()
    directory = run["data.dir"]
    found = [rules.data_file_problem(os.path.join(directory, name)) for name in names]
    found = [problem for problem in found if problem]
    if any(problem.endswith("does not exist") for problem in found) and not directory:
      found.append("data.dir='' (the paper preset takes its directory as `paper,data_dir=/path`)")
    return "; ".join(found) or None
  return relation


def _per_batch_device(value, run):
  devices = run.batch_devices
  if value % devices:
    return f"must be divisible by {devices}, the ways the mesh splits a batch"
  return None


def _splits_a_step(micro_batches, run):
  if micro_batches == "auto":
    return None
  rows = run["rollout.prompts_per_step"] * run["rollout.group_size"]
  try:
    devices = run.batch_devices
  except rules.Unchecked:
    devices = 1
  if rows % (micro_batches * devices):
    return (f"must split a step's rollout.prompts_per_step * rollout.group_size = {rows} rows "
            f"evenly on each of {devices} batch device(s)")
  return None


def _micro_batches(value) -> str | None:
  if value == "auto":
    return None
  problem = rules.integer(1)(value)
  if problem and not isinstance(value, int):
    problem += (" or auto (the fewest whose compiled update fits the chip's HBM: "
                "prerl_jax/rl/micro_batch_budget.py)")
  return problem


def _writable_run_dir(run_dir, run):
  try:
    path = run_dir.format(name=run["name"])
  except (KeyError, IndexError, ValueError):
    return "may hold no {field} other than {name} (the config's name)"
  run.require_disk()
  return rules.writable_dir_problem(path)


def _pool_gib(value) -> str | None:
  if value == "auto" or rules.number(0)(value) is None:
    return None
  return ("must be auto (the HBM left while sampling) or a finite number of GiB >= 0 (0: room "
          "for every live row)")


# Every setting but `objective` (the Objective dataclass checks those): the cpu preset's value,
# what the key takes alone, and its relations. tpu_run.py checks them all before anything loads.
S = rules.Setting
SETTINGS = dict(
    name=S("", rules.nonempty_text),  # experiment() sets <objective>_<preset>.
    model=dict(
        name=S("smollm2-135m", rules.nonempty_text, (_model_found,)),  # Preset, HF dir, .gguf.
        path=S("", rules.text),  # A preset's local checkpoint (nothing is fetched).
        param_dtype=S("float32", rules.one_of(*FLOAT_DTYPES)),
        dtype=S("float32", rules.one_of(*FLOAT_DTYPES)),  # Compute dtype.
        remat=S("none", rules.one_of(*remat.POLICIES)),
        attention=S("auto", rules.one_of(*attention.BACKENDS)),
        # The token a pre-train-space sequence starts with (-1: the chat turn start).
        marginal_bos_id=S(-1, rules.integer(0, special=-1, note="the chat turn start")),
        # Checkpoint tensors the model does not use only warn (a deliberately truncated model).
        allow_unused_weights=S(False, rules.boolean),
    ),
    mesh=dict(data=S(1, MESH_AXIS), fsdp=S(-1, MESH_AXIS), tensor=S(1, MESH_AXIS)),
    data=dict(
        source=S("reasoning_gym", rules.one_of("reasoning_gym", "files")),
        task=S("chain_sum", rules.nonempty_text, (_gym_task,)),
        task_config=S(dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1), rules.section,
                      (_gym_task_config,)),
        train_size=S(96, rules.integer(1), (_fills_a_step,)),
        eval_size=S(96, rules.integer(1)),
        seed=S(1, rules.integer(0)),
        answer_format=S("last_number", rules.one_of(*datasets.GYM_INSTRUCTIONS)),
        dir=S("", rules.text),  # Where train_files and eval_files are (source=files); "": as given.
        train_files=S((), rules.file_names, (_data_files(required=True),)),
        eval_files=S((), rules.file_names, (_data_files(required=False),)),
        dedupe_eval=S(True, rules.boolean),
        system_prompt=S(CPU_SYSTEM_PROMPT, rules.text),
        enable_thinking=S(False, rules.boolean),
        max_prompt_length=S(128, rules.integer(1, max(padding.PROMPT_BUCKETS),
                                               note="the sampler's largest prompt width")),
        on_bad_row=S("error", rules.one_of("error", "skip")),
    ),
    rollout=dict(
        prompts_per_step=S(8, rules.integer(1), (_per_batch_device,)),
        group_size=S(8, rules.integer(1)),
        max_new_tokens=S(32, rules.integer(1)),
        temperature=S(0.7, rules.number(above=0, note="rollouts are sampled, and the update "
                                        "scores them at this temperature; eval.temperature=0 "
                                        "evaluates greedily")),
        top_k=S(0, rules.integer(0, note="0: no top-k truncation")),
        top_p=S(1.0, rules.number(above=0, high=1, note="1: no nucleus truncation")),
        # "static": one program per prompt batch; "continuous": continuous batching over a page
        # pool (docs/continuous_batching.md) of kv_cache_gib GiB per shard (0: room for every
        # live row at full length; "auto": the HBM left while sampling, at the first sampling,
        # prerl_jax/generate/pool_budget.py), live_rows decode rows per data/fsdp shard.
        engine=S("static", rules.one_of(*evaluator.ROLLOUT_ENGINES)),
        live_rows=S(64, rules.integer(1)),
        kv_cache_gib=S(config_dict.FieldReference(0.0, field_type=object), _pool_gib),
        page_size=S(16, rules.integer(1)),
        chunk_steps=S(16, rules.integer(1)),
        # The weights the sampler decodes from (docs/configs.md): a copy in the compute dtype,
        # replicated or split over a tensor axis, made once per step; "trainer" decodes from the
        # trainer's params; "auto" picks (prerl_jax/generate/rollout_weights.py).
        weights=S("auto", rules.one_of(*rollout_weights.LAYOUTS)),
    ),
    optim=dict(
        learning_rate=S(1e-5, rules.number(above=0)),
        weight_decay=S(0.01, rules.number(0)),
        grad_clip=S(1.0, rules.number(above=0, note="the largest global gradient norm")),
        b1=S(0.9, rules.number(0, below=1)),
        b2=S(0.999, rules.number(0, below=1)),
        # "auto": the fewest that split a step whose compiled update fits the chip's HBM,
        # resolved at start (prerl_jax/rl/micro_batch_budget.py; docs/configs.md).
        micro_batches=S(config_dict.FieldReference(2, field_type=object), _micro_batches,
                        (_splits_a_step,)),
        # The update scores packed rows (prerl_jax.rl.packing) rather than rows padded to the
        # longest response.
        pack=S(True, rules.boolean),
        # Tokens per packed row (0: the longest segment, rounded up).
        row_tokens=S(0, rules.integer(0, note="0: the longest segment")),
        # Packed conditional rows score each prompt once for all of its responses (where
        # model.attention takes branch ids: xla, chunked; auto on CPU).
        share_prompts=S(True, rules.boolean),
    ),
    reward=dict(
        timeout_s=S(5.0, rules.number(above=0)), workers=S(2, rules.integer(1)),
        # The math reward's rule for a unit the ground truth lacks (`5\text{ cm}` against 5): a
        # wrong answer ("strict"), or dropped ("free", for truths whose units were stripped).
        units=S("strict", rules.one_of(*math_reward.UNIT_RULES)),
    ),
    eval=dict(
        every=S(0, rules.integer(0, note="0: at start and end only")),
        samples_per_problem=S(4, rules.integer(1)),
        temperature=S(0.7, rules.number(0, note="0: greedy")),
        max_new_tokens=S(32, rules.integer(1)),
        prompts_per_call=S(16, rules.integer(1), (_per_batch_device,)),
        at_start=S(True, rules.boolean),
        at_end=S(True, rules.boolean),
    ),
    train=dict(
        steps=S(12, rules.integer(1)),
        seed=S(0, rules.integer(0)),
        checkpoint_every=S(4, rules.integer(1)),
        keep_checkpoints=S(2, rules.integer(1)),
        run_dir=S("runs/{name}", rules.nonempty_text, (_writable_run_dir,)),
        # A checkpoint that cannot be read on resume: set it aside (renamed <step>.corrupt) and
        # resume from the one before ("previous"), stop naming it ("fail"), or as "previous" but
        # start over when no readable one is left ("restart").
        on_bad_checkpoint=S("previous", rules.one_of(*checkpointing.ON_BAD_CHECKPOINT)),
        export_hf=S(False, rules.boolean),
        log_samples=S(2, rules.integer(0)),
        # Steps 1, 1 + N, 1 + 2N, ... also score the space the objective does not train in (its
        # entropy; the sampler comparison in marginal phases): one more forward pass on those
        # steps. 0: never.
        log_both_spaces=S(5, rules.integer(0, note="0: never")),
        compilation_cache=S(True, rules.boolean),  # XLA programs kept under $PRERL_JAX_CACHE/xla
    ),
)


def check_config(config: ml_collections.ConfigDict, devices=None, disk: bool = True,
                 preset_names=None) -> None:
  """Raises one UserError naming every bad key of a resolved run config, its value and what the
  key takes (config_rules.problems: devices, disk and preset_names say what else is checked)."""
  rules.check(config, SETTINGS, devices, disk, preset_names)


def _cpu() -> ml_collections.ConfigDict:
  """SmolLM2-135M on a generated arithmetic task, sized for a 2-core CPU in under 20 minutes."""
  return ml_collections.ConfigDict(rules.defaults(SETTINGS))


def _paper(c: ml_collections.ConfigDict, data_dir: str) -> None:
  """The reference setting of PAPER.md section 8 (Qwen3-4B, MATH train, AIME/AMC eval)."""
  c.model.update(name="qwen3-4b", param_dtype="float32", dtype="bfloat16", remat="full")
  c.data.update(source="files", dir=data_dir, train_files=PAPER_TRAIN_FILES,
                eval_files=PAPER_EVAL_FILES, system_prompt=PAPER_SYSTEM_PROMPT,
                answer_format="boxed", max_prompt_length=1024,
                on_bad_row="skip")  # 4 MATH train rows have an empty ground truth; they are logged.
  # MATH's truths had their units, degrees and \% stripped: a unit in an answer is free there.
  c.reward.units = "free"
  # The continuous engine, from a bfloat16 rollout copy of the weights (rollout.weights=auto),
  # over a page pool of the HBM the train state, the copy and the sampler leave (kv_cache_gib
  # auto: 75.7 GiB per chip for Qwen3-4B on v5p-16); a static cache for 1,024 rows of 9k tokens
  # would need 146 GiB per chip on 8 chips (docs/dry_run_table.md).
  c.rollout.update(prompts_per_step=128, group_size=8, max_new_tokens=8192, temperature=1.0,
                   engine="continuous", live_rows=64, kv_cache_gib="auto")
  # micro_batches auto: the fewest whose update fits the chip (docs/configs.md). Rows of 9,216
  # tokens hold the longest segment (1,024 + 8,192): one compiled width, where the doubling
  # default would pad a capped segment into a 16,384-token row.
  c.optim.update(learning_rate=1e-6, weight_decay=0.01, grad_clip=1.0, micro_batches="auto",
                 row_tokens=9216)
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
