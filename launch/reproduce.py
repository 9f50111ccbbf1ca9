"""The small-scale reproduction of the paper's comparisons over seeds, resumable part by part.

python launch/reproduce.py [--seeds 0,1,2] [--methods grpo,dsrl,...] [--out runs/reproduction]
    [--results docs/reproduction] [--steps 12] [--switch 3] [--lr 3e-5] [--override KEY=VALUE]

Parts, each skipped when its result exists in --out or was collected in --results (a killed
training run resumes from its last checkpoint): the gradient alignment of the base model on its own rollouts (once: it describes the
starting weights, not a training run); then, seed by seed, one training run per method in
<out>/seed_<s>/<method>/ with the same batch, group size, learning rate and step budget (its
checkpoints are deleted once it has finished, unless --keep_checkpoints). The seed
(train.seed) keys the rollouts' and the evaluation's draws and orders the training data; the
starting weights and the problems are the same for every seed. The first run of each seed also
evaluates the starting weights: the base model under that seed's evaluation draws, which every
method of the seed is evaluated with. After each part its small files (no checkpoints), with the
commit of the code that ran it, go to <results>/seed_<s>/<method>/, and summary.json, the plots and
reproduction.md there are redrawn (prerl_jax.evals.reproduction_report). Every method uses the run
config's CPU preset (SmolLM2-135M, one-digit chain_sum) and the same overrides; DSRL's switch step
is the only per-method setting. `--override data.eval_size=8` (repeatable) sets a config key of
every run, e.g. to shrink a smoke test.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from prerl_jax.evals import reproduction_report  # noqa: E402

METHODS = reproduction_report.METHODS
CODE_PATHS = ("prerl_jax", "configs", "launch")  # What a run executes: its changes mark it dirty.
# The arguments every run of one folder must share (--seeds and --methods only pick the parts).
SHARED = ("steps", "switch", "lr", "eval_samples", "eval_prompts_per_call", "log_samples",
          "alignment_prompts", "override")


def code_version() -> dict:
  """The commit of the code (`git rev-parse HEAD`) and its modified or new files under
  CODE_PATHS (empty: the commit is the code that ran)."""
  def git(*args):
    done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=False)
    return done.stdout if done.returncode == 0 else ""
  status = git("status", "--porcelain", "--", *CODE_PATHS)
  return {"commit": git("rev-parse", "HEAD").strip() or "unknown",
          "dirty": sorted(line[3:] for line in status.splitlines())}


def run_part(name: str, command: list[str], result_path: str) -> bool:
  """Runs one part unless its result exists; its JSON stdout, with the wall time and the code
  version, becomes the result file. Returns whether it ran."""
  if os.path.exists(result_path):
    print(f"[{name}] done already: {result_path}")
    return False
  print(f"[{name}] {' '.join(command)}", flush=True)
  version = code_version()
  start = time.time()
  done = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, check=False)
  if done.returncode:
    sys.exit(f"reproduce.py: part {name} failed with exit code {done.returncode}; rerun to "
             "resume")
  result = json.loads(done.stdout[done.stdout.index("{"):])
  result.update(wall_s=time.time() - start, **version)
  with open(result_path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"[{name}] finished in {result['wall_s'] / 60:.1f} min", flush=True)
  return True


def config_arg(method: str, seed: int, run_dir: str, args) -> str:
  """The arg string of configs/<method>.py for one run."""
  arg = f"cpu,steps={args.steps},lr={args.lr},seed={seed},run_dir={run_dir}"
  return arg + f",switch={args.switch}" if method == "dsrl" else arg


def check_configs(methods: list[str], args) -> None:
  """Builds each method's run config and phase schedule, so that a bad setting (a DSRL switch
  step out of range) fails now rather than after the runs before it."""
  import configs  # pylint: disable=import-outside-toplevel
  from prerl_jax.errors import UserError  # pylint: disable=import-outside-toplevel
  from prerl_jax.rl.schedule import schedule_from_config  # pylint: disable=import-outside-toplevel
  for method in methods:
    try:
      config = configs.get_config(method, config_arg(method, 0, "runs", args))
      schedule_from_config(config.objective)
    except (UserError, ValueError) as error:
      sys.exit(f"reproduce.py: {method}: {error}")


def training_command(method: str, seed: int, run_dir: str, args, evaluate_start: bool):
  arg = config_arg(method, seed, run_dir, args)
  return [sys.executable, "launch/tpu_run.py", f"--config=configs/{method}.py:{arg}",
          f"--config.eval.samples_per_problem={args.eval_samples}",
          f"--config.eval.prompts_per_call={args.eval_prompts_per_call}",
          f"--config.eval.at_start={str(evaluate_start).lower()}",
          f"--config.train.log_samples={args.log_samples}",
          *(f"--config.{setting}" for setting in args.override), "--json"]


def check_settings(folder: str, settings: dict) -> None:
  """Fails naming the first setting that differs from those the folder's runs were made with."""
  path = os.path.join(folder, "settings.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    recorded = json.load(f)
  for key in SHARED:
    if recorded.get(key) != settings[key]:
      sys.exit(f"reproduce.py: {path} records {key}={recorded.get(key)!r}, this command gives "
               f"{settings[key]!r}; rerun with the same settings to resume, or use another "
               "--out and --results")


def portable(path: str) -> str:
  """path relative to the repository where it lies inside it, else absolute."""
  inside = os.path.commonpath([path, REPO_ROOT]) == REPO_ROOT
  return os.path.relpath(path, REPO_ROOT) if inside else path


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--out", default="runs/reproduction", help="the runs, with checkpoints")
  parser.add_argument("--results", default="docs/reproduction",
                      help="the runs' small files, summary.json, plots and reproduction.md")
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--switch", type=int, default=3,
                      help="DSRL: NSR-PreRL for steps < switch, then GRPO")
  parser.add_argument("--lr", type=float, default=3e-5)
  parser.add_argument("--eval_samples", type=int, default=16, help="n of mean@n / pass@k")
  parser.add_argument("--eval_prompts_per_call", type=int, default=16)
  parser.add_argument("--log_samples", type=int, default=4)
  parser.add_argument("--alignment_prompts", type=int, default=8, help="0: no alignment part")
  parser.add_argument("--keep_checkpoints", action="store_true",
                      help="keep a finished run's checkpoints (deleted once its files are copied)")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="a config key of every training run, e.g. data.eval_size=8")
  args = parser.parse_args()
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f"--methods has unknown {unknown}; valid: {', '.join(METHODS)}")
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s]
  except ValueError:
    parser.error(f"--seeds={args.seeds!r}: expected comma-separated integers")
  bad = [o for o in args.override if "=" not in o]
  if bad:
    parser.error(f"--override {bad[0]!r}: expected KEY=VALUE, e.g. data.eval_size=8")
  return args, seeds, methods


