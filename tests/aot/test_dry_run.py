"""Dry run: libtpu compiles a tiny step for a real v5p topology; exact per-chip bytes; loop FLOPs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from prerl_jax import sharding
from prerl_jax.aot import dry_run, programs as program_lib, report as report_lib, targets
from prerl_jax.generate import sampler as sampler_lib
from prerl_jax.rl.batch import rollout_batch
from prerl_jax.models.config import ModelConfig
from prerl_jax.models.loading import random_model
from prerl_jax.rl import train_step
from prerl_jax.rl.objective import get_objective

TINY = ModelConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16)
MESH = {"fsdp": 2, "tensor": 2}
# fsdp=2 splits `embed`, tensor=2 splits vocab, heads, kv heads and mlp; norms are replicated.
PARAM_ELEMENTS = (128 * 64 // 4 * 2  # embed and lm_head
                  + 64 + 2 * 2 * 64  # final, attention and mlp norms
                  + 2 * (64 // 2) * (4 // 2) * 16 * 2  # wq, wo
                  + 2 * (64 // 2) * (2 // 2) * 16 * 2  # wk, wv
                  + 2 * (64 // 2) * (96 // 2) * 3)  # w_gate, w_up, w_down


def tiny_config():
  config = configs.get_config("grpo", "cpu,prompts=8,group=4,new_tokens=16")
  config.data.max_prompt_length = 64
  config.train.log_both_spaces = False
  return config


@pytest.fixture(scope="module")
def tpu_report():
  pytest.importorskip("libtpu", reason="the TPU dry run needs libtpu: pip install -e .[tpu-aot]")
  return dry_run.dry_run(tiny_config(), "v5p-8", MESH, model_config=TINY)


def test_libtpu_compiles_the_step_for_a_v5p_topology(tpu_report):
  assert (tpu_report["target"], tpu_report["compiler"], tpu_report["chips"]) == ("v5p-8", "tpu", 4)
  assert [p["name"] for p in tpu_report["programs"]] == ["rollout:copy", "sampler", "train:grpo"]
  b = tpu_report["bytes_per_chip"]
  assert b["params"] == PARAM_ELEMENTS * 4 == 79104
  assert b["opt_state"] == 2 * 79104 + 4  # Adam moments and the int32 count.
  # rollout.weights=auto: the float32 copy (the compute dtype) replicated, on the mesh with the
  # tensor axis folded into fsdp: 4 batch shards.
  assert tpu_report["rollout_weights"] == "replicated"
  assert tpu_report["rollout_mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert b["rollout_copy"] == (2 * 128 * 64 + 64 + 2 * 2 * 64 + 2 * 2 * 64 * 4 * 16
                               + 2 * 2 * 64 * 2 * 16 + 3 * 2 * 64 * 96) * 4
  # k and v of 2 layers: the prompt block (8 prompts / 4 x 2 kv heads x 64 slots x 16) and the
  # generated block (32 rows / 4 x 2 kv heads x (16 - 1) slots x 16), float32.
  assert b["kv_cache"] == 2 * 2 * (4 * 64 + 16 * 15) * 16 * 4
  copy, sampler, train = tpu_report["programs"]
  assert copy["collective_bytes_per_chip"]["all-gather"] > 0
  assert sampler["resident_bytes"] == b["params"] + b["opt_state"]
  assert sampler["peak_bytes_per_chip"] >= b["params"] + b["kv_cache"] + b["opt_state"]
  assert train["argument_bytes"] >= b["params"] + b["opt_state"]
  assert train["hbm_bytes_per_chip"] == targets.TARGETS["v5p-8"].hbm_bytes
  assert tpu_report["fits"] and not tpu_report["advice"]
  assert tpu_report["projected_step_s"] == pytest.approx(
      copy["projected_s"] + sampler["projected_s"] + train["projected_s"])
  assert sum(train["collectives"].values()) > 0
  assert "[simulated]" not in report_lib.format_report(tpu_report)


def test_continuous_engine_compiles_its_pool_programs_with_the_tpu_paged_kernel():
  pytest.importorskip("libtpu", reason="the TPU dry run needs libtpu: pip install -e .[tpu-aot]")
  config = tiny_config()
  config.rollout.update(engine="continuous", weights="trainer")  # The fsdp x tensor mesh.
  # head_dim 128: the TPU ragged paged attention kernel's lane width.
  model = dataclasses.replace(TINY, head_dim=128)
  report = dry_run.dry_run(config, "v5p-8", MESH, model_config=model)
  assert [(p["name"], p["runs"]) for p in report["programs"]] == [
      # 8 prompts of a 64-token bucket, one 512-token prefill chunk each, a prompt per fsdp
      # shard per call; 64 live rows per shard hold all 8 groups of 4 at once: 16 new tokens are
      # one chunk of 16 decode steps.
      ("sampler:prefill", 4), ("sampler:decode", 1), ("train:grpo", 1)]
  # The pool per chip, its shard's part: 64 rows x ceil((64 + 16) / 16) pages + the scratch
  # page, 2 layers x 16 slots x (2 kv heads / tensor 2) x (k, v) x 128, float32.
  assert report["bytes_per_chip"]["kv_cache"] == 2 * (64 * 5 + 1) * 16 * 1 * 2 * 128 * 4
  decode = report["programs"][1]
  assert decode["collectives"] is not None and decode["fits"]
  assert decode["peak_bytes_per_chip"] >= report["bytes_per_chip"]["kv_cache"]
  assert report["projected_sample_s"] == pytest.approx(
      sum(p["projected_s"] for p in report["programs"][:2]))


def test_a_simulated_target_says_so_in_every_line(tpu_report):
  text = report_lib.format_report({**tpu_report, "compiler": "simulated"})
  assert all(line.startswith("[simulated] ") for line in text.splitlines())


def test_targets_count_chips_not_cores():
  assert {name: t.chips for name, t in targets.TARGETS.items() if name.startswith("v5p")} == {
      "v5p-8": 4, "v5p-16": 8, "v5p-32": 16, "v5p-64": 32, "v5p-128": 64}
  assert targets.TARGETS["v6e-16"].chips == 16
  assert {name: t.topology for name, t in targets.TARGETS.items() if name.startswith("h")} == {
      "h100x1": "1x1x1", "h100x8": "1x1x8", "h200x1": "1x1x1", "h200x8": "1x1x8"}
  with pytest.raises(ValueError, match="--target='v5p-12' is unknown"):
    targets.get_target("v5p-12")


def test_flops_count_every_loop_iteration_xla_counts_one():
  def scanned(x_MxK, w_KxN):
    return jax.lax.scan(lambda c, _: (c, c @ w_KxN), x_MxK, None, length=5)[1]

  def looped(x_MxK, w_KxN):
    return jax.lax.while_loop(lambda c: c[0] < 7, lambda c: (c[0] + 1, c[1] @ w_KxN),
                              (0, x_MxK))[1]

  args = (jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 16), jnp.float32))
  one_iteration = 2 * 8 * 16 * 16
  scan = jax.jit(scanned).trace(*args)
  assert program_lib.matmul_flops(scan.jaxpr.jaxpr) == 5 * one_iteration
  # XLA's count: one iteration's matmul plus the loop counter's two scalar ops.
  assert scan.lower().compile().cost_analysis()["flops"] == one_iteration + 2
  loop = jax.jit(looped).trace(*args).jaxpr.jaxpr
  assert program_lib.matmul_flops(loop, while_trips=(7,)) == 7 * one_iteration
  with pytest.raises(ValueError, match="without a trip count"):
    program_lib.matmul_flops(loop)


def test_decode_segments_cover_every_decode_step():
  for max_new in (1, 2, 63, 64, 200, 8192):
    segments = sampler_lib.decode_segments(max_new)
    steps = [t for first, end in segments for t in range(first, end)]
    assert steps == list(range(1, max_new))
  assert len(sampler_lib.decode_segments(8192)) == sampler_lib.MAX_DECODE_SEGMENTS


def test_paper_scale_advice_names_the_knobs():
  report = {"rows": 1024, "batch_devices": 8, "micro_batches": 16, "prompt_width": 1024,
            "max_new_tokens": 8192, "mesh": {"tensor": 1}, "chip": "TPU v5p",
            "peaks": {"hbm_bytes": 95 * 2**30},
            "model": {"remat": "none", "num_heads": 32},
            "bytes_per_chip": {"params": 1, "opt_state": 2, "reference": 0, "kv_cache": 0},
            "programs": [{"name": "train:grpo", "stage": "update", "fits": False,
                          "peak_bytes_per_chip": 300 * 2**30, "temp_bytes": 290 * 2**30,
                          "hbm_bytes_per_chip": 95 * 2**30}]}
  (note,) = report_lib.advice(report)
  # 16 * 290 / (95 - 10) = 54.6 -> the next micro-batch count leaving 8-row multiples: 64.
  assert "model.remat=full" in note and "optim.micro_batches of at least 64" in note
  assert "attention scores take 81.0 GiB" in note  # 8 rows x 32 heads x 9215^2 x 4 bytes.


def test_real_train_step_matches_the_simulated_prediction(monkeypatch):
  """Runs the tiny step for real on the simulated mesh the h100x8 target compiles for when
  XLA:GPU is not installed (the fallback, forced here).

  Device temporaries are not observable on CPU, so the comparison is (a) the executable compiled
  from the real, concretely sharded state and batch has the memory analysis the dry run predicted
  (the prediction is of the program that actually runs: the abstract state and batch are the
  ones the trainer builds, whichever compiler reads them), and (b) after running, the arrays
  resident on each device are exactly the predicted state bytes and never exceed the peak.
  """
  monkeypatch.setattr(targets, "xla_gpu_installed", lambda: False)
  config, mesh_sizes = tiny_config(), {"fsdp": 4, "tensor": 2}
  config.optim.pack = False  # The step below takes a padded RolloutBatch.
  report = dry_run.dry_run(config, "h100x8", mesh_sizes, model_config=TINY)
  assert report["compiler"] == "simulated"
  assert {d.platform for d in targets.target_devices(targets.get_target("h100x8"))} == {"cpu"}
  mesh = sharding.make_mesh(**mesh_sizes)
  optimizer = train_step.make_optimizer(config.optim.learning_rate)
  graphdef, state = train_step.init_train_state(random_model(TINY, mesh=mesh), optimizer,
                                                mesh=mesh)
  assert sharding.per_device_bytes(state.params) == report["bytes_per_chip"]["params"]
  assert sharding.per_device_bytes(state.opt_state) == report["bytes_per_chip"]["opt_state"]
  rows, rng = 32, np.random.default_rng(0)
  batch = sharding.shard_batch(rollout_batch(
      rng.integers(3, 128, (rows, 64)), rng.integers(1, 64, rows),
      rng.integers(3, 128, (rows, 16)), rng.integers(1, 17, rows),
      np.full((rows, 16), -4.8, np.float32), np.tile([1.0, 0.0, 0.0, 1.0], rows // 4)), mesh)
  step = train_step.make_train_step(graphdef, get_objective("grpo"), optimizer, group_size=4,
                                    micro_batches=config.optim.micro_batches, bos_id=0,
                                    mesh=mesh, state=state)
  compiled = step.lower(state, batch).compile(targets.get_target("h100x8").compile_options)
  memory = compiled.memory_analysis()
  predicted = {p["name"]: p for p in report["programs"]}["train:grpo"]
  assert memory.temp_size_in_bytes == predicted["temp_bytes"] > 0
  assert memory.argument_size_in_bytes == predicted["argument_bytes"]

  new_state, metrics = compiled(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  resident = sharding.per_device_bytes((new_state.params, new_state.opt_state))
  assert resident == report["bytes_per_chip"]["params"] + report["bytes_per_chip"]["opt_state"]
  left = sharding.per_device_bytes((new_state.params, new_state.opt_state, metrics, batch))
  assert left <= predicted["peak_bytes_per_chip"]
