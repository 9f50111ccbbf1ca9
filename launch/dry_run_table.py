"""Writes docs/dry_run_table.md: dry runs of the paper-scale DSRL config per model and target.

`python launch/dry_run_table.py [--targets=v5p-16,v5p-32,v5p-64,v6e-16,h100x8,h200x8]
[--models=qwen3-4b,qwen3-8b] [--tuned=model:target:key=value,...;...] [--cache_dir=DIR]`: one
dry run (prerl_jax/aot/dry_run.py) per (model, target), all chips on fsdp, plus the `--tuned`
cells (the preset with a few settings changed, for targets where it does not fit). Each report is
kept in DIR, so a rerun only compiles the missing cells.
"""

import argparse
import ast
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GIB = 2**30

NOTES = (
    "Reading it: memory is per chip. TPU rows come from libtpu's compiler for the real topology, "
    "GPU rows from XLA:GPU's compiler run deviceless for sm_90 (the CUDA plugin; no autotuning, "
    "so GEMM tiles are XLA's defaults: right for memory, not for timing); a program a compiler "
    "refuses for lack of HBM shows the arguments plus the temporaries it asked for, marked `>=`, "
    "a lower bound. The sampler is the paper preset's continuous engine (64 live rows per batch "
    "shard): a 512-token prefill chunk and a 16-step decode chunk; its peak is the larger, with "
    "the train state that stays resident while sampling. It decodes from the weights in the "
    "layout the `weights` column names (`rollout.weights`, prerl_jax/generate/rollout_weights.py):"
    " `replicated` is a bfloat16 copy whole on every chip and `tensor` one split over a tensor "
    "axis, made once per step by one resharding program (counted in the sample time, its "
    "collectives the transfer), so the decode loop reads local weights; `trainer` is the "
    "trainer's fsdp float32 parameters, cast to bfloat16 inside the program, so every decode "
    "step all-gathers each layer's weights and the embedding table. The KV pool is "
    "`rollout.kv_cache_gib` per batch shard; with `auto`, what the chip's HBM leaves: HBM - train "
    "state - rollout copy - the sampler programs' own bytes (from the compiler) - a margin of "
    "1 GiB + 5% of HBM (prerl_jax/generate/pool_budget.py). Times per program: runs x "
    "(max(FLOPs / bf16 peak, modelled HBM bytes / bandwidth) + communication), shown as "
    "compute-or-memory + communication; communication is the bytes every collective moves into "
    "a chip, read from the compiled program through every loop trip "
    "(prerl_jax/aot/collectives.py), over half the chip's bidirectional interconnect bandwidth "
    "(ICI: v5p 1,200, v6e 800 GB/s; NVLink 900 GB/s), not overlapped with compute (`overlapped` "
    "is the bound if it all were); the network between hosts or slices is not modelled. FLOPs "
    "are counted through every loop iteration, except inside Pallas kernels (splash and paged "
    "attention: not counted). Every response is assumed to reach the 8192-token cap (an upper "
    "bound: a chip's rows decode as many groups of 8 as its live rows and pool hold at full "
    "length, in waves; `--response_lengths` projects measured lengths with the engine's own "
    "scheduler). `sample roofline s` is the sample phase's HBM roofline at that schedule: decode "
    "steps x (W + R x (P + N / 2) x B) / HBM bandwidth, with W the bfloat16 weights a chip's "
    "decode step reads, R the live rows of its shard, P the 1024-token prompt, N the 8192-token "
    "cap and B one position's keys and values on the chip (prerl_jax/aot/dry_run.py). The update "
    "is the trainer's packed program with every response at the cap (one 9215-token segment a "
    "row), compiled for the fewest micro-batches that fit (prerl_jax/rl/micro_batch_budget.py), "
    "with `model.attention=auto` (splash on TPU, chunked on GPU, where cuDNN's kernel cannot "
    "compile without a device); the pinned activations keep its collectives to fsdp's weight "
    "gathers and gradient reductions (prerl_jax/sharding.py `constrain`). \"knob\" is the "
    "first advice of the dry run for the program that misses by most.")


def _setting(text: str):
  """A --tuned value as Python reads it (16, 1e-6, True), else the text (auto)."""
  try:
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    return text


def _args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--targets", default="v5p-16,v5p-32,v5p-64,v6e-16,h100x8,h200x8")
  parser.add_argument("--models", default="qwen3-4b,qwen3-8b")
  parser.add_argument(
      "--tuned", default="",
      help="extra cells, model:target:key=value,... separated by ';' (settings changed from the "
           "paper preset for a target where it does not fit)")
  parser.add_argument("--cache_dir", default=os.path.join(ROOT, "runs", "dry_run_table"))
  parser.add_argument("--output", default=os.path.join(ROOT, "docs", "dry_run_table.md"))
  return parser.parse_args()


def _gib(program: dict) -> str:
  lower = "" if program["collectives"] is not None else ">="
  return f"{lower}{program['peak_bytes_per_chip'] / GIB:.1f}"


