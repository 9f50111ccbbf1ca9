"""Response lengths in the dry run: the continuous engine's scheduler run on the host over given
lengths equals the all-at-the-cap bound at the cap and decodes less with short responses; a
metrics.jsonl and the distributions are read as documented; bad specs name the flag, file, row."""

import json

import jax
import ml_collections
import numpy as np
import pytest

import configs
from prerl_jax import errors, sharding
from prerl_jax.aot import abstract_state, response_lengths, sample_programs, targets
from prerl_jax.generate.continuous import PoolConfig
from prerl_jax.models.config import ModelConfig


def _rollout(prompts: int, group: int, new_tokens: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(prompts_per_step=prompts, group_size=group,
                                        max_new_tokens=new_tokens, kv_cache_gib=0.0))


def test_every_response_at_the_cap_gives_the_bound():
  """2 shards of 8 rows hold 2 groups of 4 each: 12 prompts run in 3 waves of 64 decode steps,
  as the formula says."""
  rollout = _rollout(prompts=12, group=4, new_tokens=64)
  pool = PoolConfig(rows=8, page_size=16, chunk_steps=16)
  pages = 8 * 8 + 1  # Every row's longest sequence (64 + 64 tokens) fits: rows bind, not pages.
  run = response_lengths.simulate(np.full(48, 64), rollout, pool, shards=2, pages=pages,
                                  prompt_width=64)
  bound = sample_programs.cap_bound(rollout, pool, shards=2, pages=pages, prompt_width=64)
  # The pages alone would hold 3 groups: 64 pages / (4 prompt + 4 x 4 response pages).
  assert bound == {"groups_per_shard": 2, "pool_groups_per_shard": 3, "waves": 3,
                   "decode_chunks": 12, "decode_steps": 192}
  assert (run.rounds, run.admissions, run.preemptions) == (3, 12, 0)
  assert len(run.chunks) == 12 and sum(c.steps for c in run.chunks) == 192
  assert {c.width for c in run.chunks} == {8} and {c.row_steps for c in run.chunks} == {16 * 16}
  assert run.prefills == {64: 6}  # A 63-token prefix per prompt, one per shard per call.


def test_one_short_response_per_group_decodes_fewer_steps(tmp_path):
  """One shard of 7 rows holds one group of 4 at the cap: 3 prompts take 3 x 32 steps. When the
  first sample of each group stops after 8 tokens, its row frees a fourth row, so the next group
  is admitted while the previous one runs: 8 chunks of 8 steps."""
  rollout = _rollout(prompts=3, group=4, new_tokens=32)
  pool = PoolConfig(rows=7, page_size=16, chunk_steps=8)
  short = [8, 32, 32, 32] * 3
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps({"step": 1, "response/tokens_mean": 26.0,
                              "response/lengths": short}) + "\n")
  lengths = response_lengths.parse(str(path), responses=12, max_new_tokens=32)
  runs = {name: response_lengths.simulate(lengths_N, rollout, pool, shards=1, pages=64,
                                          prompt_width=16)
          for name, lengths_N in (("cap", np.full(12, 32)), ("short", lengths.sets[0]))}
  assert [sum(c.steps for c in runs[name].chunks) for name in ("cap", "short")] == [96, 64]
  assert runs["short"].rounds == runs["cap"].rounds == 3
  assert [c.width for c in runs["short"].chunks] == [4, 7, 7, 7, 7, 4, 4, 4]


def test_metrics_jsonl_steps_are_read_clipped_and_spaced(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": step, "response/tokens_mean": 1.0, "response/lengths": [step, 50, 0, 7]}
          for step in range(1, 21)]
  rows.insert(3, {"step": 3, "eval/math/mean@1": 0.5})  # An evaluation row: skipped.
  path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")
  lengths = response_lengths.parse(str(path), responses=4, max_new_tokens=16)
  # 8 of the 20 steps, evenly spaced, the first and last included.
  assert lengths.steps == [1, 4, 6, 9, 12, 15, 17, 20] and lengths.source == str(path)
  assert [s.tolist() for s in lengths.sets[:2]] == [[1, 16, 1, 7], [4, 16, 1, 7]]


