"""The dry run samples as the trainer does: libtpu compiles the decode from the rollout copy with
no weight gathers, sizes the pool from the HBM left (kv_cache_gib=auto), and its roofline."""

import dataclasses

import jax
import pytest

import configs
from prerl_jax import sharding
from prerl_jax.aot import abstract_state, collectives, dry_run, programs as program_lib
from prerl_jax.aot import sample_programs, targets
from prerl_jax.errors import UserError
from prerl_jax.generate import pool_budget, rollout_weights
from prerl_jax.models.config import ModelConfig

GIB = 2**30
# head_dim 128: the TPU ragged paged attention kernel's lane width. Float32 params, bfloat16
# compute, as the paper preset.
TINY = ModelConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=128, dtype="bfloat16")
# Every parameter once: embedding and LM head, the final and 2 x 2 layer norms, wq and wo (4
# heads), wk and wv (2 kv heads), the three MLP matrices.
ELEMENTS = (2 * 128 * 64 + 64 + 2 * 2 * 64 + 2 * 2 * 64 * 4 * 128 + 2 * 2 * 64 * 2 * 128
            + 3 * 2 * 64 * 96)
# On fsdp=4 the norms stay whole and every other matrix is split 4 ways on its `embed` axis.
PARAMS_PER_CHIP = 4 * (2 * 128 * 16 + 64 + 2 * 2 * 64 + 2 * 2 * 16 * 4 * 128
                       + 2 * 2 * 16 * 2 * 128 + 3 * 2 * 16 * 96)
MESH = {"fsdp": 4}


def tiny_config(weights: str, kv_cache_gib):
  config = configs.get_config("grpo", "cpu,prompts=8,group=4,new_tokens=16")
  config.data.max_prompt_length = 64
  config.train.log_both_spaces = False
  config.rollout.update(engine="continuous", weights=weights, kv_cache_gib=kv_cache_gib)
  return config


@pytest.fixture(scope="module")
def auto_report():
  pytest.importorskip("libtpu", reason="the TPU dry run needs libtpu: pip install -e .[tpu-aot]")
  return dry_run.dry_run(tiny_config("auto", "auto"), "v5p-8", MESH, model_config=TINY)


def sampler_programs(weights: str, kv_cache_gib) -> tuple:
  """(shapes, rollout side, the sampler programs compiled for v5p-8) of the tiny config."""
  pytest.importorskip("libtpu", reason="the TPU dry run needs libtpu: pip install -e .[tpu-aot]")
  config, target = tiny_config(weights, kv_cache_gib), targets.get_target("v5p-8")
  mesh = abstract_state.make_target_mesh(target, MESH)
  with jax.set_mesh(mesh):
    shapes = abstract_state.step_shapes(config, mesh, TINY)
    side = sample_programs.rollout_side(config, shapes, target)
  with jax.set_mesh(side.mesh):
    programs = [program_lib.compile_program(p, target)
                for p in sample_programs.sampler_programs(config, shapes, side)]
  return config, shapes, side, target, programs


def test_the_replicated_decode_gathers_no_weights_the_trainer_layout_does(auto_report):
  by_name = {p["name"]: p for p in auto_report["programs"]}
  assert list(by_name) == ["rollout:copy", "sampler:prefill", "sampler:decode", "train:grpo"]
  assert auto_report["rollout_weights"] == "replicated"
  decode = by_name["sampler:decode"]
  # Its only collective is the decode loop's condition, "is any row live" over the rows split on
  # 4 chips, checked 17 times in a 16-step chunk: an all-reduce of a 4-byte value (operand and
  # result, 3/4 from the other chips): 6 bytes per check.
  assert decode["collectives"]["all-reduce"] == sum(decode["collectives"].values()) == 17
  assert decode["collective_bytes_per_chip"]["total"] == 17 * (4 + 4) * 3 / 4
  assert by_name["sampler:prefill"]["collective_bytes_per_chip"]["total"] == 0
  *_, trainer = sampler_programs("trainer", 1.0)
  # From the trainer's fsdp params every decode step gathers, in bfloat16, the 3/4 it does not
  # hold of every weight matrix but one 128 x 64 vocabulary matrix (the embedding lookup moves
  # rows by all-to-all instead); the 320 norm elements are whole on every chip.
  assert trainer[1]["collective_bytes_per_chip"]["all-gather"] == (
      16 * (ELEMENTS - 320 - 128 * 64) * 2 * 3 / 4)


