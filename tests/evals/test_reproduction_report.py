"""The reproduction report on run folders written here: means, t-intervals, paired comparisons,
thresholds, portable paths, plots."""

import json
import math
import os
import subprocess
import sys

import pytest

from prerl_jax.evals import pass_at_k, reproduction_report

N, STEPS, T_2 = 4, 6, 4.303  # Samples per problem, training steps, t_{0.975, 2}.
# Correct samples (of N) on each of 4 held-out problems after training, per method and seed.
COUNTS = {
    "grpo": ([1, 1, 2, 0], [2, 1, 1, 0], [2, 2, 2, 0]),  # mean@4 4/16, 4/16, 6/16
    "dsrl": ([2, 1, 2, 0], [2, 2, 2, 0], [4, 3, 2, 0]),  # 5/16, 6/16, 9/16: +1, +2, +3 on GRPO
    "psr_prerl": ([2, 2, 2, 0],) * 3,  # 6/16 on every seed
    "nsr_prerl": ([2, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]),  # -2, -3, -4 sixteenths on PSR
}
BASE = ([1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 1, 0])  # 2/16, 2/16, 3/16
ACCURACY = {"grpo": ([.2, .2, .35, .35, .35, .35],) * 2 + ([.2, .2, .2, .2, .2, .3],),
            "dsrl": ([.2, .5, .5, .1, .1, .1],) * 3}


def _eval(counts, ids=("a", "b", "c", "d")):
  return [{"name": "chain_sum", "num_problems": len(counts), "samples_per_problem": N,
           "mean_at_n": sum(counts) / (N * len(counts)),
           "pass_at_k": {str(k): sum(pass_at_k.pass_at_k(N, c, k) for c in counts) / len(counts)
                         for k in (1, 2, 4)},
           "behaviour": {"response_tokens": 10.0 + sum(counts), "truncated_fraction": 0.25},
           "problem_ids": list(ids), "correct_per_problem": counts}]


def _write_run(results, method, seed, counts, with_base):
  run_dir = os.path.join(results, f"seed_{seed}", method)
  os.makedirs(run_dir)
  evals = {STEPS: counts, **({0: BASE[seed]} if with_base else {})}
  for step, step_counts in evals.items():
    with open(os.path.join(run_dir, f"eval_step_{step}.json"), "w") as f:
      json.dump(_eval(step_counts), f)
  accuracies = ACCURACY.get(method, ([.2, .3, .3, .3, .3, .3],) * 3)[seed]
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    for step, accuracy in enumerate(accuracies, 1):
      f.write(json.dumps({"step": step, "reward/accuracy": accuracy,
                          "response/tokens_mean": 10.0 + step + seed,
                          "behaviour/reflection_thoughts": 0.0,
                          "behaviour/transition_thoughts": 0.0,
                          "conditional/entropy": 1.0}) + "\n")
  with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump({"run_dir": f"seed_{seed}/{method}", "wall_s": 60.0 * (seed + 1),
               "commit": "abc123",
               "dirty": ["prerl_jax/rl/losses.py"] if (method, seed) == ("dsrl", 2) else []}, f)


@pytest.fixture(name="results")
def _results(tmp_path):
  results = str(tmp_path / "results")
  os.makedirs(results)
  with open(os.path.join(results, "settings.json"), "w") as f:
    json.dump({"steps": STEPS, "switch": 3, "lr": 3e-5, "eval_samples": N,
               "override": ["data.eval_size=8"]}, f)
  with open(os.path.join(results, "grad_alignment.json"), "w") as f:
    json.dump({"summary": {"samples": 8, "percent_negative": 12.5, "inner_mean": 3.0,
                           "inner_min": -1.0, "cosine_mean": 0.4}}, f)
  for seed in range(3):
    for index, (method, counts) in enumerate(COUNTS.items()):
      _write_run(results, method, seed, counts[seed], with_base=index == 0)
  return results


def _close(interval, low, high):
  assert interval == pytest.approx([low, high], abs=1e-4)