def test_distributions_are_drawn_once_with_a_fixed_seed():
  draw = lambda spec: response_lengths.parse(spec, 4096, 100_000).sets[0]
  assert set(draw("fixed:4096")) == {4096} and set(draw("fixed:mean=700")) == {700}
  lognormal = draw("lognormal:mean=1500")
  assert abs(lognormal.mean() - 1500) < 60 and np.median(lognormal) < 1000  # Right-skewed.
  np.testing.assert_array_equal(lognormal, draw("lognormal:mean=1500,sigma=1"))
  assert abs(draw("lognormal:mean=1500,sigma=0.2").std() - 0.2 * 1500) < 30
  uniform = draw("uniform:mean=100")
  assert (uniform.min(), uniform.max()) == (1, 199) and abs(uniform.mean() - 100) < 3
  assert draw("fixed:9000").tolist() == [9000] * 4096
  assert response_lengths.parse("lognormal:mean=1500", 4096, 2048).sets[0].max() == 2048


@pytest.mark.parametrize("spec, rows, message", [
    ("gamma:mean=3", None, "--response_lengths=gamma:mean=3: unknown distribution 'gamma' and no "
                           "such file; give a run's metrics.jsonl or one of fixed, uniform, "
                           "lognormal with a mean"),
    ("lognormal:mean=-3", None, "--response_lengths=lognormal:mean=-3: 'mean=-3' is not a "
                                "positive value of mean or sigma"),
    ("uniform:sigma=2", None, "'sigma=2' is not a positive value of mean (uniform:mean=M)"),
    ("uniform:", None, "--response_lengths=uniform:: uniform needs a mean"),
    ("runs/missing/metrics.jsonl", None,
     "--response_lengths=runs/missing/metrics.jsonl: no such file"),
    ("{file}", [{"step": 1, "response/tokens_mean": 3.0, "response/lengths": [1, 2, 3, 4]},
                {"step": 2, "response/tokens_mean": 812.4}],
     "--response_lengths={file} line 2 (step 2): no response/lengths (the run predates their "
     "logging); give a distribution instead, e.g. lognormal:mean=812"),
    ("{file}", [{"step": 1, "response/tokens_mean": 3.0, "response/lengths": [1, 2, 3]}],
     "--response_lengths={file} line 1 (step 1): 3 response lengths, but this run samples 4 "
     "per step"),
    ("{file}", [{"step": 1, "eval/math/mean@1": 0.5}],
     "--response_lengths={file}: no training rows"),
])
def test_a_bad_spec_names_the_flag_file_and_row(tmp_path, spec, rows, message):
  path = tmp_path / "metrics.jsonl"
  if rows:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  with pytest.raises(errors.UserError) as raised:
    response_lengths.parse(spec.format(file=path), responses=4, max_new_tokens=64)
  assert message.format(file=path) in str(raised.value)


