"""The shared run configuration behind every configs/<objective>.py file.

`make_config(objective, arg)` returns an ml_collections ConfigDict. `arg` is a comma-separated
string: a preset (`cpu`, the default, or `paper`) optionally followed by `key=value` overrides of
top-level shortcuts (`steps=40,model=qwen3-4b`), in the style of big_vision.
"""

import ml_collections

from prerl_jax.rl.schedule import Schedule, get_schedule

OBJECTIVES = ("grpo", "nsr_prerl", "psr_prerl", "prerl", "nsr_rl", "psr_rl", "w_reinforce",
              "dsrl")
PRESETS = ("cpu", "paper")
# SmolLM2-135M answers about 30% of one-digit sums with this prompt at temperature 0.7 (12% at
# 1.0, or with its default system prompt): inside the 20-60% band where RL has signal.
CPU_SYSTEM_PROMPT = "Reply with the result of the arithmetic only, for example: 3 + 4 = 7"
PAPER_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def _cpu_default() -> ml_collections.ConfigDict:
  """SmolLM2-135M on a generated arithmetic task, sized for a 2-core CPU in under 20 minutes."""
  c = ml_collections.ConfigDict()
  c.model = dict(name="smollm2-135m", path="", param_dtype="float32", dtype="float32",
                 remat="none", attention="auto")  # prerl_jax.models.remat / .attention
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.data = dict(
      source="reasoning_gym",  # reasoning_gym | files
      task="chain_sum",
      task_config=dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1),
      train_size=96,
      eval_size=96,
      seed=1,
      answer_format="last_number",
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
                   # over a page pool (docs/continuous_batching.md) of kv_cache_gib GiB (0: room
                   # for every live row at full length), live_rows decode rows.
                   engine="static", live_rows=64, kv_cache_gib=0.0, page_size=16,
                   chunk_steps=16)
  c.objective = dict(switch_step=6, reset_optimizer=False, reset_reference=True,
                     marginal_bos_id=-1, aggregation="token-mean")
  c.optim = dict(learning_rate=1e-5, weight_decay=0.01, grad_clip=1.0, b1=0.9, b2=0.999,
                 micro_batches=2)
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


def _paper(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The reference setting of PAPER.md section 8 (Qwen3-4B, MATH train, AIME/AMC eval)."""
  c.model.name = "qwen3-4b"
  c.model.param_dtype = "float32"
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.source = "files"
  c.data.train_files = ("../shared/data/math_train.parquet",)
  c.data.eval_files = ("../shared/data/aime_2024_20times.parquet",
                       "../shared/data/aime_2025_20times.parquet",
                       "../shared/data/amc2023_20times.parquet")
  c.data.system_prompt = PAPER_SYSTEM_PROMPT
  c.data.answer_format = "boxed"
  c.data.on_bad_row = "skip"  # 4 MATH train rows have an empty ground truth; they are logged.
  c.data.max_prompt_length = 1024
  c.rollout.update(prompts_per_step=128, group_size=8, max_new_tokens=8192, temperature=1.0)
  c.objective.switch_step = 20
  c.optim.update(learning_rate=1e-6, weight_decay=0.01, grad_clip=1.0, micro_batches=16)
  c.eval.update(every=20, samples_per_problem=32, temperature=1.0, max_new_tokens=8192)
  c.train.update(steps=348, checkpoint_every=10, keep_checkpoints=3, export_hf=True)
  return c


# Shortcuts usable in the `arg` string, mapped to full config keys.
SHORTCUTS = {
    "model": "model.name", "path": "model.path", "steps": "train.steps",
    "task": "data.task", "prompts": "rollout.prompts_per_step", "group": "rollout.group_size",
    "new_tokens": "rollout.max_new_tokens", "lr": "optim.learning_rate",
    "switch": "objective.switch_step", "run_dir": "train.run_dir", "seed": "train.seed",
}


def set_from_text(config: ml_collections.ConfigDict, dotted: str, text: str):
  """Sets `a.b.c` from a command-line string, converted to the current value's type."""
  node = config
  *parents, leaf = dotted.split(".")
  for key in parents:
    node = node[key]
  current = node[leaf]
  node[leaf] = type(current)(text) if not isinstance(current, bool) else text == "true"


def make_config(objective: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of `objective` for the preset and overrides in `arg` (see module docstring)."""
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
  parts = [p for p in (arg or "").split(",") if p]
  preset = "cpu"
  if parts and "=" not in parts[0]:
    preset = parts.pop(0)
  if preset not in PRESETS:
    raise ValueError(f"config argument: unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
  config = _cpu_default()
  if preset == "paper":
    config = _paper(config)
  config.name = f"{objective}_{preset}"
  config.objective.name = objective
  for part in parts:
    key, _, value = part.partition("=")
    if key not in SHORTCUTS:
      raise ValueError(f"config argument: unknown key {key!r}; valid: {', '.join(SHORTCUTS)}")
    set_from_text(config, SHORTCUTS[key], value)
  return config


def schedule_of(config: ml_collections.ConfigDict) -> Schedule:
  """The phase schedule a run config's `objective` section names (DSRL with its switch)."""
  objective = config.objective
  if objective.name == "dsrl":
    return get_schedule("dsrl", switch_step=objective.switch_step,
                        reset_optimizer=objective.reset_optimizer,
                        reset_reference=objective.reset_reference)
  return get_schedule(objective.name)
