"""The small-scale reproduction's report: plots and tables drawn from launch/reproduce.py's runs.

`write_report(out, methods)` reads <out>/<method>/metrics.jsonl, <out>/settings.json and, if
present, <out>/grad_alignment.json, and writes <out>/curves.png (training accuracy, response
length, reflection and transition thoughts, policy entropy), <out>/pass_at_k.png (held-out pass@k
before and after) and <out>/reproduction.md. All methods start from the same weights, so the first
run's step-0 evaluation is the shared "before".
"""

import json
import os

import numpy as np

LABELS = {"grpo": "GRPO", "nsr_prerl": "NSR-PreRL", "psr_prerl": "PSR-PreRL", "dsrl": "DSRL",
          "nsr_rl": "NSR-RL"}
CURVES = (("reward/accuracy", "training accuracy (64 rollouts)"),
          ("response/tokens_mean", "response length (tokens)"),
          ("behaviour/reflection_thoughts", "reflection thoughts / response"),
          ("behaviour/transition_thoughts", "transition thoughts / response"),
          ("conditional/entropy", "policy entropy, log P(y|x) (nats/token)"))
SMOOTHING = 3  # steps in the trailing mean used for the thresholds


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def read_metrics(run_dir: str) -> list[dict]:
  """The rows of a run's metrics.jsonl."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of a training metric; evaluation rows lack it and are skipped."""
  pairs = [(r["step"], r[key]) for r in rows if key in r and r["step"] > 0]
  return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs], float)


def eval_row(rows: list[dict], step: int) -> dict:
  """The evaluation metrics logged at `step`, without their `eval/<set>/` prefix."""
  merged = {}
  for r in rows:
    if r["step"] == step:
      merged.update({k.split("/", 2)[2]: v for k, v in r.items() if k.startswith("eval/")})
  return merged


def steps_to_reach(steps: np.ndarray, values: np.ndarray, threshold: float) -> int | None:
  """First step whose trailing SMOOTHING-step mean reaches threshold, or None."""
  for i in range(len(values)):
    if values[max(0, i - SMOOTHING + 1):i + 1].mean() >= threshold - 1e-9:  # float sums
      return int(steps[i])
  return None


def draw_curves(runs: dict[str, list[dict]], path: str) -> None:
  """Training curves of every method, one panel per metric of CURVES."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
  for ax, (key, title) in zip(axes, CURVES):
    for method, rows in runs.items():
      steps, values = series(rows, key)
      ax.plot(steps, values, marker=".", label=LABELS[method])
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def draw_pass_at_k(before: dict, after: dict[str, dict], path: str) -> None:
  """Held-out pass@k against k, before training and after each method."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for label, row in [("base model", before)] + [(LABELS[m], r) for m, r in after.items()]:
    ks = sorted(int(k.split("@")[1]) for k in row if k.startswith("pass@"))
    ax.plot(ks, [100 * row[f"pass@{k}"] for k in ks], marker="o", label=label,
            linestyle="--" if label == "base model" else "-")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("k")
  ax.set_ylabel("held-out pass@k (%)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def tables(runs, before, after, settings, alignment) -> str:
  """The results tables (markdown): held-out metrics and steps to accuracy thresholds."""
  k_max = settings["eval_samples"]
  ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= k_max]
  head = f"| method | mean@{k_max} | " + " | ".join(f"pass@{k}" for k in ks)
  lines = [head + " | response tokens | truncated |",
           "|---" * (len(ks) + 4) + "|"]
  for label, row in [("base (before)", before)] + [(LABELS[m], r) for m, r in after.items()]:
    cells = [f"{100 * row[f'mean@{k_max}']:.1f}"] + [f"{100 * row[f'pass@{k}']:.1f}" for k in ks]
    lines.append(f"| {label} | " + " | ".join(cells)
                 + f" | {row['response_tokens']:.1f} | {100 * row['truncated_fraction']:.1f}% |")
  # Step 1 samples from the shared starting weights with the same key in every run.
  start = float(series(next(iter(runs.values())), "reward/accuracy")[1][0])
  thresholds = [round(start + delta, 2) for delta in (0.05, 0.10, 0.15)]
  lines += ["", f"Steps until the {SMOOTHING}-step trailing mean of training accuracy reaches "
            f"step 1's {100 * start:.1f}% + 5, 10, 15 points (- = not within the run):", "",
            "| method | " + " | ".join(f"{100 * t:.0f}%" for t in thresholds)
            + " | final 3-step accuracy |",
            "|---" * (len(thresholds) + 2) + "|"]
  for method, rows in runs.items():
    steps, values = series(rows, "reward/accuracy")
    reached = [steps_to_reach(steps, values, t) for t in thresholds]
    lines.append(f"| {LABELS[method]} | " + " | ".join("-" if r is None else str(r)
                                                        for r in reached)
                 + f" | {100 * values[-SMOOTHING:].mean():.1f}% |")
  if alignment:
    s = alignment["summary"]
    lines += ["", f"Gradient alignment of log P(y) and log P(y|x), base model on {s['samples']} "
              f"of its own rollouts: inner product positive for "
              f"{100 - s['percent_negative']:.0f}% of samples (mean {s['inner_mean']:.3g}, min "
              f"{s['inner_min']:.3g}), mean cosine {s['cosine_mean']:.3f}."]
  return "\n".join(lines) + "\n"


def write_report(out: str, methods: list[str]) -> str:
  """Writes the plots and reproduction.md for the methods that have a run under `out`."""
  methods = [m for m in methods if os.path.exists(os.path.join(out, m, "metrics.jsonl"))]
  if not methods:
    raise FileNotFoundError(f"no <method>/metrics.jsonl under {out}")
  with open(os.path.join(out, "settings.json")) as f:
    settings = json.load(f)
  alignment_path = os.path.join(out, "grad_alignment.json")
  alignment = None
  if os.path.exists(alignment_path):
    with open(alignment_path) as f:
      alignment = json.load(f)
  runs = {m: read_metrics(os.path.join(out, m)) for m in methods}
  before = eval_row(runs[methods[0]], 0)
  after = {m: eval_row(rows, settings["steps"]) for m, rows in runs.items()}
  after = {m: row for m, row in after.items() if row}
  draw_curves(runs, os.path.join(out, "curves.png"))
  draw_pass_at_k(before, after, os.path.join(out, "pass_at_k.png"))
  text = tables(runs, before, after, settings, alignment)
  with open(os.path.join(out, "reproduction.md"), "w") as f:
    f.write(text)
  return text