def test_means_and_t_intervals_over_seeds(results):
  summary = reproduction_report.summarize(results)
  assert list(summary["methods"]) == ["base", "grpo", "nsr_prerl", "psr_prerl", "dsrl"]
  assert (summary["commit"], summary["dirty"]) == ("abc123", ["prerl_jax/rl/losses.py"])
  grpo = summary["methods"]["grpo"]
  assert [grpo["seeds"][s]["mean@4"] for s in "012"] == [0.25, 0.25, 0.375]
  # 4/16, 4/16, 6/16: mean 7/24, s / sqrt(3) = 1/24.
  assert grpo["mean"]["mean@4"] == pytest.approx(7 / 24)
  _close(grpo["interval"]["mean@4"], (7 - T_2) / 24, (7 + T_2) / 24)
  base = summary["methods"]["base"]  # 2/16, 2/16, 3/16: mean 7/48, s / sqrt(3) = 1/48.
  _close(base["interval"]["mean@4"], (7 - T_2) / 48, (7 + T_2) / 48)
  assert base["seeds"]["2"]["pass@4"] == 0.75
  # pass@2 of counts [1, 1, 2, 0] of 4: (1/2 + 1/2 + 5/6 + 0) / 4.
  assert grpo["seeds"]["0"]["pass@2"] == pytest.approx((0.5 + 0.5 + 5 / 6) / 4)
  assert grpo["mean"]["wall_s"] == 120.0 and grpo["seeds"]["1"]["response_tokens"] == 14.0
  assert summary["methods"]["psr_prerl"]["interval"]["mean@4"] == [0.375, 0.375]


def test_paired_differences_and_their_statements(results):
  comparisons = reproduction_report.summarize(results)["comparisons"]
  dsrl = comparisons["dsrl_vs_grpo"]["mean@4"]
  assert [dsrl["seeds"][s]["difference"] for s in "012"] == pytest.approx([1 / 16, 2 / 16, 3 / 16])
  # Differences 1/16, 2/16, 3/16: mean 1/8, s = 1/16.
  _close(dsrl["interval"], 1 / 8 - T_2 / 16 / math.sqrt(3), 1 / 8 + T_2 / 16 / math.sqrt(3))
  assert not dsrl["distinguishable"]
  assert dsrl["statement"] == ("DSRL - GRPO, held-out mean@4: +12.5 points (95% t-interval over "
                               "3 seeds: -3.0 to +28.0); not distinguishable from zero at this "
                               "scale.")
  # Seed 0 per problem: (2 - 1) / 4, 0, 0, 0: mean 1/16, s = 1/8, t_{0.975, 3} = 3.182.
  _close(dsrl["seeds"]["0"]["problem_interval"], 1 / 16 - 3.1824 / 16, 1 / 16 + 3.1824 / 16)
  nsr = comparisons["nsr_prerl_vs_psr_prerl"]["mean@4"]  # -2, -3, -4 sixteenths.
  _close(nsr["interval"], -3 / 16 - T_2 / 16 / math.sqrt(3), -3 / 16 + T_2 / 16 / math.sqrt(3))
  assert nsr["distinguishable"]
  assert nsr["statement"].endswith("-18.8 points (95% t-interval over 3 seeds: -34.3 to -3.2); "
                                   "distinguishable from zero at this scale: PSR-PreRL is higher.")
  # pass@4 is whether a problem has a correct sample: NSR-PreRL loses problem c on seed 2 only.
  nsr_pass = comparisons["nsr_prerl_vs_psr_prerl"]["pass@4"]
  assert [nsr_pass["seeds"][s]["difference"] for s in "012"] == [0.0, 0.0, -0.25]
  assert not nsr_pass["distinguishable"]


def test_one_seed_has_no_interval_and_says_so(results):
  for seed in (1, 2):
    for method in COUNTS:
      for name in os.listdir(os.path.join(results, f"seed_{seed}", method)):
        os.remove(os.path.join(results, f"seed_{seed}", method, name))
  comparison = reproduction_report.summarize(results)["comparisons"]["dsrl_vs_grpo"]["mean@4"]
  assert comparison["interval"] is None and not comparison["distinguishable"]
  assert comparison["statement"].endswith("+6.2 points on one seed: no interval, so whether it "
                                          "differs from zero is unknown.")


def test_runs_on_different_problems_are_not_compared(results):
  with open(os.path.join(results, "seed_1", "dsrl", "eval_step_6.json"), "w") as f:
    json.dump(_eval([1, 1, 1, 1], ids=("a", "b", "c", "e")), f)
  with pytest.raises(ValueError, match="seed_1: dsrl and grpo were evaluated on different"):
    reproduction_report.summarize(results)