def main():
  args, seeds, methods = parse_args()
  out, results = os.path.abspath(args.out), os.path.abspath(args.results)
  settings = {key: getattr(args, key) for key in SHARED}
  check_configs(methods, args)
  check_settings(out, settings)
  if os.path.isdir(results) and any(name.startswith("seed_") for name in os.listdir(results)):
    check_settings(results, settings)
  for folder in (out, results):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "settings.json"), "w") as f:
      json.dump(settings, f, indent=2)

  if args.alignment_prompts:
    alignment = os.path.join(out, "grad_alignment.json")
    run_part("gradient alignment", [
        sys.executable, "launch/grad_alignment.py", "--run_config=cpu",
        f"--prompts={args.alignment_prompts}", "--samples_per_prompt=2", "--max_new_tokens=32",
        "--temperature=0.7", f"--seed={seeds[0]}", "--json"], alignment)
    shutil.copyfile(alignment, os.path.join(results, "grad_alignment.json"))
  for seed in seeds:
    for method in methods:
      run_dir = os.path.join(out, f"seed_{seed}", method)
      dest = os.path.join(results, f"seed_{seed}", method)
      if (os.path.exists(os.path.join(dest, "summary.json"))
          and not os.path.exists(os.path.join(run_dir, "summary.json"))):
        print(f"[seed {seed} {method}] done already: {portable(dest)}")  # Committed results.
        continue
      evaluated = [m for m in METHODS if any(
          os.path.exists(os.path.join(folder, f"seed_{seed}", m, "eval_step_0.json"))
          for folder in (out, results))]
      command = training_command(method, seed, portable(run_dir), args,
                                 evaluate_start=not evaluated or evaluated == [method])
      ran = run_part(f"seed {seed} {method}", command, os.path.join(run_dir, "summary.json"))
      if ran or not os.path.exists(os.path.join(dest, "summary.json")):
        reproduction_report.collect_run(run_dir, dest, out, REPO_ROOT)
        reproduction_report.write_report(results)
      if not args.keep_checkpoints:  # GiBs per run that the report never reads.
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
  print(reproduction_report.write_report(results))


if __name__ == "__main__":
  main()
