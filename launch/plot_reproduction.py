"""Redraws the reproduction's summary.json, plots and reproduction.md from its runs' files.

python launch/plot_reproduction.py [--results docs/reproduction]

Reads <results>/seed_<s>/<method>/ as launch/reproduce.py leaves them and writes
<results>/summary.json, curves.png, pass_at_k.png and reproduction.md
(prerl_jax.evals.reproduction_report), then prints reproduction.md.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prerl_jax.evals import reproduction_report  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--results", default="docs/reproduction")
  args = parser.parse_args()
  try:
    print(reproduction_report.write_report(args.results))
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"plot_reproduction.py: {e}") from None


if __name__ == "__main__":
  main()