def test_the_copy_is_one_resharding_per_step(auto_report):
  copy = auto_report["programs"][0]
  copy_bytes = ELEMENTS * 2  # The whole model in bfloat16 on every chip.
  assert auto_report["bytes_per_chip"]["rollout_copy"] == copy_bytes == 500_352
  assert (copy["stage"], copy["runs"]) == ("sample", 1)
  # Each chip receives, in bfloat16 (cast before the gather), the 3/4 it does not hold of every
  # fsdp-split weight: all but the 320 elements of the norms, which every chip holds whole.
  moved = copy["collective_bytes_per_chip"]
  assert moved["total"] == moved["all-gather"] == (ELEMENTS - 320) * 2 * 3 / 4
  assert copy["hbm_bytes_moved_per_chip"] == PARAMS_PER_CHIP + copy_bytes
  sampler = auto_report["programs"][2]
  b = auto_report["bytes_per_chip"]
  assert b["params"] == PARAMS_PER_CHIP == 251_136
  assert sampler["resident_bytes"] == b["params"] + b["opt_state"]  # The copy is an argument.


def test_auto_pool_takes_the_hbm_left(auto_report):
  pool, budget = auto_report["pool"], auto_report["pool"]["budget"]
  hbm = targets.get_target("v5p-8").hbm_bytes
  state = PARAMS_PER_CHIP + 2 * PARAMS_PER_CHIP + 4  # Params, Adam moments and count.
  margin = 1 * GIB + 0.05 * hbm
  assert (budget["state_bytes"], budget["weights_bytes"]) == (state, ELEMENTS * 2)
  assert budget["margin_bytes"] == margin
  # The sampler programs' own bytes come from the compiler: a few MiB for the tiny model.
  assert 0 < budget["program_bytes"] < 64 * 2**20
  free = hbm - state - ELEMENTS * 2 - budget["program_bytes"] - margin
  page = 2 * 16 * (2 * 2) * 128 * 2  # Layers x slots x (k, v of 2 kv heads) x dim, bfloat16.
  assert pool["pages_per_shard"] == int(free // page) > 2_900_000
  assert pool["bytes_per_chip"] == pool["pages_per_shard"] * page
  assert auto_report["bytes_per_chip"]["kv_cache"] == pool["bytes_per_chip"]
  # 64 live rows per shard hold 16 groups of 4; the pages alone would hold 1,473,700.
  assert (pool["live_rows"], pool["rows_at_cap"], pool["waves"]) == (64, 64, 1)
  assert pool["pool_rows_at_cap"] == 4 * ((pool["pages_per_shard"] - 1) // (4 + 4 * 1))
  # Compiled with that pool, the decode leaves the margin free, give or take the difference
  # between its bytes for the probe's pool and this one and the rounding to a page.
  decode = auto_report["programs"][2]
  assert decode["fits"]
  assert abs(decode["headroom_bytes"] - margin) < budget["program_bytes"] + page
  assert auto_report["fits"] and not auto_report["advice"]


def test_the_sample_roofline_by_hand(auto_report):
  # One wave of 16 decode steps (one chunk); each reads the 500,352-byte copy and the keys and
  # values of a shard's 2 groups x 4 rows over the 64-token prompt and half the 16-token
  # response: 2 layers x (k, v of 2 kv heads) x 128 x 2 bytes per position.
  per_step = ELEMENTS * 2 + 2 * 4 * (64 + 16 / 2) * (2 * 2 * 2 * 128 * 2)
  roofline = 16 * per_step / targets.get_target("v5p-8").hbm_bandwidth
  assert auto_report["projected_sample_roofline_s"] == pytest.approx(roofline)
  decode = auto_report["programs"][2]
  assert decode["roofline_s"] == pytest.approx(roofline)
  assert auto_report["projected_sample_s"] >= roofline


def test_an_explicit_pool_too_large_fails_naming_the_key_and_numbers():
  config, shapes, side, target, programs = sampler_programs("replicated", 93.0)
  pool = sample_programs.pool_report(config, shapes, side, target, programs)
  assert pool["budget"]["pool_bytes"] < 93 * GIB
  assert pool["error"].startswith(
      "rollout.kv_cache_gib=93.0: its pool takes 93.00 GiB per chip, more than the HBM 95.74 - "
      "resident state 0.00 - rollout weights 0.00 - sampler program ")
  assert "margin 5.79 = 89.9" in pool["error"] and pool["error"].endswith(
      "GiB per chip left for it; lower it, or set it to auto")


def test_budget_arithmetic_and_page_bytes_on_a_tensor_axis():
  pytest.importorskip("libtpu", reason="needs libtpu's v5p devices: pip install -e .[tpu-aot]")
  devices = targets.target_devices(targets.get_target("v5p-8"))
  mesh = sharding.make_mesh(1, 2, 2, devices=devices)
  # 2 kv heads over tensor=2: a page holds 2 layers x 16 slots x (k, v of 1 head) x 128 x 2.
  assert pool_budget.page_bytes_per_chip(TINY, 16, mesh) == 2 * 16 * 2 * 128 * 2
  budget = pool_budget.Budget(hbm_bytes=20 * GIB, state_bytes=3 * GIB, weights_bytes=2 * GIB,
                              program_bytes=GIB)
  assert budget.margin_bytes == 2 * GIB  # 1 GiB + 5% of 20.
  assert budget.pool_bytes == 12 * GIB
  assert pool_budget.pool_pages(budget, TINY, 16, mesh) == 12 * GIB // 16384
  with pytest.raises(UserError, match=r"kv_cache_gib=auto: no room for a page pool \(HBM "
                     r"7.00 - resident state 3.00 - rollout weights 2.00 - sampler program 1.00 - "
                     r"margin 1.35 = -0.35 GiB per chip; a page takes 16384 bytes per chip"):
    pool_budget.pool_pages(dataclasses.replace(budget, hbm_bytes=7 * GIB), TINY, 16, mesh)


# Wide enough that weights, not libtpu's fixed buffers, make the copy's temporaries: 8 layers,
# per layer 2 norms of 512, wq and wo 512 x 4 x 128, wk and wv 512 x 2 x 128, three MLP matrices
# 512 x 1024; embedding and LM head 1024 x 512, final norm 512.
WIDE = ModelConfig("llama", vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=8,
                   num_heads=4, num_kv_heads=2, head_dim=128, dtype="bfloat16")
WIDE_NORMS = 8 * 2 * 512 + 512
WIDE_SPLIT = 8 * (2 * 512 * 4 * 128 + 2 * 512 * 2 * 128 + 3 * 512 * 1024) + 2 * 1024 * 512
MLP_STACK_BF16 = 8 * 512 * 1024 * 2  # The largest weight, whole: 8 MiB.


def test_the_copy_moves_layer_by_layer_what_each_chip_lacks():
  """Compiled by libtpu for v5p-8 (4 chips, params over fsdp=4), each copy's temporaries stay
  below half the largest weight; a direct reshard gathered weights whole: 8.3 MiB for the tensor
  copy, 38.6 MiB (the whole copy again) for the replicated one. The tensor copy (t=2) receives
  in bfloat16 the 3/8 of every split weight it lacks of its half (a direct reshard: 3/4); the
  replicated one the 3/4 it lacks."""
  pytest.importorskip("libtpu", reason="needs libtpu's v5p devices: pip install -e .[tpu-aot]")
  mesh = sharding.make_mesh(1, 4, 1, devices=targets.target_devices(targets.get_target("v5p-8")))
  params = rollout_weights.abstract_params(WIDE)
  trainer = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params,
                         sharding.state_shardings(params, mesh))
  compiled = {}
  for layout in ("tensor", "replicated"):
    plan = rollout_weights.RolloutWeights.build(layout, WIDE, mesh)
    with jax.set_mesh(plan.mesh):
      compiled[layout] = jax.jit(plan.copy).lower(trainer).compile()
  tensor, replicated = compiled["tensor"], compiled["replicated"]
  tensor_bytes = (WIDE_SPLIT // 2 + WIDE_NORMS) * 2  # Its half of each split weight, the norms.
  assert tensor.memory_analysis().output_size_in_bytes >= tensor_bytes == 19_940_352
  moved = collectives.traffic(tensor.as_text())
  assert moved.total_bytes == WIDE_SPLIT * 2 * 3 / 8 == 14_942_208  # The norms stay put.
  assert moved.ops["all-gather"] > 0 and moved.ops["all-to-all"] > 0
  assert tensor.memory_analysis().temp_size_in_bytes < MLP_STACK_BF16 / 2 < tensor_bytes / 4
  assert collectives.traffic(replicated.as_text()).total_bytes == WIDE_SPLIT * 2 * 3 / 4
  assert replicated.memory_analysis().temp_size_in_bytes < MLP_STACK_BF16 / 2
