"""The small-scale reproduction's report over seeds: summary.json, plots and reproduction.md.

launch/reproduce.py trains every method once per seed and copies each finished run's files
(`collect_run`: config.json, metrics.jsonl, summary.json, eval_step_<N>.json) to
<results>/seed_<s>/<method>/. `write_report(results)` reads them with <results>/settings.json
and, if present, <results>/grad_alignment.json, and writes <results>/summary.json (per method and
seed: held-out figures after training, steps to training-accuracy thresholds; their means and
95% t-intervals over the seeds; the paired comparisons the paper makes claims about),
curves.png, pass_at_k.png and reproduction.md, which is drawn from summary.json alone. The base
model's figures are each seed's step-0 evaluation (the seed keys the evaluation's draws).
"""

import glob
import json
import os
import re

import numpy as np
from scipy import stats

from prerl_jax.evals import pass_at_k

METHODS = ("grpo", "nsr_prerl", "psr_prerl", "dsrl", "nsr_rl")
LABELS = {"base": "base model", "grpo": "GRPO", "nsr_prerl": "NSR-PreRL",
          "psr_prerl": "PSR-PreRL", "dsrl": "DSRL", "nsr_rl": "NSR-RL"}
COLORS = {"base": "0.4", **{method: f"C{i}" for i, method in enumerate(METHODS)}}
# (a, b): the paper claims a above b. Each is reported as a - b on the same seed and problems.
COMPARISONS = (("dsrl", "grpo"), ("nsr_prerl", "psr_prerl"))
CURVES = (("reward/accuracy", "training accuracy"),
          ("response/tokens_mean", "response length (tokens)"),
          ("behaviour/reflection_thoughts", "reflection thoughts / response"),
          ("behaviour/transition_thoughts", "transition thoughts / response"),
          ("conditional/entropy", "policy entropy, log P(y|x) (nats/token)"))
SMOOTHING = 3  # Steps in the trailing mean of training accuracy used for the thresholds.
THRESHOLD_POINTS = (5, 10, 15)  # Points of training accuracy above step 1's.
CONFIDENCE = 0.95
INTERVAL_CHOICE = (
    "Intervals are 95% t-intervals over the seeds (mean +- t * s / sqrt(n), t = 4.303 for 3 "
    "seeds): the spread between whole training runs is the noise in question, and a bootstrap "
    "over three seeds has only ten distinct resamples, which would understate it.")
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")
PAPER_CLAIMS = (
    "DSRL above GRPO after training: avg@32 57.54 vs 55.79 (Qwen3-4B) and 58.47 vs 57.00 "
    "(Qwen3-8B), base 41.26 / 41.62.",
    "DSRL reaches 45% training accuracy in 2.5x fewer steps than GRPO, and 58% in 1.6x fewer.",
    "NSR-PreRL prunes wrong reasoning; PSR-PreRL tracks RL early and collapses later.",
    "An NSR-RL warm-up instead of NSR-PreRL gives 54.38 (below GRPO).",
    "Gradient alignment on Qwen3-4B, AMC23 rollouts: inner product of the gradients of log P(y) "
    "and log P(y|x) positive for every sample, mean cosine 0.44.")


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def collect_run(run_dir: str, dest: str, out: str, repo_root: str) -> None:
  """Copies the files of a finished run that the report reads from run_dir to dest.

  Paths inside repo_root are written relative to it, and paths under `out` (the runs' folder)
  relative to `out` where it lies outside the repository, so the copies name no absolute path.
  """
  repo_root, out = os.path.abspath(repo_root), os.path.abspath(out)
  prefixes = [repo_root]
  if os.path.commonpath([out, repo_root]) != repo_root:
    prefixes.insert(0, out)
  os.makedirs(dest, exist_ok=True)
  names = list(RUN_FILES) + [os.path.basename(p)
                             for p in glob.glob(os.path.join(run_dir, "eval_step_*.json"))]
  for name in names:
    with open(os.path.join(run_dir, name)) as f:
      text = f.read()
    for prefix in prefixes:
      text = text.replace(prefix + os.sep, "")
    with open(os.path.join(dest, name), "w") as f:
      f.write(text)


