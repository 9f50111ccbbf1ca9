"""Ahead-of-time dry run: compile a run's sampler and train steps on a mesh; predict memory, time.

Nothing is allocated: parameters, optimizer state, KV cache and batch are `jax.ShapeDtypeStruct`s
carrying their shardings, and the programs are lowered and compiled for the requested mesh
(simulated with host CPU devices when the real one is not at hand). Per device it reports:

- state bytes (params, optimizer state, float32 gradient accumulator, KV cache), exact from the
  shardings;
- each program's peak from XLA's `memory_analysis()`: arguments + outputs - donated aliases +
  temporaries. This is the CPU backend's buffer assignment, a close but not exact stand-in for a
  TPU / GPU one;
- collectives in the compiled program text (ops inside a loop body counted once);
- FLOPs. XLA's `cost_analysis()` counts each while-loop body once (layer scan, micro-batch scan,
  vocabulary chunks, decode loop), so FLOPs are counted on the traced program instead: every
  matmul, each scan body times its length, rematerialized forwards included, divided evenly over
  the devices. XLA's own number is reported alongside for reference.

Time projections (no communication or latency modelled): the train step takes
max(FLOPs / peak, bytes / bandwidth), bytes being the state read and written plus one read of the
(fsdp-gathered) compute-dtype weights per pass per micro-batch; the sampler takes the prefill FLOPs
/ peak plus `max_new_tokens - 1` memory-bound decode steps, each reading the per-device weights
and the whole KV cache (an upper bound: the sampler's early decode segments attend over fewer
slots).
"""

import dataclasses
import json
import math

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import ml_collections
from flax import nnx

from prerl_jax.models import presets
from prerl_jax.training import run_config
from prerl_jax.generate import sampler as sampler_lib
from prerl_jax import sharding
from prerl_jax.rl import train_step
from prerl_jax.generate.decode import block_shapes, block_sharding
from prerl_jax.models.decoder import Decoder
from prerl_jax.models.config import ModelConfig
from prerl_jax.rl.objective import CONDITIONAL, MARGINAL

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
GIB = 2**30
# The dry run never executes code: skip LLVM optimization (halves CPU compile time; buffer
# assignment, and so the memory analysis, is unchanged).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """Public peak numbers of one chip: dense bf16 FLOP/s, HBM bytes/s and HBM bytes."""

  name: str
  bf16_flops: float
  hbm_bandwidth: float
  hbm_bytes: float


ACCELERATORS = {
    "v5p": Accelerator("TPU v5p", 459e12, 2765e9, 95 * GIB),
    "v5e": Accelerator("TPU v5e", 197e12, 819e9, 16 * GIB),
    "h100": Accelerator("H100 SXM", 989e12, 3350e9, 80e9),
    "h200": Accelerator("H200 SXM", 989e12, 4800e9, 141e9),
}


def get_accelerator(name: str) -> Accelerator:
  """The ACCELERATORS entry of `name`; an unknown name is an error listing the valid ones."""
  if name not in ACCELERATORS:
    raise ValueError(f"accelerator={name!r} is unknown; valid: {', '.join(ACCELERATORS)}")
  return ACCELERATORS[name]


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded arrays or ShapeDtypeStructs (its largest)."""
  totals = {}
  for leaf in jax.tree.leaves(tree):
    size = math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    for device in leaf.sharding.device_set:
      totals[device] = totals.get(device, 0) + size
  return max(totals.values(), default=0)


def matmul_flops(jaxpr) -> float:
  """Matmul FLOPs of a jaxpr: scan bodies times their length, while-loop bodies not counted."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    if name == "while":
      continue
    inner = [matmul_flops(sub) for sub in _subjaxprs(eqn.params)]
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


