"""The small-scale reproduction of the paper's comparisons, resumable part by part.

python launch/reproduce.py [--out runs/reproduction] [--steps 12] [--switch 3] [--lr 3e-5]

Parts, each skipped when its result file exists (a killed training run resumes from its last
checkpoint): gradient alignment of the base model on its own rollouts of the task; one training
run per method with the same seed, batch, group size, learning rate and step budget (the first
also evaluates the shared starting weights); then launch/plot_reproduction.py draws the PNGs and
writes reproduction.md. Every method uses the run config's CPU preset (SmolLM2-135M, one-digit
chain_sum) and the same overrides; DSRL's switch step is the only per-method setting.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("grpo", "nsr_prerl", "psr_prerl", "dsrl", "nsr_rl")


def run_part(name: str, command: list[str], result_path: str) -> None:
  """Runs one part unless its result exists; its JSON stdout becomes the result file."""
  if os.path.exists(result_path):
    print(f"[{name}] done already: {result_path}")
    return
  print(f"[{name}] {' '.join(command)}", flush=True)
  start = time.time()
  done = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, check=False)
  if done.returncode:
    sys.exit(f"reproduce.py: part {name} failed with exit code {done.returncode}; rerun to "
             "resume")
  result = json.loads(done.stdout[done.stdout.index("{"):])
  result["wall_s"] = time.time() - start
  with open(result_path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"[{name}] finished in {result['wall_s'] / 60:.1f} min", flush=True)


def training_command(method: str, args, out: str, evaluate_start: bool) -> list[str]:
  arg = f"cpu,steps={args.steps},lr={args.lr},seed={args.seed},run_dir={os.path.join(out, method)}"
  if method == "dsrl":
    arg += f",switch={args.switch}"
  return [sys.executable, "launch/tpu_run.py", f"--config=configs/{method}.py:{arg}",
          f"--config.eval.samples_per_problem={args.eval_samples}",
          f"--config.eval.prompts_per_call={args.eval_prompts_per_call}",
          f"--config.eval.at_start={str(evaluate_start).lower()}",
          f"--config.train.log_samples={args.log_samples}",
          "--json"]


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/reproduction")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--switch", type=int, default=3,
                      help="DSRL: NSR-PreRL for steps < switch, then GRPO")
  parser.add_argument("--lr", type=float, default=3e-5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--eval_samples", type=int, default=16, help="k of mean@k / pass@k")
  parser.add_argument("--eval_prompts_per_call", type=int, default=16)
  parser.add_argument("--log_samples", type=int, default=4)
  parser.add_argument("--alignment_prompts", type=int, default=8)
  args = parser.parse_args()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    sys.exit(f"reproduce.py: --methods has unknown {unknown}; valid: {', '.join(METHODS)}")
  with open(os.path.join(out, "settings.json"), "w") as f:
    json.dump(vars(args), f, indent=2)

  run_part("gradient alignment", [
      sys.executable, "launch/grad_alignment.py", "--run_config=cpu",
      f"--prompts={args.alignment_prompts}", "--samples_per_prompt=2", "--max_new_tokens=32",
      "--temperature=0.7", f"--seed={args.seed}", "--json"],
      os.path.join(out, "grad_alignment.json"))
  for index, method in enumerate(methods):
    run_part(method, training_command(method, args, out, evaluate_start=index == 0),
             os.path.join(out, method, "summary.json"))
  subprocess.run([sys.executable, "launch/plot_reproduction.py", f"--out={out}",
                  f"--methods={','.join(methods)}"], cwd=REPO_ROOT, check=True)


if __name__ == "__main__":
  main()
