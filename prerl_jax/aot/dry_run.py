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

Projected time (no latency): each program takes runs x (max(FLOPs / bf16 peak, bytes / HBM
bandwidth) + comm), its communication not overlapped with its work; the fully overlapped bound,
runs x max(compute, memory, comm), is reported beside it. comm: the bytes its collectives move
into one chip per run (`collectives.py`: read from the compiled program's text, each collective
counted through its loops' trips, by one per-chip rule per kind) over half the chip's published
bidirectional interconnect bandwidth (what flows into it). Only the chip-to-chip links of one
slice or host are modelled (every target is a single-slice TPU or a single-host GPU): the network
between the hosts of a GPU cluster or the slices of a multislice run is not. A program the
compiler refuses has no text: its comm is unknown (None).

FLOPs and bytes: the compiler's `cost_analysis()` counts every loop body once
(layer scan, micro-batch scan, vocabulary chunks, decode loop), so FLOPs are counted on the traced
program: every matmul, each scan body times its length, rematerialized forwards included, each
decode while_loop times its steps; the compiler's own figures are reported alongside. The
FLOPs inside Pallas kernels (splash attention, the TPU paged attention) are not counted: with
splash at 9k tokens, attention is about a quarter of Qwen3-4B's update FLOPs, so a TPU update
that is compute-bound is projected up to a third too fast. Bytes are
modelled: the train step reads and writes its arguments and reads the compute-dtype weights once
per pass per micro-batch; the sampler's decode step reads the compute-dtype weights and the cache
blocks it attends over. Early stopping: the decode loop ends when every row has stopped, and with
hundreds of rows one response reaching the cap is the common case, so every decode step
(max_new_tokens - 1) is counted, and the update is compiled at the full response width (the
trainer's width when one response is truncated): an upper bound for batches that all stop early.
Given response lengths (`--response_lengths`, response_lengths.py), the report's `lengths` adds
the continuous engine's sampling over them, scheduled by the engine's own scheduler on the host.

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
"""

import dataclasses
import json
import math
import time

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import ml_collections
from flax import nnx

from prerl_jax import errors, sharding
from prerl_jax.sharding import per_device_bytes
from prerl_jax.aot import collectives, report as report_lib, targets as targets_lib
from prerl_jax.aot import response_lengths as response_lengths_lib
from prerl_jax.generate import continuous as continuous_lib, page_pool, pool_budget
from prerl_jax.generate import rollout_weights, sampler as sampler_lib
from prerl_jax.generate.decode import block_shapes, block_sharding
from prerl_jax.models import attention, presets
from prerl_jax.models.config import ModelConfig
from prerl_jax.models.decoder import Decoder
from prerl_jax.rl import micro_batch_budget, train_step
from prerl_jax.rl.objective import CONDITIONAL, MARGINAL
from prerl_jax.rl.schedule import schedule_from_config

GIB = targets_lib.GIB


@dataclasses.dataclass(frozen=True)
class Program:
  """One program a training step runs: its traced form and what the projection needs of it.

  stage: "sample" or "update" (a step runs every sample program and one update program, its
    phase's). arguments: its abstract inputs (a key array counts as none). while_trips:
    iterations of each while_loop of the program, in trace order (its FLOPs; and its collectives,
    where a compiled loop's condition depends on data: collectives.py).
  hbm_bytes_moved: modelled HBM traffic of one run (module docstring).
  resident_bytes: train state held in HBM beside the program's arguments while it runs.
  runs: how many times a step runs it. Its FLOPs are spread over all of the target's chips.
  roofline_bytes: of one run of a decode program, the HBM bytes its decode steps must read (the
  weights once per step, the live rows' keys and values): the sample phase's roofline.
  """

  name: str
  stage: str
  traced: jax.stages.Traced
  arguments: tuple  # The abstract inputs it was traced for.
  hbm_bytes_moved: float
  while_trips: tuple[int, ...] = ()
  resident_bytes: int = 0
  runs: int = 1
  roofline_bytes: float = 0.0


def matmul_flops(jaxpr, while_trips=()) -> float:
  """Matmul FLOPs of a jaxpr: scan bodies times their length, while bodies times `while_trips`.

  while_trips: one trip count per while_loop, in trace order; a while_loop beyond them is an error
  (its count would be unknown).
  """
  trips = list(while_trips)
  total = _matmul_flops(jaxpr, trips)
  if trips:
    raise ValueError(f"{len(trips)} while_trips left over: the program has fewer while_loops")
  return total


def _matmul_flops(jaxpr, trips: list) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
      continue
    if name == "pallas_call":
      continue  # A fused kernel (splash, ragged paged attention): not counted (docstring).
    if name == "while":
      if not trips:
        raise ValueError("a while_loop without a trip count: pass one per loop in while_trips")
      count = trips.pop(0)
      total += count * (_matmul_flops(eqn.params["body_jaxpr"].jaxpr, [])
                        + _matmul_flops(eqn.params["cond_jaxpr"].jaxpr, []))
      continue
    inner = [_matmul_flops(sub, trips) for sub in _subjaxprs(eqn.params)]
    if name == "cond":
      total += max(inner, default=0.0)
    else:
      total += sum(inner) * (eqn.params["length"] if name == "scan" else 1)
  return total


def _subjaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jex.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jex.Jaxpr):
        yield item


def compile_program(program: Program, target: targets_lib.Target) -> dict:
  """Compiles a program for the target; its memory, FLOPs, collective traffic and projected
  seconds (module docstring).

  A program the compiler refuses for lack of memory is reported as not fitting, its peak
  the arguments plus the temporaries the compiler asked for (a lower bound: outputs unknown),
  its collectives unknown (None).
  """
  start = time.perf_counter()
  arguments = per_device_bytes(program.arguments)
  try:
    compiled = program.traced.lower().compile(target.compile_options)
  except jax.errors.JaxRuntimeError as error:
    temporaries = micro_batch_budget.refused_temporaries(error)
    if temporaries is None:
      raise
    compiled, status = None, "refused: out of memory"
    memory = {"argument_bytes": arguments, "output_bytes": 0, "alias_bytes": 0,
              "temp_bytes": int(temporaries), "code_bytes": 0}
    cost, traffic, own = {}, None, int(temporaries)
  else:
    status = "compiled"
    stats = compiled.memory_analysis()
    own = pool_budget.program_bytes(stats)
    memory = {"argument_bytes": stats.argument_size_in_bytes,
              "output_bytes": stats.output_size_in_bytes,
              "alias_bytes": stats.alias_size_in_bytes, "temp_bytes": stats.temp_size_in_bytes,
              "code_bytes": stats.generated_code_size_in_bytes}
    cost = compiled.cost_analysis() or {}
    try:
      traffic = collectives.traffic(compiled.as_text(), program.while_trips)
    except ValueError as error:
      raise ValueError(f"program {program.name}: {error}") from error
  seconds = time.perf_counter() - start
  compiler_peak = (memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
                   + memory["temp_bytes"] + memory["code_bytes"])
  peak = compiler_peak + program.resident_bytes
  flops = (matmul_flops(program.traced.jaxpr.jaxpr, program.while_trips)
           / target.chips)
  compute_s = flops / target.bf16_flops
  memory_s = program.hbm_bytes_moved / target.hbm_bandwidth
  comm_s = (collectives.seconds(traffic.total_bytes, target.interconnect_bandwidth)
            if traffic else 0.0)  # Per run.
  times = {"compute": compute_s, "memory": memory_s, "comm": comm_s}
  return {
      "name": program.name,
      "stage": program.stage,
      "compiler_status": status,
      "peak_bytes_per_chip": peak,
      "hbm_bytes_per_chip": target.hbm_bytes,
      "fits": compiled is not None and peak <= target.hbm_bytes,
      "headroom_bytes": target.hbm_bytes - peak,
      "compiler_peak_bytes": compiler_peak,
      "resident_bytes": program.resident_bytes,
      **memory,
      "program_bytes": own,  # Beyond its arguments (pool_budget.program_bytes).
      "runs": program.runs,
      "flops_per_chip": flops,
      "hbm_bytes_moved_per_chip": program.hbm_bytes_moved,
      "collective_bytes_per_chip": (
          {"total": traffic.total_bytes, **traffic.bytes} if traffic else None),
      "comm_s": program.runs * comm_s if traffic else None,
      "projected_s": program.runs * (max(compute_s, memory_s) + comm_s),
      "projected_overlapped_s": program.runs * max(times.values()),
      "roofline_s": program.runs * program.roofline_bytes / target.hbm_bandwidth,
      "bound": max(times, key=times.get),
      "compiler_cost_loop_bodies_once": {
          key: float(cost[key]) for key in ("flops", "bytes accessed", "optimal_seconds")
          if key in cost},
      "collectives": traffic.ops if traffic else None,  # How many run, by kind.
      "compile_s": seconds,
  }


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def model_config_for(config: ml_collections.ConfigDict,
                     target: targets_lib.Target | None = None) -> ModelConfig:
  """The run's ModelConfig from its preset's shape (model.name), with its dtypes, remat and
  attention backend as planned for the target (the report's model.attention): `auto` is splash
  on a TPU; on a GPU `auto` and `cudnn` are planned as chunked, as cuDNN builds its kernel on
  a real device (neither XLA:GPU's deviceless compile nor simulated CPU devices can)."""
  model = config.model
  backend = model.attention
  if target is not None and backend in ("auto", "cudnn"):
    backend = "splash" if target.compiler == "tpu" and backend == "auto" else "chunked"
  return presets.preset_model_config(model.name, param_dtype=model.param_dtype,
                                     dtype=model.dtype, remat=model.remat, attention=backend)


def make_target_mesh(target: targets_lib.Target, mesh_sizes: dict | None):
  """The run's mesh over the target's chips (all fsdp unless `mesh_sizes` says otherwise)."""
  sizes = mesh_sizes or {"fsdp": target.chips}
  mesh = sharding.make_mesh(**sizes, devices=targets_lib.target_devices(target))
  if mesh.size != target.chips:
    raise ValueError(f"--mesh={sizes} has {mesh.size} devices; target {target.name} has "
                     f"{target.chips} chips")
  return mesh


@dataclasses.dataclass(frozen=True)
class StepShapes:
  """The abstract (sharded ShapeDtypeStruct) state of a run and its sizes."""

  model: ModelConfig
  mesh: jax.sharding.Mesh
  state: train_step.TrainState
  graphdef: object
  optimizer: object
  rows: int
  prompt_width: int
  bytes: dict


def step_shapes(config: ml_collections.ConfigDict, mesh, model_config: ModelConfig) -> StepShapes:
  """Abstract train state, sizes and per-chip state bytes of `config` on `mesh`."""
  rollout, optim = config.rollout, config.optim
  rows = rollout.prompts_per_step * rollout.group_size
  batch_devices = sharding.batch_devices(mesh)
  if rollout.prompts_per_step % batch_devices:
    raise ValueError(f"rollout.prompts_per_step={rollout.prompts_per_step} is not divisible by "
                     f"the {batch_devices} devices of the data and fsdp mesh axes")
  abstract_model = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model)
  optimizer = train_step.make_optimizer(optim.learning_rate, optim.weight_decay, optim.grad_clip,
                                        optim.b1, optim.b2)
  with_reference = any(p.objective.kl_spaces for p in schedule_from_config(config.objective).phases)
  state = train_step.TrainState(
      params=abstract_params, opt_state=jax.eval_shape(optimizer.init, abstract_params),
      step=jax.ShapeDtypeStruct((), jnp.int32), rng=jax.eval_shape(jax.random.key, 0),
      skipped=jax.ShapeDtypeStruct((), jnp.int32),
      reference=abstract_params if with_reference else None)
  state = _with_shardings(state, train_step.train_state_shardings(state, mesh))
  grads = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding), state.params)
  width = sampler_lib.SamplingConfig(max_new_tokens=1, pad_id=0).bucket(
      config.data.max_prompt_length)
  bytes_ = {"params": per_device_bytes(state.params),
            "opt_state": per_device_bytes(state.opt_state),
            "reference": per_device_bytes(state.reference),
            "gradients": per_device_bytes(grads)}
  return StepShapes(model=model_config, mesh=mesh, state=state, graphdef=graphdef,
                    optimizer=optimizer, rows=rows, prompt_width=width, bytes=bytes_)


def _cache_block(c: ModelConfig, rows: int, slots: int, mesh) -> dict:
  """One layer's abstract cache block (k and v) of `slots` slots for `rows` rows."""
  return {name: jax.ShapeDtypeStruct(shape, c.compute_dtype,
                                     sharding=block_sharding(name, shape, mesh))
          for name, shape in block_shapes(c, rows, slots).items()}


def _compute_weights_bytes(shapes: StepShapes) -> float:
  """Bytes per chip of the whole model in its compute dtype, split over the tensor axis only."""
  elements = sum(math.prod(p.shape) for p in jax.tree.leaves(shapes.state.params))
  return elements * shapes.model.compute_dtype.itemsize / shapes.mesh.shape["tensor"]


def _sampling(rollout: ml_collections.ConfigDict) -> sampler_lib.SamplingConfig:
  return sampler_lib.SamplingConfig(
      max_new_tokens=rollout.max_new_tokens, pad_id=0, stop_ids=(0,),
      temperature=rollout.temperature, top_k=rollout.top_k, top_p=rollout.top_p,
      n=rollout.group_size)


def _abstract_key(mesh):
  key = jax.eval_shape(jax.random.key, 0)
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class RolloutSide:
  """What the samplers run from, as the trainer makes it (generate/rollout_weights.py).

  weights: the resolved layout, its mesh (the samplers') and the copy's shardings. params: the
  abstract weights the samplers read (the copy; the trainer's params for `trainer`).
  copy_bytes: the copy per chip (0 for `trainer`). decode_weights_bytes: the compute-dtype
  weights one chip's decode step reads. pool: the continuous engine's pool, its pages resolved
  (None for the static engine); budget: what it was sized from (kv_cache_gib=auto), else None.
  """

  weights: rollout_weights.RolloutWeights
  params: object
  copy_bytes: int
  decode_weights_bytes: float
  pool: continuous_lib.PoolConfig | None = None
  budget: pool_budget.Budget | None = None

  @property
  def mesh(self):
    return self.weights.mesh


def rollout_side(config: ml_collections.ConfigDict, shapes: StepShapes,
                 target: targets_lib.Target) -> RolloutSide:
  """The rollout weights of `config.rollout.weights` resolved for the target's HBM; for the
  continuous engine with kv_cache_gib=auto, the pool its budget leaves (pool_budget.py: the
  sampler programs are compiled once for a pool of one sequence to measure their own bytes)."""
  plan = rollout_weights.RolloutWeights.build(config.rollout.weights, shapes.model, shapes.mesh,
                                              target.hbm_bytes)
  if plan.layout == "trainer":
    side = RolloutSide(plan, shapes.state.params, 0, _compute_weights_bytes(shapes))
  else:
    copy_bytes = plan.bytes_per_chip(shapes.model)
    params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, plan.dtype, sharding=s),
                          shapes.state.params, plan.shardings)
    side = RolloutSide(plan, params, copy_bytes, copy_bytes)
  if config.rollout.engine != "continuous":
    return side
  pool = continuous_lib.PoolConfig.from_rollout(config.rollout)
  if pool.kv_cache_gib != "auto":
    return dataclasses.replace(side, pool=pool)
  with jax.set_mesh(side.mesh):
    program_bytes = pool_budget.sampler_program_bytes(
        _continuous_sampler(shapes, side, pool), side.params, _abstract_key(side.mesh),
        _sampling(config.rollout), shapes.prompt_width, target.compile_options)
  budget = _budget(shapes, side, target, program_bytes)
  pages = pool_budget.pool_pages(budget, shapes.model, pool.page_size, side.mesh)
  return dataclasses.replace(side, pool=dataclasses.replace(pool, pages=pages), budget=budget)


def _budget(shapes: StepShapes, side: RolloutSide, target: targets_lib.Target,
            program_bytes: float) -> pool_budget.Budget:
  state = shapes.bytes["params"] + shapes.bytes["opt_state"] + shapes.bytes["reference"]
  return pool_budget.Budget(target.hbm_bytes, state, side.copy_bytes, program_bytes)


def _continuous_sampler(shapes: StepShapes, side: RolloutSide,
                        pool: continuous_lib.PoolConfig) -> continuous_lib.ContinuousSampler:
  return continuous_lib.ContinuousSampler(nnx.merge(shapes.graphdef, side.params), pool,
                                          side.mesh)


def _sampler_resident_bytes(shapes: StepShapes, side: RolloutSide) -> int:
  """Train state held beside a sampler program's arguments: all of it beside a copy; the
  optimizer state and reference where the samplers read the trainer's params."""
  state = shapes.bytes["opt_state"] + shapes.bytes["reference"]
  return state + (shapes.bytes["params"] if side.weights.layout != "trainer" else 0)


def copy_programs(shapes: StepShapes, side: RolloutSide) -> list[Program]:
  """The rollout copy (`rollout_weights.rollout_copy`: cast and reshard, once per step), where
  the layout makes one. It reads each chip's share of the params and writes its copy."""
  if side.weights.layout == "trainer":
    return []
  plan = side.weights
  traced = jax.jit(lambda params: rollout_weights.rollout_copy(
      params, plan.shardings, plan.dtype)).trace(shapes.state.params)
  return [Program("rollout:copy", "sample", traced, (shapes.state.params,),
                  shapes.bytes["params"] + side.copy_bytes,
                  resident_bytes=shapes.bytes["opt_state"] + shapes.bytes["reference"])]


def sampler_programs(config: ml_collections.ConfigDict, shapes: StepShapes,
                     side: RolloutSide) -> list[Program]:
  """The programs of the rollout engine the run config names (`rollout.engine`), on the
  rollout weights' mesh and reading them."""
  if config.rollout.engine == "continuous":
    return continuous_sampler_programs(config, shapes, side)
  return static_sampler_programs(config, shapes, side)


def static_sampler_programs(config: ml_collections.ConfigDict, shapes: StepShapes,
                            side: RolloutSide) -> list[Program]:
  """The static sampler's program as the trainer runs it (XLA's decode code, as on an
  accelerator)."""
  rollout, mesh, c = config.rollout, side.mesh, shapes.model
  model = nnx.merge(shapes.graphdef, side.params)
  sampler = sampler_lib.Sampler(model, mesh, kernels="xla")
  prompts = jax.ShapeDtypeStruct((rollout.prompts_per_step, shapes.prompt_width), jnp.int32,
                                 sharding=sharding.batch_sharding(mesh, 2))
  arguments = (side.params, prompts, prompts.update(dtype=jnp.bool_))
  traced = sampler.trace(*arguments, _abstract_key(mesh), _sampling(rollout))
  # Each decode step reads the compute-dtype weights and the blocks it attends over: the prompt
  # block, the blocks of earlier segments and its own segment's whole block.
  segments = sampler_lib.decode_segments(rollout.max_new_tokens)
  weights = side.decode_weights_bytes
  block = lambda rows, slots: c.num_layers * per_device_bytes(_cache_block(c, rows, slots, mesh))
  attended = block(rollout.prompts_per_step, shapes.prompt_width)
  decode = 0.0
  for first, end in segments:
    attended += block(shapes.rows, end - first)
    decode += (end - first) * (weights + attended)
  return [Program("sampler", "sample", traced, arguments, weights + decode,
                  while_trips=tuple(end - first for first, end in segments),
                  resident_bytes=_sampler_resident_bytes(shapes, side), roofline_bytes=decode)]


def static_cache_bytes(config: ml_collections.ConfigDict, shapes: StepShapes, mesh) -> int:
  """The static sampler's KV cache per chip: a prompt block and a generated block per layer."""
  rollout, c = config.rollout, shapes.model
  return per_device_bytes(
      [_cache_block(c, rollout.prompts_per_step, shapes.prompt_width, mesh),
       _cache_block(c, shapes.rows, rollout.max_new_tokens - 1, mesh)] * c.num_layers)


def continuous_pool(config: ml_collections.ConfigDict, shapes: StepShapes,
                    side: RolloutSide) -> tuple:
  """The continuous engine's (PoolConfig, abstract pool, batch shards, pages per shard)."""
  pool_struct = continuous_lib.abstract_pool(side.pool, shapes.model, shapes.prompt_width,
                                             config.rollout.max_new_tokens, side.mesh)
  shards = page_pool.shards(side.mesh)
  return side.pool, pool_struct, shards, pool_struct.shape[1] // shards


def cap_bound(rollout: ml_collections.ConfigDict, pool: continuous_lib.PoolConfig, shards: int,
              pages: int, prompt_width: int) -> dict:
  """The continuous engine's schedule with every response at the cap, by formula.

  Each shard's live rows hold as many groups as its rows and pool pages allow (a group: its
  prompt's pages once, each sample's response pages), and each wave of groups over all shards
  decodes max_new_tokens steps in chunks of chunk_steps. The engine's scheduler gives the same
  waves and steps when rows, not pages, bound the groups (tests/aot/test_response_lengths.py);
  where pages do, it admits more groups, as their first chunks fit, and puts the newest back in
  the queue as the pool runs short (`--response_lengths=fixed:<max_new_tokens>` shows it).
  `pool_groups_per_shard`: the groups the pages alone hold.
  """
  prompt_pages = -(-prompt_width // pool.page_size)
  response_pages = -(-rollout.max_new_tokens // pool.page_size)
  pool_groups = (pages - 1) // (prompt_pages + rollout.group_size * response_pages)
  groups = min(pool.rows // rollout.group_size, pool_groups)
  if groups < 1:
    raise ValueError(
        f"rollout.kv_cache_gib={rollout.kv_cache_gib}: the pool's {pages} pages of "
        f"{pool.page_size} slots cannot hold one group of {rollout.group_size} responses of "
        f"{rollout.max_new_tokens} tokens to a {prompt_width}-token prompt "
        f"({prompt_pages + rollout.group_size * response_pages} pages); raise it")
  waves = -(-rollout.prompts_per_step // (groups * shards))
  chunks = waves * -(-rollout.max_new_tokens // pool.chunk_steps)
  return {"groups_per_shard": groups, "pool_groups_per_shard": pool_groups, "waves": waves,
          "decode_chunks": chunks, "decode_steps": chunks * pool.chunk_steps}


def _position_bytes(pool_struct, pool: continuous_lib.PoolConfig, pages: int) -> float:
  """Bytes per chip of one position's keys and values in the pool."""
  return per_device_bytes(pool_struct) / (pages * pool.page_size)


def continuous_sampler_programs(config: ml_collections.ConfigDict, shapes: StepShapes,
                                side: RolloutSide) -> list[Program]:
  """The continuous engine's prefill chunk and decode chunk over its page pool.

  Runs per step, with every response at the cap (as for the static sampler; `cap_bound`): each
  prompt is prefilled in chunks of `prefill_chunk` tokens (its bucket width, an upper bound), a
  prompt per batch shard per call, and the decode chunk runs the bound's chunks. A decode step
  reads the compute-dtype weights and, per row of a chip's shard (the groups its rows and pool
  hold, at most a shard's share of the prompts), the keys and values of half a response past its
  prompt (the mean over the response). Rows and pages are split over the batch
  axes and kv heads over the tensor axis, so the FLOPs are spread over every chip. Given response
  lengths, `lengths_projection` runs the engine's scheduler instead.
  """
  rollout = config.rollout
  pool, pool_struct, shards, pages = continuous_pool(config, shapes, side)
  sampler = _continuous_sampler(shapes, side, pool)
  traced = sampler.trace(side.params, _abstract_key(side.mesh), _sampling(rollout),
                         shapes.prompt_width)
  bound = cap_bound(rollout, pool, shards, pages, shapes.prompt_width)
  weights = side.decode_weights_bytes
  prefill_calls = -(-rollout.prompts_per_step // shards)  # Also the most prompts of a shard.
  attended = (min(bound["groups_per_shard"], prefill_calls) * rollout.group_size
              * (shapes.prompt_width + rollout.max_new_tokens / 2))
  resident = _sampler_resident_bytes(shapes, side)
  arguments = (side.params, pool_struct)
  decode = pool.chunk_steps * (weights + attended * _position_bytes(pool_struct, pool, pages))
  return [
      Program("sampler:prefill", "sample", traced["prefill"], arguments, weights,
              resident_bytes=resident,
              runs=prefill_calls * -(-(shapes.prompt_width - 1) // pool.prefill_chunk)),
      Program("sampler:decode", "sample", traced["decode"], arguments, decode,
              while_trips=(pool.chunk_steps,), resident_bytes=resident,
              runs=bound["decode_chunks"], roofline_bytes=decode),
  ]


def pool_report(config: ml_collections.ConfigDict, shapes: StepShapes, side: RolloutSide,
                target: targets_lib.Target, programs: list[dict]) -> dict:
  """The continuous engine's pool: its setting, pages and bytes, the budget of the HBM left
  (pool_budget.py; for an explicit kv_cache_gib from the compiled programs, and `error` where
  the engine would refuse it at start), and the rows it feeds at the cap."""
  pool, pool_struct, shards, pages = continuous_pool(config, shapes, side)
  budget = side.budget or _budget(shapes, side, target, max(
      p["program_bytes"] for p in programs if p["name"].startswith("sampler:")))
  bound = cap_bound(config.rollout, pool, shards, pages, shapes.prompt_width)
  report = {"kv_cache_gib": config.rollout.kv_cache_gib, "pages_per_shard": pages,
            "shards": shards, "bytes_per_chip": per_device_bytes(pool_struct),
            "budget": {**budget.as_dict(), "text": budget.describe()},
            "live_rows": pool.rows, "rows_at_cap": bound["groups_per_shard"]
            * config.rollout.group_size, "pool_rows_at_cap": bound["pool_groups_per_shard"]
            * config.rollout.group_size, "waves": bound["waves"],
            "decode_steps": bound["decode_steps"]}
  if pool.kv_cache_gib not in ("auto", None):
    try:
      pool_budget.check_fits(pool.kv_cache_gib, budget, shapes.model, pool.page_size, side.mesh)
    except errors.UserError as error:
      report["error"] = str(error)
  return report


STATIC_LENGTHS = ("not modelled for rollout.engine=static: its decode loop runs until the "
                  "batch's longest response stops, with many rows about the cap; the "
                  "all-at-the-cap projection stands")


def lengths_projection(config: ml_collections.ConfigDict, shapes: StepShapes,
                       side: RolloutSide, target: targets_lib.Target,
                       lengths: response_lengths_lib.Lengths, programs: list[dict]) -> dict:
  """The continuous engine's sampling over given response lengths (response_lengths.py), beside
  the all-at-the-cap bound; per logged step and their mean where a run's lengths are given.

  The engine's scheduler runs on the host over each step's lengths; each decode chunk is priced
  from the compiled decode program (`response_lengths.project`), each prefill call as the
  compiled prefill chunk. The step adds the rollout copy (`copy_s`) and the update at the full
  response width.
  """
  head = {"source": lengths.source, "steps": lengths.steps, "responses": shapes.rows}
  if config.rollout.engine != "continuous":
    return {**head, "note": STATIC_LENGTHS}
  pool, pool_struct, shards, pages = continuous_pool(config, shapes, side)
  by_name = {p["name"]: p for p in programs}
  decode, prefill = by_name["sampler:decode"], by_name["sampler:prefill"]
  costs = response_lengths_lib.DecodeCosts(
      flops=decode["flops_per_chip"] / pool.chunk_steps, rows=pool.rows,
      weights_bytes=side.decode_weights_bytes,
      token_bytes=_position_bytes(pool_struct, pool, pages),
      comm_s=(decode.get("comm_s") or 0.0) / decode["runs"] / pool.chunk_steps)
  per_step = [
      response_lengths_lib.project(
          response_lengths_lib.simulate(lengths_N, config.rollout, pool, shards, pages,
                                    shapes.prompt_width),
          costs, prefill["projected_s"] / prefill["runs"], target.bf16_flops,
          target.hbm_bandwidth)
      for lengths_N in lengths.sets]
  update_s = max(p["projected_s"] for p in programs if p["stage"] == "update")
  copy_s = sum(p["projected_s"] for p in programs if p["name"] == "rollout:copy")
  mean = response_lengths_lib.mean_of(per_step)
  return {**head, "decode_rows": shards * pool.rows,
          "bound": cap_bound(config.rollout, pool, shards, pages, shapes.prompt_width), **mean,
          "copy_s": copy_s, "projected_step_s": mean["projected_sample_s"] + copy_s + update_s,
          **({"per_step": per_step} if len(per_step) > 1 else {})}


def train_programs(config: ml_collections.ConfigDict, shapes: StepShapes,
                   micro_batches: int) -> list[Program]:
  """Each schedule phase's train step as the trainer runs it with `micro_batches`, over the
  largest batch a step brings (micro_batch_budget.py: every response at the cap, packed as the
  trainer packs it where optim.pack)."""
  state = shapes.state
  weights = _compute_weights_bytes(shapes)
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
                        "response width (an upper bound; see prerl_jax/aot/dry_run.py)",
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
