"""Writes docs/dry_run_table.md: dry runs of the paper-scale DSRL config per model and target.

`python launch/dry_run_table.py [--targets=v5p-16,v5p-32,v5p-64,v6e-16,h100x8]
[--models=qwen3-4b,qwen3-8b] [--tuned=model:target:key=value,...;...] [--cache_dir=DIR]`: one
dry run (prerl_jax/aot/dry_run.py) per (model, target), all chips on fsdp, plus the `--tuned`
cells (the preset with a few settings changed, for targets where it does not fit). Each report is
kept in DIR, so a rerun only compiles the missing cells.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GIB = 2**30

NOTES = (
    "Reading it: memory is per chip. TPU rows come from libtpu's compiler for the real topology "
    "(its memory analysis; a program it refuses for lack of HBM shows the arguments plus the "
    "temporaries it asked for, marked `>=`, a lower bound). The h100x8 rows are SIMULATED: "
    "XLA:CPU's buffer assignment on 8 CPU devices, not the GPU compiler's. The sampler is the "
    "paper preset's continuous engine (64 live rows, a 32 GiB page pool per chip): a 512-token "
    "prefill chunk and a 16-step decode chunk; its peak is the larger, with the optimizer state "
    "that stays resident while sampling. Times: per program, runs x max(FLOPs / bf16 peak, "
    "modelled HBM bytes / bandwidth), no communication; FLOPs counted through every loop "
    "iteration, except inside Pallas kernels (splash and paged attention: not counted). Every "
    "response is assumed to reach the 8192-token cap (an upper bound), so a chip's pool holds "
    "only as many groups of 8 at full length as fit (3 groups, 24 sequences, in 32 GiB) and the "
    "decode runs in waves; the engine splits its rows and pool over the fsdp chips (each chip "
    "decodes its own groups: 128 prompts take 6 waves on 8 chips, 2 on 32), and kv heads over "
    "tensor. The update is compiled at the full "
    "8192-token width with `model.attention=auto` (splash on TPU, chunked when simulated). "
    "\"knob\" is the first advice of the dry run for the program that misses by most.")


def _args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--targets", default="v5p-16,v5p-32,v5p-64,v6e-16,h100x8")
  parser.add_argument("--models", default="qwen3-4b,qwen3-8b")
  parser.add_argument(
      "--tuned", default="qwen3-4b:h100x8:optim.micro_batches=64,rollout.kv_cache_gib=16;"
      "qwen3-8b:h100x8:optim.micro_batches=128,rollout.kv_cache_gib=16",
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
  compiler = "libtpu" if report["compiler"] == "tpu" else "SIMULATED (XLA:CPU)"
  where = f"{report['target']} ({report['chips']} chips)" + (f", {settings}" if settings else "")
  return (f"| {model} | {where} | {compiler} | "
          f"{(b['params'] + b['opt_state']) / GIB:.1f} | {b['kv_cache'] / GIB:.1f} | "
          f"{_gib(sampler)} | {_gib(train)} | {report['peaks']['hbm_bytes'] / GIB:.1f} | "
          f"{'yes' if report['fits'] else 'no'} | {knob} | {report['projected_sample_s']:.0f} | "
          f"{report['projected_update_s']:.0f} | {report['projected_step_s']:.0f} |")


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
        config[section][name] = type(config[section][name])(value)
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
      "| model | target | compiler | params + Adam GiB/chip | KV pool GiB/chip | sampler peak "
      "GiB/chip | train peak GiB/chip | HBM GiB | fits | knob | sample s | update s | step s |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  command = (f"python launch/dry_run_table.py --targets={args.targets} --models={args.models} "
             f"--tuned='{args.tuned}'")
  text = "\n".join([
      "Paper-scale DSRL (`configs/dsrl.py:paper`: 128 prompts x 8 responses, prompt bucket 1024,"
      " 8192 new tokens, float32 params and Adam, bfloat16 compute, remat, 16 micro-batches),"
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