def _program_report(traced, num_devices: int) -> dict:
  """Compiles a traced program; its memory analysis, FLOPs and collectives per device."""
  compiled = traced.lower().compile(FAST_COMPILE)
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  xla_cost = compiled.cost_analysis() or {}
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return {
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "alias_bytes": memory.alias_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      "peak_bytes": peak,
      "flops": matmul_flops(traced.jaxpr.jaxpr) / num_devices,
      "xla_flops_loop_bodies_once": float(xla_cost.get("flops", 0.0)),
      "collectives": {op: text.count(f" {op}(") + text.count(f" {op}-start(")
                      for op in COLLECTIVES},
  }


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _batch(rows: int, prompt_len: int, response_len: int, mesh) -> dict:
  shapes = {"prompt_tokens": ((rows, prompt_len), jnp.int32),
            "prompt_mask": ((rows, prompt_len), jnp.bool_),
            "response_tokens": ((rows, response_len), jnp.int32),
            "response_mask": ((rows, response_len), jnp.bool_),
            "sampler_logp": ((rows, response_len), jnp.float32),
            "rewards": ((rows,), jnp.float32)}
  return {k: jax.ShapeDtypeStruct(shape, dtype,
                                  sharding=sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def model_config_for(config: ml_collections.ConfigDict) -> ModelConfig:
  """The run's ModelConfig from its preset's shape (model.name), with its dtypes and remat."""
  model = config.model
  return presets.preset_model_config(model.name, param_dtype=model.param_dtype,
                                     dtype=model.dtype, remat=model.remat,
                                     attention=model.attention)


def _mesh(mesh_sizes: dict):
  sizes = {"data": 1, "fsdp": 1, "tensor": 1, **mesh_sizes}
  wanted = math.prod(sizes.values())
  if -1 in sizes.values() or wanted > jax.device_count():
    raise ValueError(
        f"mesh {mesh_sizes} needs {wanted if -1 not in sizes.values() else 'explicit'} devices "
        f"(no -1 in a dry run); {jax.device_count()} are available: set XLA_FLAGS="
        f"--xla_force_host_platform_device_count=N and JAX_PLATFORMS=cpu before importing jax")
  return sharding.make_mesh(**sizes, devices=jax.devices()[:wanted])


def dry_run(config: ml_collections.ConfigDict, mesh_sizes: dict, accelerator: str = "v5p",
            model_config: ModelConfig | None = None) -> dict:
  """Compiles the sampler and each phase's train step of `config` for a mesh; see module doc.

  mesh_sizes: e.g. {'fsdp': 8, 'tensor': 1} (sharding.parse_mesh); missing axes are 1.
  model_config: the model shape (default: the preset named by config.model.name).
  """
  accel = get_accelerator(accelerator)
  model_config = model_config or model_config_for(config)
  mesh = _mesh(mesh_sizes)
  devices = mesh.size
  rollout = config.rollout
  rows = rollout.prompts_per_step * rollout.group_size
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if rollout.prompts_per_step % batch_devices:
    raise ValueError(f"rollout.prompts_per_step={rollout.prompts_per_step} is not divisible by "
                     f"the {batch_devices} devices of the data and fsdp mesh axes")

  abstract_model = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model)
  optim = config.optim
  optimizer = train_step.make_optimizer(optim.learning_rate, optim.weight_decay, optim.grad_clip,
                                        optim.b1, optim.b2)
  schedule = run_config.schedule_of(config)
  with_reference = any(p.objective.kl_spaces for p in schedule.phases)
  state = train_step.TrainState(
      params=abstract_params, opt_state=jax.eval_shape(optimizer.init, abstract_params),
      step=jax.ShapeDtypeStruct((), jnp.int32), rng=jax.eval_shape(jax.random.key, 0),
      skipped=jax.ShapeDtypeStruct((), jnp.int32),
      reference=abstract_params if with_reference else None)
  state = _with_shardings(state, train_step.train_state_shardings(state, mesh))
  grads = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding), state.params)

  sampling = sampler_lib.SamplingConfig(
      max_new_tokens=rollout.max_new_tokens, pad_id=0, stop_ids=(0,),
      temperature=rollout.temperature, top_k=rollout.top_k, top_p=rollout.top_p,
      n=rollout.group_size)
  width = sampling.bucket(config.data.max_prompt_length)
  c = model_config

  def cache_block(block_rows, slots):
    return {name: jax.ShapeDtypeStruct(shape, c.compute_dtype,
                                       sharding=block_sharding(name, shape, mesh))
            for name, shape in block_shapes(c, block_rows, slots).items()}

  # Per layer: the prompt block (each prompt once) and the generated slots of every row.
  cache = [cache_block(rollout.prompts_per_step, width),
           cache_block(rows, rollout.max_new_tokens - 1)] * c.num_layers
  prompts = jax.ShapeDtypeStruct((rollout.prompts_per_step, width), jnp.int32,
                                 sharding=sharding.batch_sharding(mesh, 2))
  # Sampler.sample needs concrete prompts: its jitted program is traced directly instead.
  # XLA's decode code, as an accelerator runs it (the CPU kernels would hide its temporaries).
  sampler = sampler_lib.Sampler(abstract_model, mesh, kernels="xla")
  sample_program = sampler._program  # pylint: disable=W0212
  sampler_traced = sample_program.trace(
      state.params, prompts, prompts.update(dtype=jnp.bool_),
      jax.ShapeDtypeStruct(state.rng.shape, state.rng.dtype, sharding=sharding.replicated(mesh)),
      sampling)
  sampler_report = _program_report(sampler_traced, devices)

  bytes_ = {"params": per_device_bytes(state.params),
            "opt_state": per_device_bytes(state.opt_state),
            "reference": per_device_bytes(state.reference),
            "gradients": per_device_bytes(grads),
            "kv_cache": per_device_bytes(cache)}
  # The rest of the train state stays resident while the sampler runs.
  sampler_report["resident_bytes"] = (sampler_report["peak_bytes"] + bytes_["opt_state"]
                                      + bytes_["reference"])
  tensor = mesh.shape["tensor"]
  weights_compute = (sum(math.prod(p.shape) for p in jax.tree.leaves(state.params))
                     * c.compute_dtype.itemsize / tensor)
  bos_id = max(config.objective.marginal_bos_id, 0)  # Its value does not change the program.
  phases = []
  for phase in schedule.phases:
    objective = phase.objective
    step = train_step.make_train_step(
        graphdef, objective, optimizer, group_size=rollout.group_size,
        micro_batches=optim.micro_batches, bos_id=bos_id, temperature=rollout.temperature,
        other_space_metrics=config.train.log_both_spaces, mesh=mesh, state=state)
    program = _program_report(
        step.trace(state, _batch(rows, width, rollout.max_new_tokens, mesh)), devices)
    program["objective"] = objective.name
    # A forward per scored space, a backward (and a rematerialized forward) per trained space.
    spaces = {CONDITIONAL, MARGINAL} if config.train.log_both_spaces else set(objective.spaces)
    passes = len(spaces) + len(objective.spaces) * (1 if c.remat == "none" else 2)
    program["bytes_accessed"] = (program["argument_bytes"] + program["output_bytes"]
                                 + optim.micro_batches * passes * weights_compute)
    phases.append(program)

  report = {
      "model": dataclasses.asdict(model_config),
      "mesh": dict(mesh.shape),
      "devices": devices,
      "rows": rows,
      "batch_devices": batch_devices,
      "prompt_width": width,
      "max_new_tokens": rollout.max_new_tokens,
      "micro_batches": optim.micro_batches,
      "bytes": bytes_,
      "sampler": sampler_report,
      "train_steps": phases,
  }
  report["projection"] = project(report, accel)
  return report


