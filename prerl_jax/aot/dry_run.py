"""Ahead-of-time dry run: compile every program of a training step for a target; memory and time.

Nothing is allocated and no weights or data are read: parameters, optimizer state, prompts and
the train batch are `jax.ShapeDtypeStruct`s carrying their shardings (shapes from the model
preset and the run config), and each program is lowered and compiled for the target's devices:
libtpu's compiler on the real topology for a TPU target, XLA:GPU's compiler (deviceless, through
the CUDA plugin) for a GPU target, or simulated host CPU devices where the plugin is absent
(`targets.py`). The programs are the ones the trainer runs, built by the same code: the
sampler's (`Sampler.trace`) and each schedule phase's train step with its micro-batching
(`make_train_step`), and the rollout copy of the weights (`rollout_weights.rollout_copy`).

Sampling runs as the trainer runs it: from the weights in the layout `rollout.weights` resolves
to for the target's HBM (generate/rollout_weights.py: a bfloat16 copy, replicated or split over
a tensor axis, or the trainer's own params), on that layout's mesh. The copy program (cast and
reshard) is one more sample-stage program, run once per step; its collectives are the resharding
transfer. While sampling, the train state and the copy stay in HBM beside the sampler programs.
The continuous engine's pool with `rollout.kv_cache_gib=auto` is what pool_budget.py leaves of
the chip's HBM (the sampler programs compiled once more, for a pool of one sequence, to measure
their own bytes); the report's `pool` shows the budget's arithmetic, the pages per shard and the
rows they feed at the cap, and an explicit kv_cache_gib the engine would refuse at start.

The update is each schedule phase's train step over the largest batch a step brings, as the
trainer lays it out (micro_batch_budget.largest_batch: every response at the cap, packed where
optim.pack). With `optim.micro_batches=auto` its counts are compiled as the trainer's search
compiles them (micro_batch_budget.py: the fewest whose peak + margin fits the target's HBM); the
report's `micro_batches` is the count chosen, `micro_batches_auto` the counts tried with their
peaks, and the update programs reported are the chosen count's.

Per chip it reports the state (params, optimizer state, reference, float32 gradients, the
rollout copy, KV cache), exact from the shardings, and per program the compiler's memory
analysis: peak = arguments + outputs - donated aliases + temporaries + code, plus the train state
that stays in HBM beside the program. A program fits when that is at most the chip's HBM.
Each program's projected time, from its FLOPs, modelled HBM bytes and the bytes its collectives
move, is priced by programs.py.

The sample phase's HBM roofline, `projected_sample_roofline_s`: the bytes a chip must read while
decoding every response to the cap, over its HBM bandwidth,

    sum over decode steps of (W + R x (P + t) x B) / HBM bandwidth
      = decode steps x (W + R x (P + N / 2) x B) / HBM bandwidth   (continuous engine)

W: the compute-dtype weights a chip's decode step reads, once per step (the rollout copy it
holds; for `trainer` the whole model over the tensor axis); R: the live rows of a chip's batch
shard (the continuous engine: the groups its rows and pool hold at the cap, x group size); P:
the prompt width; t: the step's position in the response, N / 2 on average; B: one position's
keys and values on a chip, all layers; decode steps: the cap schedule's (continuous: waves x
max_new_tokens, rounded up to whole chunks; static: max_new_tokens - 1, every row at once, each
step reading its segment's whole cache block). It is the decode's modelled HBM traffic alone:
the projection adds the prefill, the copy, communication, and compute where it exceeds memory.

The pieces: programs.py (one program's compile and pricing), abstract_state.py (the abstract state),
sample_programs.py and update_programs.py (each stage's programs); this module assembles the
report.
"""

import dataclasses
import json

import jax
import ml_collections

from prerl_jax import sharding
from prerl_jax.aot import report as report_lib, response_lengths as response_lengths_lib
from prerl_jax.aot import targets as targets_lib
from prerl_jax.aot.programs import compile_program
from prerl_jax.aot.sample_programs import (copy_programs, lengths_projection, pool_report,
                                           rollout_side, sampler_programs, static_cache_bytes)
from prerl_jax.aot.abstract_state import make_target_mesh, model_config_for, step_shapes
from prerl_jax.aot.update_programs import update_stage
from prerl_jax.models.config import ModelConfig


