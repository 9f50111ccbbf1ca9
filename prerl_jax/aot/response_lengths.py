"""Response lengths for the dry run: the continuous engine's schedule over them, and its time.

`--response_lengths=` takes the path of a run's metrics.jsonl, whose training rows log every
response's length (`response/lengths`, prompt i's samples at i*G .. i*G+G-1; older runs log only
their mean and max, which a projection cannot use), or a named distribution with a mean:
`fixed:4096`, `uniform:mean=1500` (uniform on 1 .. 2 x mean - 1) or
`lognormal:mean=1500[,sigma=1.0]` (sigma of the logarithm; right-skewed, like responses to math
problems). Lengths are clipped to [1, max_new_tokens]; a distribution is drawn once, one length
per response (rows = prompts x group size), with a fixed seed. From a metrics.jsonl, at most
`STEPS_PROJECTED` logged steps are projected, evenly spaced, the last included.

`simulate` runs the engine's own scheduler (`generate/schedule.py`: admission, page reservation,
preemption, retirement, chunk widths) over one step's lengths with the run's pool, every prompt
at its bucket width; `project` prices the chunks it ran from the compiled decode program
(`decode_costs`).
"""

import collections
import json
import math
import os
from typing import NamedTuple

import numpy as np

from prerl_jax import errors
from prerl_jax.generate import continuous, schedule

FLAG = "--response_lengths"
SEED = 0
STEPS_PROJECTED = 8
DISTRIBUTIONS = {"fixed": {}, "uniform": {}, "lognormal": {"sigma": 1.0}}  # Parameters but mean.


class Lengths(NamedTuple):
  """Response lengths to project: one array per step (`steps`: the run's step of each, or None
  for a distribution), and where they came from."""
  source: str
  sets: list[np.ndarray]
  steps: list[int] | None


def parse(spec: str, responses: int, max_new_tokens: int) -> Lengths:
  """The lengths `spec` names (module docstring), `responses` per step, clipped to
  [1, max_new_tokens]. A bad spec, a missing file or a row without lengths is a UserError."""
  name, _, arguments = spec.partition(":")
  if name in DISTRIBUTIONS:
    lengths = _drawn(spec, name, arguments, responses)
    return Lengths(spec, [np.clip(lengths, 1, max_new_tokens)], None)
  if os.path.isfile(spec):
    steps, sets = _logged(spec, responses)
    return Lengths(spec, [np.clip(s, 1, max_new_tokens) for s in sets], steps)
  if os.sep in spec or spec.endswith(".jsonl"):
    raise errors.UserError(f"{FLAG}={spec}: no such file")
  raise errors.UserError(f"{FLAG}={spec}: unknown distribution {name!r} and no such file; give "
                         f"a run's metrics.jsonl or one of {', '.join(DISTRIBUTIONS)} with a "
                         "mean, e.g. lognormal:mean=1500")


def _drawn(spec: str, name: str, arguments: str, responses: int) -> np.ndarray:
  parameters = {"mean": None, **DISTRIBUTIONS[name]}
  for item in filter(None, arguments.split(",")):
    key, has_value, value = item.partition("=")
    key, value = (key, value) if has_value else ("mean", key)
    try:
      ok = key in parameters and float(value) > 0
    except ValueError:
      ok = False
    if not ok:
      raise errors.UserError(f"{FLAG}={spec}: {item!r} is not a positive value of "
                             f"{' or '.join(parameters)} ({name}:mean=M"
                             f"{''.join(f',{k}=...' for k in DISTRIBUTIONS[name])})")
    parameters[key] = float(value)
  mean = parameters["mean"]
  if mean is None:
    raise errors.UserError(f"{FLAG}={spec}: {name} needs a mean, e.g. {name}:mean=1500")
  rng = np.random.default_rng(SEED)
  if name == "fixed":
    return np.full(responses, round(mean))
  if name == "uniform":
    return rng.integers(1, max(2 * round(mean) - 1, 1), endpoint=True, size=responses)
  sigma = parameters["sigma"]
  return np.round(rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, responses)).astype(int)


def _logged(path: str, responses: int) -> tuple[list[int], list[np.ndarray]]:
  """The steps and lengths of the training rows of a metrics.jsonl (evaluation rows have no
  response metrics), at most STEPS_PROJECTED of them, evenly spaced, the last included."""
  steps, sets = [], []
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      where = f"{FLAG}={path} line {line_number}"
      try:
        row = json.loads(line) if line.strip() else {}
      except json.JSONDecodeError as error:
        raise errors.UserError(f"{where}: not JSON ({error})") from error
      if "response/tokens_mean" not in row:
        continue
      lengths = row.get("response/lengths")
      if lengths is None:
        raise errors.UserError(
            f"{where} (step {row.get('step')}): no response/lengths (the run predates their "
            f"logging); give a distribution instead, e.g. "
            f"lognormal:mean={row['response/tokens_mean']:.0f}")
      if len(lengths) != responses:
        raise errors.UserError(
            f"{where} (step {row.get('step')}): {len(lengths)} response lengths, but this run "
            f"samples {responses} per step (rollout.prompts_per_step x rollout.group_size)")
      steps.append(row.get("step"))
      sets.append(np.asarray(lengths, np.int64))
  if not sets:
    raise errors.UserError(f"{FLAG}={path}: no training rows (with response/tokens_mean)")
  picked = np.unique(np.linspace(0, len(sets) - 1, min(len(sets), STEPS_PROJECTED)).round())
  return [steps[i] for i in picked.astype(int)], [sets[i] for i in picked.astype(int)]