def test_report_tables_thresholds_and_plots(results):
  text = reproduction_report.write_report(results)
  assert text == open(os.path.join(results, "reproduction.md")).read()
  with open(os.path.join(results, "summary.json")) as f:
    assert json.load(f) == json.loads(json.dumps(reproduction_report.summarize(results)))
  lines = text.splitlines()
  assert "| GRPO | 29.2 [11.2, 47.1] | 29.2 [11.2, 47.1] | " in "\n".join(lines)
  assert "| PSR-PreRL | 37.5 | 37.5 | 37.5 | 2.0 min |" in lines
  assert "| base model | 12.5 | 12.5 | 18.8 | - |" in lines
  assert "| DSRL - GRPO | mean@4 | +6.2, +12.5, +18.8 | +12.5 [-3.0, +28.0] | no |" in lines
  # GRPO trailing means, seeds 0 and 1: .2, .2, .25, .3, .35, .35; seed 2 never reaches .25.
  # DSRL: .2, .35, .4, .367, .233, .1 on every seed.
  assert any(line.startswith("| GRPO | 3, 3, - | 4, 4, - | 5, 5, - | 31.1 [") for line in lines)
  assert "| DSRL | 2, 2, 2 | 2, 2, 2 | 2, 2, 2 | 10.0 [10.0, 10.0] |" in lines
  assert "positive for 88% of samples" in text and "mean cosine 0.400" in text
  assert "modified code files: prerl_jax/rl/losses.py" in text
  assert "4 problems x 4 samples. Config overrides: data.eval_size=8." in text
  for png in ("curves.png", "pass_at_k.png"):
    with open(os.path.join(results, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_collected_runs_name_no_absolute_path(tmp_path):
  repo_root = str(tmp_path / "repo")
  out, inside = str(tmp_path / "runs"), str(tmp_path / "repo" / "runs")
  for runs in (out, inside):
    run_dir = os.path.join(runs, "seed_0", "grpo")
    os.makedirs(run_dir)
    for name in ("config.json", "summary.json"):
      with open(os.path.join(run_dir, name), "w") as f:
        json.dump({"run_dir": run_dir, "model": os.path.join(repo_root, "models", "m")}, f)
    open(os.path.join(run_dir, "metrics.jsonl"), "w").close()
    with open(os.path.join(run_dir, "eval_step_6.json"), "w") as f:
      json.dump(_eval([1, 0, 0, 0]), f)
    reproduction_report.collect_run(run_dir, os.path.join(runs + "_copy", "grpo"), runs,
                                    repo_root)
  with open(os.path.join(out + "_copy", "grpo", "summary.json")) as f:
    assert json.load(f) == {"run_dir": "seed_0/grpo", "model": "models/m"}
  with open(os.path.join(inside + "_copy", "grpo", "config.json")) as f:
    assert json.load(f) == {"run_dir": "runs/seed_0/grpo", "model": "models/m"}
  for copy in (out + "_copy", inside + "_copy"):
    assert sorted(os.listdir(os.path.join(copy, "grpo"))) == [
        "config.json", "eval_step_6.json", "metrics.jsonl", "summary.json"]
    for name in os.listdir(os.path.join(copy, "grpo")):
      with open(os.path.join(copy, "grpo", name)) as f:
        assert str(tmp_path) not in f.read()


def test_reproduce_skips_runs_already_collected_in_results(results, tmp_path):
  """Runs committed to --results (a previous machine's --out is gone) are not trained again."""
  settings = {"steps": STEPS, "switch": 3, "lr": 3e-5, "eval_samples": N,
              "eval_prompts_per_call": 16, "log_samples": 4, "alignment_prompts": 0,
              "override": ["data.eval_size=8"]}
  with open(os.path.join(results, "settings.json"), "w") as f:
    json.dump(settings, f)
  out = str(tmp_path / "out")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  done = subprocess.run(
      [sys.executable, os.path.join(root, "launch", "reproduce.py"), "--seeds", "0,1,2",
       "--methods", "grpo,dsrl", f"--steps={STEPS}", f"--eval_samples={N}",
       "--alignment_prompts=0", "--override", "data.eval_size=8", f"--out={out}",
       f"--results={results}"],
      cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.count("done already") == 6
  assert not [name for name in os.listdir(out) if name.startswith("seed_")]
