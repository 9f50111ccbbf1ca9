"""Benchmarks: `python launch/benchmark.py NAME [--json] [options]`, NAME a key of SUITES.

The bodies live in the `benchmarks` package at the repository root, one module per subcommand.
"""

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SUITES = {"sampler": "benchmarks.sampler", "continuous": "benchmarks.continuous",
          "train": "benchmarks.train", "rl-step": "benchmarks.rl_step",
          "attention": "benchmarks.attention", "rewards": "benchmarks.rewards",
          "packing": "benchmarks.packing"}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("suite", choices=sorted(SUITES))
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args, rest = parser.parse_known_args()
  module = importlib.import_module(SUITES[args.suite])
  module.main(rest, as_json=args.json)


if __name__ == "__main__":
  main()