def project(report: dict, accel: Accelerator) -> dict:
  """Projected seconds and memory fit of one step on an accelerator (see module docstring)."""
  sampler = report["sampler"]
  decode_bytes = report["bytes"]["params"] + report["bytes"]["kv_cache"]
  decode_s = (report["max_new_tokens"] - 1) * decode_bytes / accel.hbm_bandwidth
  prefill_s = sampler["flops"] / accel.bf16_flops
  train = []
  for phase in report["train_steps"]:
    compute_s = phase["flops"] / accel.bf16_flops
    memory_s = phase["bytes_accessed"] / accel.hbm_bandwidth
    train.append({"objective": phase["objective"], "seconds": max(compute_s, memory_s),
                  "bound": "compute" if compute_s >= memory_s else "memory",
                  "fits": phase["peak_bytes"] <= accel.hbm_bytes})
  projection = {
      "accelerator": dataclasses.asdict(accel),
      "sampler_seconds": prefill_s + decode_s,
      "sampler_prefill_seconds": prefill_s,
      "sampler_fits": sampler["resident_bytes"] <= accel.hbm_bytes,
      "train": train,
  }
  projection["step_seconds"] = projection["sampler_seconds"] + max(t["seconds"] for t in train)
  projection["advice"] = advice(report, accel)
  return projection


def attention_scores_bytes(report: dict) -> float:
  """Bytes per device of one layer's [rows, heads, T, T] float32 scores in one micro-batch."""
  mesh, model = report["mesh"], report["model"]
  rows = report["rows"] / report["micro_batches"] / report["batch_devices"]
  heads = model["num_heads"] / (mesh["tensor"] if model["num_heads"] % mesh["tensor"] == 0 else 1)
  length = report["prompt_width"] + report["max_new_tokens"] - 1
  return max(rows, 1) * heads * length**2 * 4


