"""The sample stage's programs, as the trainer runs them: the rollout copy of the weights and the
static or continuous engine's programs, with their modelled HBM traffic; the continuous engine's
pool, its schedule at the cap and over given response lengths.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from prerl_jax import errors, sharding
from prerl_jax.aot import response_lengths as response_lengths_lib, targets as targets_lib
from prerl_jax.aot.abstract_state import StepShapes
from prerl_jax.aot.programs import Program
from prerl_jax.generate import continuous as continuous_lib, page_pool, pool_budget
from prerl_jax.generate import rollout_weights, sampler as sampler_lib
from prerl_jax.generate.decode import block_shapes, block_sharding
from prerl_jax.models.config import ModelConfig
from prerl_jax.sharding import per_device_bytes


def _cache_block(c: ModelConfig, rows: int, slots: int, mesh) -> dict:
  """One layer's abstract cache block (k and v) of `slots` slots for `rows` rows."""
  return {name: jax.ShapeDtypeStruct(shape, c.compute_dtype,
                                     sharding=block_sharding(name, shape, mesh))
          for name, shape in block_shapes(c, rows, slots).items()}



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
    side = RolloutSide(plan, shapes.state.params, 0, shapes.compute_weights_bytes)
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
