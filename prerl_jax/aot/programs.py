"""One program of a training step: its compile for a target, memory, FLOPs, communication and
projected seconds.

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
"""

import dataclasses
import math
import time

import jax
import jax.extend.core as jex

from prerl_jax.aot import collectives, targets as targets_lib
from prerl_jax.generate import pool_budget
from prerl_jax.rl import micro_batch_budget
from prerl_jax.sharding import per_device_bytes


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
