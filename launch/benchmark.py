"""Benchmarks: `python launch/benchmark.py {sampler,continuous,train,rl-step,attention,rewards}
[--json]`."""

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SUITES = {"sampler": "bench_sampler", "continuous": "bench_continuous", "train": "bench_train",
          "rl-step": "bench_rl_step", "attention": "bench_attention", "rewards": "bench_rewards"}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("suite", choices=sorted(SUITES))
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args, rest = parser.parse_known_args()
  module = importlib.import_module(SUITES[args.suite])
  module.main(rest, as_json=args.json)


if __name__ == "__main__":
  main()