def simulate(lengths_N: np.ndarray, rollout, pool: continuous.PoolConfig, shards: int,
             pages: int, prompt_width: int) -> schedule.Simulation:
  """The engine's scheduler run over one step's lengths (prompt i's samples at i*G ..), with
  `shards` batch shards of `pool.rows` rows and `pages` pages each, every prompt of
  `prompt_width` tokens."""
  group = rollout.group_size
  groups = [schedule.Group([0] * prompt_width, list(range(i * group, (i + 1) * group)),
                           rollout.max_new_tokens) for i in range(rollout.prompts_per_step)]
  per_sequence = continuous.pages_per_sequence(pool, prompt_width, rollout.max_new_tokens)
  run = schedule.Simulation(lengths_N, groups, shards, pool.rows, pages, pool.page_size,
                            pool.chunk_steps, per_sequence, pool.prefill_chunk)
  run.run()
  return run


class DecodeCosts(NamedTuple):
  """One decode step per chip, from the compiled decode program: its FLOPs at `rows` rows per
  shard, the compute-dtype weight bytes it reads, the bytes of one position's keys and values,
  its communication seconds."""
  flops: float
  rows: int
  weights_bytes: float
  token_bytes: float
  comm_s: float


def project(run: schedule.Simulation, costs: DecodeCosts, prefill_call_s: float,
            bf16_flops: float, hbm_bandwidth: float) -> dict:
  """What a simulated step ran, and its projected sampling seconds per chip.

  A decode chunk of s steps at w rows per shard takes max(s x FLOPs x w / rows / peak, (s x
  weight bytes + the busiest shard's attended positions x position bytes) / HBM bandwidth) plus
  s x the step's communication (its weights are gathered whatever the width); a prefill call
  takes what the compiled prefill chunk does (narrower calls too: an upper bound).
  """
  decode_s = comm_s = 0.0
  for chunk in run.chunks:
    compute = chunk.steps * costs.flops * chunk.width / costs.rows / bf16_flops
    memory = ((chunk.steps * costs.weights_bytes + chunk.attended * costs.token_bytes)
              / hbm_bandwidth)
    decode_s += max(compute, memory) + chunk.steps * costs.comm_s
    comm_s += chunk.steps * costs.comm_s
  steps = sum(chunk.steps for chunk in run.chunks)
  widths = collections.Counter(chunk.width for chunk in run.chunks)
  prefill_calls = sum(run.prefills.values())
  return {
      "mean": float(run.lengths.mean()),
      "max": int(run.lengths.max()),
      "waves": run.rounds,
      "admissions": run.admissions,
      "preemptions": run.preemptions,
      "prefill_calls": prefill_calls,
      "decode_chunks": {str(width): widths[width] for width in sorted(widths)},
      "decode_steps": steps,
      "live_rows_mean": sum(chunk.row_steps for chunk in run.chunks) / steps,
      "prefill_s": prefill_calls * prefill_call_s,
      "decode_s": decode_s,
      "comm_s": comm_s,
      "projected_sample_s": prefill_calls * prefill_call_s + decode_s,
  }


def mean_of(projections: list[dict]) -> dict:
  """`project`'s figures over several steps: their mean (decode chunks per width included), and
  the longest response of all; one step's as they are."""
  if len(projections) == 1:
    return projections[0]
  widths = sorted({w for p in projections for w in p["decode_chunks"]}, key=int)
  mean = {key: sum(p[key] for p in projections) / len(projections)
          for key in projections[0] if key != "decode_chunks"}
  mean["max"] = max(p["max"] for p in projections)
  mean["decode_chunks"] = {w: sum(p["decode_chunks"].get(w, 0) for p in projections)
                           / len(projections) for w in widths}
  return mean


def summary_line(lengths: dict) -> str:
  """The dry-run summary's line for a report's `lengths` (sample_programs.lengths_projection)."""
  head = f"response lengths {lengths['source']}"
  if "note" in lengths:
    return f"{head}: {lengths['note']}"
  if lengths["steps"]:
    head += f" (mean over logged steps {', '.join(map(str, lengths['steps']))})"
  chunks = ", ".join(f"{n:.0f} at {w} rows" for w, n in lengths["decode_chunks"].items())
  bound = lengths["bound"]
  return (f"{head}: mean {lengths['mean']:.0f} tokens (max {lengths['max']:.0f}); the engine's "
          f"scheduler: {lengths['waves']:.0f} waves ({lengths['admissions']:.0f} admissions, "
          f"{lengths['preemptions']:.0f} preemptions), {lengths['prefill_calls']:.0f} prefill "
          f"calls, {lengths['decode_steps']:.0f} decode steps in chunks ({chunks} per shard), "
          f"{lengths['live_rows_mean']:.0f} of {lengths['decode_rows']} rows live per step; "
          f"projected sample {lengths['projected_sample_s']:.1f} s (communication "
          f"{lengths['comm_s']:.1f} s), step {lengths['projected_step_s']:.1f} s (all at the "
          f"cap: {bound['waves']} waves, {bound['decode_steps']} decode steps)")
