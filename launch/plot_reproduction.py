"""Plots and the results table of launch/reproduce.py, drawn from its metrics files.

python launch/plot_reproduction.py --out runs/reproduction [--methods grpo,dsrl,...]

Writes <out>/curves.png, <out>/pass_at_k.png and <out>/reproduction.md
(prerl_jax.evals.reproduction_report) and prints the tables.
"""

import argparse

from prerl_jax.evals import reproduction_report


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/reproduction")
  parser.add_argument("--methods", default=",".join(reproduction_report.LABELS))
  args = parser.parse_args()
  try:
    print(reproduction_report.write_report(args.out, args.methods.split(",")))
  except FileNotFoundError as e:
    raise SystemExit(f"plot_reproduction.py: {e}") from None


if __name__ == "__main__":
  main()