def read_metrics(run_dir: str) -> list[dict]:
  """The rows of a run's metrics.jsonl."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of a training metric; evaluation rows lack it and are skipped."""
  pairs = [(r["step"], r[key]) for r in rows if key in r and r["step"] > 0]
  return np.array([p[0] for p in pairs], int), np.array([p[1] for p in pairs], float)


def steps_to_reach(steps: np.ndarray, values: np.ndarray, threshold: float) -> int | None:
  """First step whose trailing SMOOTHING-step mean reaches threshold, or None."""
  for i in range(len(values)):
    if values[max(0, i - SMOOTHING + 1):i + 1].mean() >= threshold - 1e-9:  # Float sums.
      return int(steps[i])
  return None


def read_eval(run_dir: str, step: int) -> dict | None:
  """The evaluation a run wrote at `step` (eval_step_<step>.json), or None if it has none."""
  path = os.path.join(run_dir, f"eval_step_{step}.json")
  if not os.path.exists(path):
    return None
  sets = _read_json(path)
  if len(sets) != 1:
    raise ValueError(f"{path}: {len(sets)} eval sets; the reproduction report reads one")
  return sets[0]


def held_out_figures(result: dict) -> dict[str, float]:
  """mean@n, pass@k, mean response tokens and truncated fraction of an evaluation."""
  figures = {f"mean@{result['samples_per_problem']}": result["mean_at_n"]}
  figures.update({f"pass@{k}": v for k, v in result["pass_at_k"].items()})
  figures["response_tokens"] = result["behaviour"]["response_tokens"]
  figures["truncated_fraction"] = result["behaviour"]["truncated_fraction"]
  return figures


def per_problem(result: dict, metric: str) -> np.ndarray:
  """Each problem's value of a `mean@n` or `pass@k` figure, from its count of correct samples."""
  n = result["samples_per_problem"]
  name, k = metric.split("@")
  counts = result["correct_per_problem"]
  if name == "mean":
    return np.array(counts, float) / n
  return np.array([pass_at_k.pass_at_k(n, c, int(k)) for c in counts])


def t_interval(values) -> list[float] | None:
  """The CONFIDENCE t-interval of the mean of values; None for fewer than two."""
  values = np.asarray(values, float)
  if len(values) < 2:
    return None
  quantile = stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)
  half = quantile * values.std(ddof=1) / np.sqrt(len(values))
  return [float(values.mean() - half), float(values.mean() + half)]


