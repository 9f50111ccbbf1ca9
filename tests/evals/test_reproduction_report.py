"""The reproduction report on metrics files written here: tables, thresholds, PNGs."""

import json
import os

from prerl_jax.evals import reproduction_report


def _write_run(out, method, accuracies, before, after, steps):
  os.makedirs(os.path.join(out, method))
  with open(os.path.join(out, method, "metrics.jsonl"), "w") as f:
    for step, rows in ((0, before), (steps, after)):
      if rows:
        f.write(json.dumps({"step": step, **{f"eval/chain_sum/{k}": v
                                             for k, v in rows.items()}}) + "\n")
    for step, accuracy in enumerate(accuracies, 1):
      f.write(json.dumps({"step": step, "reward/accuracy": accuracy,
                          "response/tokens_mean": 10.0 + step,
                          "behaviour/reflection_thoughts": 0.0,
                          "behaviour/transition_thoughts": 0.0,
                          "conditional/entropy": 1.0}) + "\n")


def _eval(mean):
  return {"mean@4": mean, "pass@1": mean, "pass@2": mean + 0.1, "pass@4": mean + 0.2,
          "response_tokens": 12.0, "truncated_fraction": 0.25}


def test_tables_report_eval_rows_and_steps_to_thresholds(tmp_path):
  out = str(tmp_path)
  with open(os.path.join(out, "settings.json"), "w") as f:
    json.dump({"steps": 6, "eval_samples": 4}, f)
  with open(os.path.join(out, "grad_alignment.json"), "w") as f:
    json.dump({"summary": {"samples": 8, "percent_negative": 12.5, "inner_mean": 3.0,
                           "inner_min": -1.0, "cosine_mean": 0.4}}, f)
  # Step 1 accuracy 0.20 -> thresholds 25%, 30%, 35% on the 3-step trailing mean.
  _write_run(out, "grpo", [0.2, 0.2, 0.35, 0.35, 0.35, 0.35], _eval(0.2), _eval(0.3), 6)
  _write_run(out, "dsrl", [0.2, 0.5, 0.5, 0.1, 0.1, 0.1], None, _eval(0.25), 6)
  text = reproduction_report.write_report(out, ["grpo", "dsrl", "nsr_rl"])
  assert text == open(os.path.join(out, "reproduction.md")).read()
  lines = text.splitlines()
  assert "| base (before) | 20.0 | 20.0 | 30.0 | 40.0 | 12.0 | 25.0% |" in lines
  assert "| GRPO | 30.0 | 30.0 | 40.0 | 50.0 | 12.0 | 25.0% |" in lines
  assert "| DSRL | 25.0 | 25.0 | 35.0 | 45.0 | 12.0 | 25.0% |" in lines
  # GRPO trailing means: .2, .2, .25, .3, .35, .35; DSRL: .2, .35, .4, .367, .233, .1.
  assert "| GRPO | 3 | 4 | 5 | 35.0% |" in lines
  assert "| DSRL | 2 | 2 | 2 | 10.0% |" in lines
  assert "positive for 88% of samples" in text and "mean cosine 0.400" in text
  for png in ("curves.png", "pass_at_k.png"):
    with open(os.path.join(out, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
