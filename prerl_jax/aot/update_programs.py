"""The update stage's programs: each schedule phase's train step as the trainer runs it, and the
micro-batch count `optim.micro_batches=auto` picks for a target (rl/micro_batch_budget.py).
"""

import ml_collections

from prerl_jax import sharding
from prerl_jax.aot import targets as targets_lib
from prerl_jax.aot.abstract_state import StepShapes
from prerl_jax.aot.programs import Program, compile_program
from prerl_jax.models import attention
from prerl_jax.rl import micro_batch_budget
from prerl_jax.rl.objective import CONDITIONAL, MARGINAL
from prerl_jax.sharding import per_device_bytes


def train_programs(config: ml_collections.ConfigDict, shapes: StepShapes,
                   micro_batches: int) -> list[Program]:
  """Each schedule phase's train step as the trainer runs it with `micro_batches`, over the
  largest batch a step brings (micro_batch_budget.py: every response at the cap, packed as the
  trainer packs it where optim.pack)."""
  state = shapes.state
  weights = shapes.compute_weights_bytes
  state_bytes = per_device_bytes((state.params, state.opt_state, state.reference))
  share_prompts = config.optim.share_prompts and attention.supports_branches(
      shapes.model.attention)  # As the trainer decides (Trainer._share_prompts).
  programs = []
  for objective, traced, batch in micro_batch_budget.update_programs(
      config, shapes.graphdef, shapes.optimizer, state, shapes.mesh, micro_batches,
      prompt_width=shapes.prompt_width, share_prompts=share_prompts,
      bos_id=max(config.model.marginal_bos_id, 0)):  # Its value does not change the program.
    # A forward per scored space, a backward (and a rematerialized forward) per trained space.
    spaces = {CONDITIONAL, MARGINAL} if config.train.log_both_spaces else set(objective.spaces)
    passes = len(spaces) + len(objective.spaces) * (1 if shapes.model.remat == "none" else 2)
    moved = 2 * state_bytes + per_device_bytes(batch) + micro_batches * passes * weights
    arguments = ((state.params, state.opt_state, state.reference), batch)
    programs.append(Program(f"train:{objective.name}", "update", traced, arguments, moved))
  return programs


def update_stage(config: ml_collections.ConfigDict, shapes: StepShapes,
                 target: targets_lib.Target) -> tuple[list[dict], dict | None]:
  """The compiled train programs (`compile_program`) at optim.micro_batches, and for `auto` the
  `micro_batch_budget.Choice` for the target's HBM (as a dict), whose compiles they are."""
  count = config.optim.micro_batches
  if count != "auto":
    return [compile_program(p, target) for p in train_programs(config, shapes, count)], None
  compiled = {}

  def measure(micro_batches: int) -> micro_batch_budget.Tried:
    compiled[micro_batches] = [compile_program(p, target)
                               for p in train_programs(config, shapes, micro_batches)]
    top = max(compiled[micro_batches], key=lambda p: p["compiler_peak_bytes"])
    refused = any(p["compiler_status"] != "compiled" for p in compiled[micro_batches])
    return micro_batch_budget.Tried(micro_batches, top["compiler_peak_bytes"], top["temp_bytes"],
                                    refused)

  choice = micro_batch_budget.fewest_fitting(measure, shapes.rows,
                                             sharding.batch_devices(shapes.mesh),
                                             target.hbm_bytes)
  return compiled[choice.micro_batches], choice.as_dict()