def _over_seeds(seeds: dict[str, dict]) -> dict:
  """{"seeds", "mean", "interval"} of per-seed entries: every numeric key over the seeds."""
  first = next(iter(seeds.values()))
  keys = [k for k, v in first.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
  values = {k: [entry[k] for entry in seeds.values()] for k in keys}
  return {"seeds": seeds, "mean": {k: float(np.mean(v)) for k, v in values.items()},
          "interval": {k: t_interval(v) for k, v in values.items()}}


def statement(a: str, b: str, metric: str, difference: float, interval, seeds: int) -> str:
  """A comparison in one plain sentence: the difference, its interval and the verdict."""
  head = f"{LABELS[a]} - {LABELS[b]}, held-out {metric}: {100 * difference:+.1f} points"
  if interval is None:
    return head + " on one seed: no interval, so whether it differs from zero is unknown."
  low, high = interval
  span = f" (95% t-interval over {seeds} seeds: {100 * low:+.1f} to {100 * high:+.1f})"
  if low > 0 or high < 0:
    higher = LABELS[a] if low > 0 else LABELS[b]
    return head + span + f"; distinguishable from zero at this scale: {higher} is higher."
  return head + span + "; not distinguishable from zero at this scale."


def _compare(a: str, b: str, metric: str, evals: dict[tuple[str, int], dict]) -> dict | None:
  """a - b in `metric` on each seed that has both runs, on the same problems; None if none."""
  per_seed = {}
  for (method, seed), result in sorted(evals.items(), key=lambda item: item[0][1]):
    if method != a or (b, seed) not in evals:
      continue
    other = evals[b, seed]
    if result["problem_ids"] != other["problem_ids"]:
      raise ValueError(f"seed_{seed}: {a} and {b} were evaluated on different problems")
    differences = per_problem(result, metric) - per_problem(other, metric)
    per_seed[str(seed)] = {"difference": float(differences.mean()),
                           "problems": len(differences),
                           "problem_interval": t_interval(differences)}
  if not per_seed:
    return None
  differences = [entry["difference"] for entry in per_seed.values()]
  interval = t_interval(differences)
  mean = float(np.mean(differences))
  return {"seeds": per_seed, "mean": mean, "interval": interval,
          "distinguishable": interval is not None and (interval[0] > 0 or interval[1] < 0),
          "statement": statement(a, b, metric, mean, interval, len(per_seed))}


def seed_runs(results: str) -> dict[tuple[str, int], str]:
  """(method, seed) -> folder, for every finished run (with summary.json) under results."""
  runs = {}
  for folder in glob.glob(os.path.join(results, "seed_*")):
    match = re.fullmatch(r"seed_(\d+)", os.path.basename(folder))
    for method in METHODS if match else ():
      if os.path.exists(os.path.join(folder, method, "summary.json")):
        runs[method, int(match.group(1))] = os.path.join(folder, method)
  return dict(sorted(runs.items(), key=lambda item: (item[0][1], METHODS.index(item[0][0]))))


def summarize(results: str) -> dict:
  """summary.json's content from the runs under results (see the module docstring)."""
  runs = seed_runs(results)
  if not runs:
    raise FileNotFoundError(f"no seed_<s>/<method>/summary.json under {results}")
  settings = _read_json(os.path.join(results, "settings.json"))
  steps = settings["steps"]
  evals, entries, base, thresholds = {}, {}, {}, {}
  for (method, seed), run_dir in runs.items():
    after = read_eval(run_dir, steps)
    if after is None:
      raise FileNotFoundError(f"{run_dir}: no eval_step_{steps}.json (the evaluation after "
                              f"{steps} steps)")
    evals[method, seed] = after
    before = read_eval(run_dir, 0)
    if before is not None and str(seed) not in base:
      base[str(seed)] = held_out_figures(before)
    train_steps, accuracy = series(read_metrics(run_dir), "reward/accuracy")
    # Step 1 samples the shared starting weights with the seed's key and batch in every method.
    seed_thresholds = thresholds.setdefault(str(seed), {
        "start_accuracy": float(accuracy[0]),
        "thresholds": [float(accuracy[0]) + p / 100 for p in THRESHOLD_POINTS]})
    run_summary = _read_json(os.path.join(run_dir, "summary.json"))
    entries.setdefault(method, {})[str(seed)] = {
        **held_out_figures(after),
        "final_train_accuracy": float(accuracy[-SMOOTHING:].mean()),
        "steps_to": {f"+{p}": steps_to_reach(train_steps, accuracy, t)
                     for p, t in zip(THRESHOLD_POINTS, seed_thresholds["thresholds"])},
        "wall_s": run_summary["wall_s"], "commit": run_summary["commit"],
        "dirty": run_summary["dirty"]}
  commits = sorted({e["commit"] for seeds in entries.values() for e in seeds.values()})
  methods = {"base": _over_seeds(base)} if base else {}
  methods.update({m: _over_seeds(entries[m]) for m in METHODS if m in entries})
  n = next(iter(evals.values()))["samples_per_problem"]
  comparisons = {}
  for a, b in COMPARISONS:
    compared = {metric: _compare(a, b, metric, evals) for metric in (f"mean@{n}", f"pass@{n}")}
    if all(compared.values()):
      comparisons[f"{a}_vs_{b}"] = compared
  summary = {
      "commit": commits[0] if len(commits) == 1 else commits,
      "dirty": sorted({f for seeds in entries.values() for e in seeds.values()
                       for f in e["dirty"]}),
      "settings": settings,
      "problems": next(iter(evals.values()))["num_problems"],
      "samples_per_problem": n,
      "interval": INTERVAL_CHOICE,
      "thresholds": {"points": list(THRESHOLD_POINTS), "smoothing": SMOOTHING,
                     "seeds": thresholds},
      "methods": methods,
      "comparisons": comparisons,
  }
  alignment_path = os.path.join(results, "grad_alignment.json")
  if os.path.exists(alignment_path):
    summary["gradient_alignment"] = _read_json(alignment_path)["summary"]
  return summary


def draw_curves(runs: dict[tuple[str, int], str], path: str) -> None:
  """Training curves per method: the mean over seeds, and a band from the lowest to the highest."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
  rows = {key: read_metrics(run_dir) for key, run_dir in runs.items()}
  for ax, (key, title) in zip(axes, CURVES):
    for method in METHODS:
      curves = [series(r, key) for (m, _), r in rows.items() if m == method]
      curves = [c for c in curves if len(c[0])]
      if not curves:
        continue
      steps = sorted(set.intersection(*(set(c[0].tolist()) for c in curves)))
      values = np.array([[v[list(s).index(step)] for step in steps] for s, v in curves])
      ax.plot(steps, values.mean(axis=0), marker=".", label=LABELS[method],
              color=COLORS[method])
      if len(curves) > 1:
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.2,
                        color=COLORS[method])
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
  axes[0].legend(fontsize=8)
  seeds = len({seed for _, seed in runs})
  fig.suptitle(f"mean over {seeds} seed(s); bands: lowest to highest seed", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def draw_pass_at_k(summary: dict, path: str) -> None:
  """Held-out pass@k against k per method: mean over seeds, error bars the 95% t-interval."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  methods = summary["methods"]
  for i, (method, entry) in enumerate(methods.items()):
    ks = sorted(int(key.split("@")[1]) for key in entry["mean"] if key.startswith("pass@"))
    means = np.array([100 * entry["mean"][f"pass@{k}"] for k in ks])
    halves = [0.0 if entry["interval"][f"pass@{k}"] is None
              else 100 * (entry["interval"][f"pass@{k}"][1] - entry["mean"][f"pass@{k}"])
              for k in ks]
    shift = 2 ** (0.05 * (i - (len(methods) - 1) / 2))  # Keeps the bars apart on the log axis.
    ax.errorbar([k * shift for k in ks], means, yerr=halves, marker="o", capsize=3,
                label=LABELS[method], color=COLORS[method],
                linestyle="--" if method == "base" else "-")
  ax.set_xscale("log", base=2)
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.set_xlabel("k")
  ax.set_ylabel("held-out pass@k (%)")
  ax.set_title("mean over seeds; bars: 95% t-interval", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _cell(mean: float, interval, scale: float = 100, spec: str = ".1f") -> str:
  """`mean [low, high]` (`mean` alone without an interval), times scale."""
  if interval is None:
    return f"{scale * mean:{spec}}"
  return f"{scale * mean:{spec}} [{scale * interval[0]:{spec}}, {scale * interval[1]:{spec}}]"


def _header(summary: dict, seeds: list[int]) -> list[str]:
  settings = summary["settings"]
  commit = summary["commit"] if isinstance(summary["commit"], str) else ", ".join(
      summary["commit"])
  dirty = f"; modified code files: {', '.join(summary['dirty'])}" if summary["dirty"] else ""
  overrides = settings.get("override")
  overrides = f" Config overrides: {', '.join(overrides)}." if overrides else ""
  return [f"# Small-scale reproduction over {len(seeds)} seed(s)", "",
          f"Drawn from summary.json by `python launch/plot_reproduction.py`. Code: commit "
          f"{commit}{dirty}. {settings['steps']} steps, learning rate {settings['lr']}, DSRL "
          f"switch at step {settings['switch']}, seeds {', '.join(map(str, seeds))}; held-out "
          f"set: {summary['problems']} problems x {summary['samples_per_problem']} samples."
          f"{overrides}", "", summary["interval"]]


def _held_out_tables(summary: dict, seeds: list[int]) -> list[str]:
  methods, n = summary["methods"], summary["samples_per_problem"]
  ks = sorted(int(k.split("@")[1]) for k in next(iter(methods.values()))["mean"]
              if k.startswith("pass@"))
  lines = [f"## Held-out results after {summary['settings']['steps']} steps (%, mean over seeds "
           "[95% interval])", "",
           f"| method | mean@{n} | " + " | ".join(f"pass@{k}" for k in ks)
           + " | response tokens | truncated |", "|---" * (len(ks) + 4) + "|"]
  for method, entry in methods.items():
    mean, interval = entry["mean"], entry["interval"]
    cells = [_cell(mean[key], interval[key]) for key in [f"mean@{n}"] + [f"pass@{k}" for k in ks]]
    cells += [_cell(mean["response_tokens"], interval["response_tokens"], scale=1),
              _cell(mean["truncated_fraction"], interval["truncated_fraction"])]
    lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
  lines += ["", f"mean@{n} per seed (%), and the mean wall time of a run:", "",
            "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | wall time per run |",
            "|---" * (len(seeds) + 2) + "|"]
  for method, entry in methods.items():
    cells = [f"{100 * entry['seeds'][str(s)][f'mean@{n}']:.1f}" if str(s) in entry["seeds"]
             else "n/a" for s in seeds]
    wall = f"{entry['mean']['wall_s'] / 60:.1f} min" if "wall_s" in entry["mean"] else "-"
    lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {wall} |")
  return lines


def _comparisons(summary: dict) -> list[str]:
  lines = ["## Paired comparisons (same seed, same problems)", "",
           "| comparison | metric | per seed (points) | mean [95% interval] | "
           "distinguishable from zero |", "|---|---|---|---|---|"]
  sentences = []
  for name, by_metric in summary["comparisons"].items():
    a, b = name.split("_vs_")
    for metric, result in by_metric.items():
      per_seed = ", ".join(f"{100 * e['difference']:+.1f}" for e in result["seeds"].values())
      lines.append(f"| {LABELS[a]} - {LABELS[b]} | {metric} | {per_seed} | "
                   f"{_cell(result['mean'], result['interval'], spec='+.1f')} | "
                   f"{'yes' if result['distinguishable'] else 'no'} |")
      sentences.append(f"- {result['statement']}")
  return lines + ["", *sentences]


def _thresholds(summary: dict, seeds: list[int]) -> list[str]:
  thresholds, points = summary["thresholds"], summary["thresholds"]["points"]
  lines = ["## Steps to training-accuracy thresholds", "",
           f"Steps until the {thresholds['smoothing']}-step trailing mean of training accuracy "
           f"reaches step 1's + {', '.join(map(str, points))} points, seeds "
           f"{', '.join(map(str, seeds))} (- = not within the run). Step 1's accuracy: "
           + ", ".join(f"seed {s} {100 * t['start_accuracy']:.1f}%"
                       for s, t in thresholds["seeds"].items()) + ".", "",
           "| method | " + " | ".join(f"+{p}" for p in points)
           + f" | final {thresholds['smoothing']}-step accuracy (%) |",
           "|---" * (len(points) + 2) + "|"]
  for method, entry in summary["methods"].items():
    if method == "base":
      continue
    reached = [[entry["seeds"][str(s)]["steps_to"][f"+{p}"] if str(s) in entry["seeds"]
                else "n/a" for s in seeds] for p in points]
    cells = [", ".join("-" if r is None else str(r) for r in row) for row in reached]
    final = _cell(entry["mean"]["final_train_accuracy"], entry["interval"]["final_train_accuracy"])
    lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {final} |")
  return lines


def _alignment(summary: dict) -> list[str]:
  if "gradient_alignment" not in summary:
    return []
  s = summary["gradient_alignment"]
  return ["## Gradient alignment (base model)", "",
          f"log P(y) and log P(y|x) on {s['samples']} of the base model's own rollouts: inner "
          f"product positive for {100 - s['percent_negative']:.0f}% of samples (mean "
          f"{s['inner_mean']:.3g}, min {s['inner_min']:.3g}), mean cosine {s['cosine_mean']:.3f}.",
          ""]


def report_text(summary: dict) -> str:
  """reproduction.md (markdown) from summary.json's content."""
  seeds = sorted({int(s) for entry in summary["methods"].values() for s in entry["seeds"]})
  sections = [_header(summary, seeds), _held_out_tables(summary, seeds), _comparisons(summary),
              _thresholds(summary, seeds)]
  lines = [line for section in sections for line in (*section, "")] + _alignment(summary)
  lines += ["## The paper's claims (PAPER.md, Qwen3-4B/8B on MATH; quoted, not shown by this run)",
            "", *(f"- {claim}" for claim in PAPER_CLAIMS)]
  return "\n".join(lines) + "\n"


def write_report(results: str) -> str:
  """Writes summary.json, curves.png, pass_at_k.png and reproduction.md under results."""
  summary = summarize(results)
  with open(os.path.join(results, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  draw_curves(seed_runs(results), os.path.join(results, "curves.png"))
  draw_pass_at_k(summary, os.path.join(results, "pass_at_k.png"))
  text = report_text(summary)
  with open(os.path.join(results, "reproduction.md"), "w") as f:
    f.write(text)
  return text