def test_each_chunk_is_priced_at_its_width_and_attended_positions():
  """One group of 4 rows at a 16-token prompt: two responses stop after 8 tokens, two after 16.
  Chunk 1 runs 4 rows from position 15 for 8 steps (each attends 16 .. 23 positions: 156),
  chunk 2 the 2 rows left at width 2 from position 23 (24 .. 31: 220 each)."""
  rollout = _rollout(prompts=1, group=4, new_tokens=16)
  run = response_lengths.simulate(np.array([16, 16, 8, 8]), rollout,
                                  PoolConfig(rows=4, page_size=16, chunk_steps=8), shards=1,
                                  pages=9, prompt_width=16)
  assert [(c.width, c.steps, c.attended) for c in run.chunks] == [(4, 8, 4 * 156), (2, 8, 2 * 220)]
  costs = response_lengths.DecodeCosts(flops=1e6, rows=4, weights_bytes=1000.0,
                                       token_bytes=2.0, comm_s=0.5)
  memory_bound = response_lengths.project(run, costs, prefill_call_s=3.0, bf16_flops=1e12,
                                          hbm_bandwidth=1e3)
  assert memory_bound["decode_s"] == pytest.approx(
      (8 * 1000 + 624 * 2) / 1e3 + (8 * 1000 + 440 * 2) / 1e3 + 16 * 0.5)
  assert memory_bound["prefill_calls"] == 1 and memory_bound["projected_sample_s"] == (
      pytest.approx(3.0 + memory_bound["decode_s"]))
  assert memory_bound["live_rows_mean"] == 3.0 and memory_bound["decode_chunks"] == {
      "2": 1, "4": 1}
  compute_bound = response_lengths.project(run, costs, 3.0, bf16_flops=1e3, hbm_bandwidth=1e12)
  assert compute_bound["decode_s"] == pytest.approx(8 * 1e6 / 1e3 * (4 / 4 + 2 / 4) + 8.0)


def test_dry_run_projection_beside_the_bound(tmp_path):
  """lengths_projection on a tiny continuous run (abstract shapes, no compile; programs priced
  with made-up figures): at the cap its waves and steps are the bound's; the static engine says
  it is not modelled."""
  config = configs.get_config("grpo", "cpu,prompts=8,group=4,new_tokens=16")
  config.data.max_prompt_length = 64
  config.rollout.engine = "continuous"
  model = ModelConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=96,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
  mesh = sharding.make_mesh(fsdp=2, tensor=2, devices=jax.devices()[:4])
  shapes = abstract_state.step_shapes(config, mesh, model)
  config.rollout.weights = "trainer"  # The rollout mesh is the trainer's: 2 batch shards.
  programs = [{"name": "sampler:prefill", "stage": "sample", "runs": 4, "projected_s": 4.0},
              {"name": "sampler:decode", "stage": "sample", "runs": 1, "flops_per_chip": 0.0,
               "comm_s": 1.6},
              {"name": "train:grpo", "stage": "update", "projected_s": 7.0}]
  target = targets.get_target("v5p-8")
  side = sample_programs.rollout_side(config, shapes, target)
  lengths = response_lengths.parse("fixed:16", 32, 16)
  report = sample_programs.lengths_projection(config, shapes, side, target, lengths, programs)
  # 64 rows per fsdp shard hold the 4 groups of each: one wave of 16 steps, one chunk.
  assert report["bound"]["waves"] == report["waves"] == 1
  assert report["bound"]["decode_steps"] == report["decode_steps"] == 16
  assert (report["prefill_calls"], report["live_rows_mean"], report["decode_rows"]) == (4, 32, 128)
  assert report["comm_s"] == pytest.approx(1.6)  # 16 steps of a 16-step chunk's 1.6 s.
  assert report["projected_step_s"] == pytest.approx(report["projected_sample_s"] + 7.0)
  assert "per_step" not in report and report["steps"] is None
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": step, "response/tokens_mean": 1.0,
                                      "response/lengths": [length] * 32}) + "\n"
                          for step, length in ((1, 16), (2, 4))))
  logged = sample_programs.lengths_projection(config, shapes, side, target,
                                      response_lengths.parse(str(path), 32, 16), programs)
  assert [p["decode_steps"] for p in logged["per_step"]] == [16, 4] and logged["steps"] == [1, 2]
  assert (logged["decode_steps"], logged["mean"], logged["max"]) == (10, 10, 16)
  assert response_lengths.summary_line(logged).startswith(
      f"response lengths {path} (mean over logged steps 1, 2): mean 10 tokens (max 16)")
  config.rollout.engine = "static"
  static = sample_programs.lengths_projection(config, shapes, side, target, lengths, programs)
  assert response_lengths.summary_line(static) == (
      "response lengths fixed:16: not modelled for rollout.engine=static: its decode loop runs "
      "until the batch's longest response stops, with many rows about the cap; the "
      "all-at-the-cap projection stands")