def dry_run(config: ml_collections.ConfigDict, target: str, mesh_sizes: dict | None = None,
            model_config: ModelConfig | None = None, response_lengths: str | None = None) -> dict:
  """Compiles every program of a step of `config` for a target; see the module docstring.

  target: a product name (targets.TARGETS). mesh_sizes: e.g. {'fsdp': 4, 'tensor': 2}
  (sharding.parse_mesh); default all chips on fsdp. model_config: default the preset's shape.
  response_lengths: a `--response_lengths` spec (response_lengths.py); the report's `lengths`
  then projects the sampling over them (`lengths_projection`).
  """
  lengths = None if response_lengths is None else response_lengths_lib.parse(
      response_lengths, config.rollout.prompts_per_step * config.rollout.group_size,
      config.rollout.max_new_tokens)
  target = targets_lib.get_target(target)
  model_config = model_config or model_config_for(config, target)
  mesh = make_target_mesh(target, mesh_sizes)
  # Each program is traced and compiled under its mesh (splash attention and the paged kernels
  # run under shard_map over the mesh in context): the trainer's for the copy and the update,
  # the rollout weights' for the samplers, as the trainer runs them.
  with jax.set_mesh(mesh):
    shapes = step_shapes(config, mesh, model_config)
    side = rollout_side(config, shapes, target)
    copy = [compile_program(p, target) for p in copy_programs(shapes, side)]
  with jax.set_mesh(side.mesh):
    sample = copy + [compile_program(p, target)
                     for p in sampler_programs(config, shapes, side)]
  with jax.set_mesh(mesh):
    updates, micro_batches_auto = update_stage(config, shapes, target)
  programs = sample + updates
  update = max(updates, key=lambda p: p["projected_s"])
  counted = sample + [update]  # A step runs every sample program and its phase's update.
  sample_s = sum(p["projected_s"] for p in sample)
  update_s = update["projected_s"]
  pool = (pool_report(config, shapes, side, target, programs)
          if config.rollout.engine == "continuous" else None)
  kv_cache = (pool["bytes_per_chip"] if pool else
              static_cache_bytes(config, shapes, side.mesh))
  report = {
      "target": target.name,
      "compiler": target.compiler,
      "chip": target.chip,
      "chips": target.chips,
      "peaks": {"bf16_flops": target.bf16_flops, "hbm_bandwidth": target.hbm_bandwidth,
                "hbm_bytes": target.hbm_bytes,
                "interconnect_bandwidth": target.interconnect_bandwidth},
      "mesh": dict(mesh.shape),
      "model": dataclasses.asdict(model_config),
      "engine": config.rollout.engine,
      "rollout_weights": side.weights.layout,
      "rollout_mesh": dict(side.mesh.shape),
      "rows": shapes.rows,
      "prompt_width": shapes.prompt_width,
      "max_new_tokens": config.rollout.max_new_tokens,
      "micro_batches": (micro_batches_auto or {}).get("micro_batches",
                                                      config.optim.micro_batches),
      **({"micro_batches_auto": micro_batches_auto} if micro_batches_auto else {}),
      "batch_devices": sharding.batch_devices(mesh),
      "bytes_per_chip": {**shapes.bytes, "rollout_copy": side.copy_bytes, "kv_cache": kv_cache},
      **({"pool": pool} if pool else {}),
      "programs": programs,
      "fits": all(p["fits"] for p in programs) and not (pool or {}).get("error"),
      "projected_sample_s": sample_s,
      "projected_sample_roofline_s": sum(p["roofline_s"] for p in sample),
      "projected_update_s": update_s,
      "projected_step_s": sample_s + update_s,
      "projected_comm_s": sum(p["comm_s"] or 0.0 for p in counted),
      "comm_unknown": [p["name"] for p in counted if p["comm_s"] is None],
      "projected_step_overlapped_s": sum(p["projected_overlapped_s"] for p in counted),
      "network": "chip-to-chip links of one slice or host only; the network between the hosts "
                 "of a GPU cluster or the slices of a multislice run is not modelled",
      "early_stopping": "none modelled: every decode step runs and the update has the full "
                        "response width (an upper bound; see prerl_jax/aot/programs.py)",
  }
  if lengths is not None:
    report["lengths"] = lengths_projection(config, shapes, side, target, lengths, programs)
  report["advice"] = report_lib.advice(report)
  return report


def report_text(config: ml_collections.ConfigDict, target: str, mesh_spec: str | None = None,
                as_json: bool = False, response_lengths: str | None = None) -> str:
  """The dry run of the command line: mesh as 'fsdp=8,tensor=1' or None; a summary or JSON;
  response_lengths: a `--response_lengths` spec or None."""
  report = dry_run(config, target, sharding.parse_mesh(mesh_spec) if mesh_spec else None,
                   response_lengths=response_lengths)
  return json.dumps(report, indent=2) if as_json else report_lib.format_report(report)