def _row(model: str, report: dict, settings: str = "") -> str:
  """One markdown table row of a dry-run report."""
  b = report["bytes_per_chip"]
  programs = report["programs"]
  sampler = max((p for p in programs if p["stage"] == "sample"),
                key=lambda p: p["peak_bytes_per_chip"])
  train = max((p for p in programs if p["stage"] == "update"),
              key=lambda p: p["peak_bytes_per_chip"])
  worst = max(programs, key=lambda p: p["peak_bytes_per_chip"])
  knob = next((a for a in report["advice"] if a.startswith(worst["name"])), "")
  knob = knob.split(": ", 1)[1].split(" (", 1)[0].split(", or ")[0] if knob else "-"
  compiler = {"tpu": "libtpu", "xla-gpu": "XLA:GPU"}.get(report["compiler"],
                                                          "SIMULATED (XLA:CPU)")
  where = f"{report['target']} ({report['chips']} chips)" + (f", {settings}" if settings else "")
  counted = [p for p in programs if p["stage"] == "sample"] + [
      max((p for p in programs if p["stage"] == "update"), key=lambda p: p["projected_s"])]
  seconds = {stage: [sum(p["projected_s"] - (p["comm_s"] or 0.0) for p in counted
                      if p["stage"] == stage),
                  sum(p["comm_s"] or 0.0 for p in counted if p["stage"] == stage)]
          for stage in ("sample", "update")}
  unknown = {p["stage"] for p in counted if p["comm_s"] is None}  # The compiler refused it.
  split = lambda stage: (f"{seconds[stage][0]:.0f} + "
                         + ("?" if stage in unknown else f"{seconds[stage][1]:.0f}"))
  return (f"| {model} | {where} | {compiler} | {report.get('rollout_weights', 'trainer')} | "
          f"{report['micro_batches']} | "
          f"{(b['params'] + b['opt_state']) / GIB:.1f} | {b['kv_cache'] / GIB:.1f} | "
          f"{_gib(sampler)} | {_gib(train)} | {report['peaks']['hbm_bytes'] / GIB:.1f} | "
          f"{'yes' if report['fits'] else 'no'} | {knob} | {split('sample')} | "
          f"{report['projected_sample_roofline_s']:.0f} | {split('update')} | "
          f"{report['projected_step_s']:.0f} | "
          f"{report['projected_step_overlapped_s']:.0f} |")


def main():
  args = _args()
  targets = args.targets.split(",")
  simulated = max((int(t.split("x")[1]) for t in targets if t.startswith("h")), default=1)
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={simulated}"
  from prerl_jax.aot import dry_run  # pylint: disable=import-outside-toplevel
  import configs  # pylint: disable=import-outside-toplevel

  os.makedirs(args.cache_dir, exist_ok=True)
  cells = [(model, target, "") for model in args.models.split(",") for target in targets]
  cells += [tuple(cell.split(":", 2)) for cell in filter(None, args.tuned.split(";"))]
  rows, timings = [], []
  for model, target, settings in cells:
    path = os.path.join(args.cache_dir, f"{model}_{target}{'_' + settings if settings else ''}.json")
    if not os.path.exists(path):
      config = configs.get_config("dsrl", f"paper,model={model}")
      for item in filter(None, settings.split(",")):
        key, value = item.split("=")
        section, name = key.split(".")
        config[section][name] = _setting(value)
      start = time.perf_counter()
      report = dry_run.dry_run(config, target)
      report["dry_run_s"] = time.perf_counter() - start
      with open(path, "w") as f:
        json.dump(report, f, indent=1)
    with open(path) as f:
      report = json.load(f)
    label = f"{target} with {settings}" if settings else target
    timings.append(f"{model} on {label}: {report['dry_run_s']:.0f} s")
    print(timings[-1], flush=True)
    rows.append(_row(model, report, settings))
  header = [
      "| model | target | compiler | weights | micro-batches | params + Adam GiB/chip | "
      "KV pool GiB/chip | "
      "sampler peak GiB/chip | train peak GiB/chip | HBM GiB | fits | knob | sample s (compute or "
      "memory + comm) | sample roofline s | update s (compute or memory + comm) | step s | "
      "step s overlapped |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  command = (f"python launch/dry_run_table.py --targets={args.targets} --models={args.models} "
             f"--tuned='{args.tuned}'")
  text = "\n".join([
      "Paper-scale DSRL (`configs/dsrl.py:paper`: 128 prompts x 8 responses, prompt bucket 1024,"
      " 8192 new tokens, float32 params and Adam, bfloat16 compute, remat, packed rows of 9216"
      " tokens, `optim.micro_batches=auto`: the fewest whose update fits, shown per row),"
      " all chips on fsdp, compiled ahead of time on a CPU host without accelerators. Generated"
      " by", "", f"    {command}", "",
      "(one cell, as JSON: `python launch/tpu_run.py --config=configs/dsrl.py:paper,"
      "model=qwen3-8b --dry_run --target=v5p-64 --json`). Dry-run times on a shared 2-core CPU: "
      + "; ".join(timings) + ".", "", *header, *rows, "", NOTES, ""])
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