def micro_batches_to_fit(report: dict, phase: dict, hbm: float) -> int | None:
  """A lower bound on the micro-batches whose temporaries fit `hbm`, or None if none can.

  Temporaries shrink at most in proportion to the rows of a micro-batch (attention and other
  per-row buffers do; per-layer weights do not), so the proportional estimate is optimistic.
  Micro-batches must split the rows evenly over the batch devices.
  """
  fixed = phase["peak_bytes"] - phase["temp_bytes"]
  if fixed >= hbm:
    return None
  needed = math.ceil(report["micro_batches"] * phase["temp_bytes"] / (hbm - fixed))
  rows, batch_devices = report["rows"], report["batch_devices"]
  return next((m for m in range(max(needed, 1), rows + 1)
               if rows % m == 0 and (rows // m) % batch_devices == 0), None)


def advice(report: dict, accel: Accelerator) -> list[str]:
  """Which knobs would make each program fit the device memory (empty when everything fits)."""
  hbm = accel.hbm_bytes
  bytes_ = report["bytes"]
  state = bytes_["params"] + bytes_["opt_state"] + bytes_["reference"]
  notes = []
  if state > hbm:
    notes.append(f"parameters + optimizer state alone ({state / GIB:.1f} GiB) exceed "
                 f"{accel.name}'s {hbm / GIB:.1f} GiB: shard over more fsdp devices, or keep "
                 "them in bfloat16 (model.param_dtype=bfloat16 halves params and Adam moments)")
  sampler = report["sampler"]
  if sampler["resident_bytes"] > hbm:
    notes.append(
        f"sampler needs {sampler['resident_bytes'] / GIB:.1f} GiB per device (KV cache "
        f"{bytes_['kv_cache'] / GIB:.1f} GiB for {report['rows']} rows x "
        f"{report['prompt_width'] + report['max_new_tokens'] - 1} slots): spread the batch over "
        "more data/fsdp devices, split kv heads over tensor, or sample fewer rows per call "
        "(rollout.prompts_per_step, rollout.group_size)")
  for phase in report["train_steps"]:
    if phase["peak_bytes"] <= hbm:
      continue
    line = (f"train step ({phase['objective']}) needs {phase['peak_bytes'] / GIB:.1f} GiB per "
            f"device, {phase['temp_bytes'] / GIB:.1f} GiB of it temporaries: ")
    knobs = []
    if report["model"]["remat"] == "none":
      knobs.append("model.remat=full (rematerialize decoder layers)")
    micro_batches = micro_batches_to_fit(report, phase, hbm)
    if micro_batches:
      knobs.append(f"optim.micro_batches of at least {micro_batches} (now "
                   f"{report['micro_batches']}; a lower bound, as temporaries shrink at most in "
                   "proportion to rows)")
    knobs.append("more fsdp devices")
    notes.append(line + ", or ".join(knobs) + f" (one layer's float32 attention scores take "
                 f"{attention_scores_bytes(report) / GIB:.1f} GiB per device; past one row per "
                 "device only a fused attention kernel or shorter sequences shrink them)")
  return notes


def _gib(x: float) -> str:
  return f"{x / GIB:.2f}"


def format_report(report: dict) -> str:
  """A short human summary of a dry-run report."""
  p = report["projection"]
  accel = p["accelerator"]
  b = report["bytes"]
  m = report["model"]
  lines = [
      f"dry run: {m['num_layers']} layers, hidden {m['hidden_size']}, params "
      f"{m['param_dtype']}, compute {m['dtype']}, remat={m['remat']}; mesh {report['mesh']}; "
      f"{report['rows']} rows, prompt {report['prompt_width']}, new tokens "
      f"{report['max_new_tokens']}, micro-batches {report['micro_batches']}",
      f"per device (GiB): params {_gib(b['params'])}, optimizer state {_gib(b['opt_state'])}, "
      f"reference {_gib(b['reference'])}, gradients (f32) {_gib(b['gradients'])}, "
      f"KV cache {_gib(b['kv_cache'])}",
      "program              peak GiB  temp GiB  TFLOP/dev  collectives "
      "(AR/AG/RS/A2A/CP)",
  ]
  programs = [("sampler", report["sampler"])] + [(f"train:{t['objective']}", t)
                                                 for t in report["train_steps"]]
  for name, prog in programs:
    counts = "/".join(str(prog["collectives"][op]) for op in COLLECTIVES)
    lines.append(f"{name:<20} {_gib(prog['peak_bytes']):>8}  {_gib(prog['temp_bytes']):>8}  "
                 f"{prog['flops'] / 1e12:>9.1f}  {counts}")
  lines.append(
      f"projected on {accel['name']} ({accel['bf16_flops'] / 1e12:.0f} TFLOP/s, "
      f"{accel['hbm_bandwidth'] / 1e9:.0f} GB/s, {accel['hbm_bytes'] / GIB:.1f} GiB): sampler "
      f"{p['sampler_seconds']:.1f} s ({'fits' if p['sampler_fits'] else 'DOES NOT FIT'}, "
      f"{_gib(report['sampler']['resident_bytes'])} GiB with the train state resident)")
  for t in p["train"]:
    lines.append(f"  train:{t['objective']} {t['seconds']:.1f} s ({t['bound']}-bound, "
                 f"{'fits' if t['fits'] else 'DOES NOT FIT'})")
  lines.append(f"  step {p['step_seconds']:.1f} s")
  lines += [f"does not fit: {note}" for note in p["advice"]]
  return "\n".join(lines)


def report_text(config: ml_collections.ConfigDict, mesh_spec: str, accelerator: str,
                as_json: bool = False) -> str:
  """The dry run of the command line: mesh as 'fsdp=8,tensor=1'; a summary or JSON."""
  report = dry_run(config, sharding.parse_mesh(mesh_spec), accelerator)
  return json.dumps(report, indent=2) if as_json else format_report(report)
