"""Math reward benchmark: wall time to score a batch of mixed responses with MathVerifierPool.

`python launch/benchmark.py rewards [--json] [--responses 1024 --runs 3 --baseline DIR]`: a fixed
seeded mix of responses (fractions, decimals, roots, units, intervals, equations, constants,
repeating decimals, wrong answers, missing boxes and one `9^{9^{9^{9}}}` in 50 that can only
time out), scored by a fresh pool (default workers, 3 s deadline). Each run is its own
subprocess; with --baseline, the prerl_jax of DIR (another checkout) is timed too, the two
sides interleaved run by run, and the ratio of their median times is reported.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from benchmarks import common

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mixed_responses(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
  """`count` (response, ground truth) pairs of varied forms, the same for a given seed."""
  rng = random.Random(seed)
  forms = [
      lambda a, b: (f"so \\boxed{{\\frac{{{a}}}{{{b}}}}}", f"\\frac{{{2 * a}}}{{{2 * b}}}"),
      lambda a, b: (f"\\boxed{{{a / 4:g}}}", f"\\frac{{{a}}}{{4}}"),
      lambda a, b: (f"\\boxed{{{a}\\sqrt{{2}}}}", f"\\sqrt{{{2 * a * a}}}"),
      lambda a, b: (f"\\boxed{{{a} \\text{{ cm}}}}", str(a)),
      lambda a, b: (f"\\boxed{{[{a}, {a + b})}}", f"[{a},{a + b})"),
      lambda a, b: (f"\\boxed{{x = {a}}}", str(a)),
      lambda a, b: (f"\\boxed{{{a} = {b}}}", str(b)),
      lambda a, b: (f"\\boxed{{x^2 + {2 * a}x + {a * a}}}", f"(x+{a})^2"),
      lambda a, b: (f"\\boxed{{{a}e^{{i\\pi}}}}", str(-a)),
      lambda a, b: (f"\\boxed{{{a}.\\overline{{3}}}}", f"\\frac{{{3 * a + 1}}}{{3}}"),
      lambda a, b: (f"\\boxed{{{a + 1}}}", str(a)),
      lambda a, b: (f"The answer is {a}.", str(a)),
      lambda a, b: (f"\\boxed{{({a}, {b})}}", f"({a},{b})"),
      lambda a, b: (f"\\boxed{{\\dfrac{{{a}}}{{{b}}}\\pi}}", f"\\frac{{{a}\\pi}}{{{b}}}"),
  ]
  responses, truths = [], []
  for index in range(count):
    if index % 50 == 49:
      response, truth = "\\boxed{9^{9^{9^{9}}}}", "1"
    else:
      response, truth = rng.choice(forms)(rng.randint(1, 99), rng.randint(2, 99))
    responses.append(response)
    truths.append(truth)
  return responses, truths


def score_once(count: int) -> dict:
  """Times one batch in this process, pool start-up excluded."""
  import prerl_jax  # pylint: disable=import-outside-toplevel
  from prerl_jax.rewards import math_reward  # pylint: disable=import-outside-toplevel
  responses, truths = mixed_responses(count)
  with math_reward.MathVerifierPool() as pool:
    start = time.perf_counter()
    result = pool.score(responses, truths)
    seconds = time.perf_counter() - start
  return {"package": os.path.dirname(prerl_jax.__file__), "seconds": seconds, "mean_reward": float(result.rewards.mean()), **result.counts}


def run_side(root: str, count: int) -> dict:
  """score_once in a subprocess that imports prerl_jax from `root`."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join((root, REPO_ROOT)))  # benchmarks/ from here
  done = subprocess.run([sys.executable, os.path.abspath(__file__), "--once",
                         f"--responses={count}"], env=env, cwd=root, capture_output=True,
                        text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"scoring with {root} failed:\n{done.stderr[-3000:]}")
  output = done.stdout
  return json.loads(output.strip().splitlines()[-1])


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--responses", type=int, default=1024)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--baseline", default=None, help="another checkout to time against")
  parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv, as_json: bool = False):
  args = parse(argv)
  sides = {"this tree": REPO_ROOT}
  if args.baseline:
    sides["baseline"] = os.path.abspath(args.baseline)
  results = {name: [] for name in sides}
  for _ in range(args.runs):
    for name, root in sides.items():
      results[name].append(run_side(root, args.responses))
  lines = []
  for name, runs in results.items():
    times = ", ".join(f"{r['seconds']:.1f}" for r in runs)
    last = runs[-1]
    lines.append(f"{name}: {args.responses} responses in {times} s; mean reward "
                 f"{last['mean_reward']:.3f}, timeouts {last['timeouts']}, missing "
                 f"{last['missing_answers']}, parse failures {last['parse_failures']}")
  if args.baseline:
    ratio = (statistics.median(r["seconds"] for r in results["this tree"])
             / statistics.median(r["seconds"] for r in results["baseline"]))
    results["median_ratio"] = ratio
    lines.append(f"this tree / baseline median time: {ratio:.2f}x ({args.runs} runs each, "
                 "interleaved)")
  common.report(results, as_json, lines)


if __name__ == "__main__":
  options = parse(sys.argv[1:])
  if options.once:
    print(json.dumps(score_once(options.responses)))
  else:
    main(sys.argv[1:])
