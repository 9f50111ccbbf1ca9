"""Dry run: exact per-device state bytes, loop-aware FLOPs, and a prediction the real step keeps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prerl_jax.aot import dry_run
from prerl_jax.training import run_config
from prerl_jax import sharding
from prerl_jax.rl import train_step
from prerl_jax.models.loading import random_model
from prerl_jax.models.config import ModelConfig
from prerl_jax.rl.objective import get_objective

TINY = ModelConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16)
MESH = {"fsdp": 4, "tensor": 2}


def tiny_config():
  config = run_config.make_config("grpo", "cpu,prompts=8,group=4,new_tokens=16")
  config.data.max_prompt_length = 64
  config.train.log_both_spaces = False
  return config


@pytest.fixture(scope="module")
def report():
  return dry_run.dry_run(tiny_config(), MESH, "v5e", model_config=TINY)


def test_state_bytes_per_device_match_the_sharding(report):
  # fsdp=4 splits `embed`, tensor=2 splits vocab, heads, kv heads and mlp; norms are replicated.
  elements = (128 * 64 // 8 * 2  # embed and lm_head
              + 64 + 2 * 2 * 64  # final, attention and mlp norms
              + 2 * (64 // 4) * (4 // 2) * 16 * 2  # wq, wo
              + 2 * (64 // 4) * (2 // 2) * 16 * 2  # wk, wv
              + 2 * (64 // 4) * (96 // 2) * 3)  # w_gate, w_up, w_down
  assert report["bytes"]["params"] == elements * 4 == 40192
  assert report["bytes"]["opt_state"] == 2 * 40192 + 4  # Adam moments and the int32 count.
  # k and v of 2 layers: the prompt block (8 prompts / 4 x 1 kv head x 64 slots x 16) and the
  # generated block (32 rows / 4 x 1 kv head x (16 - 1) slots x 16), float32.
  assert report["bytes"]["kv_cache"] == 2 * 2 * (2 * 64 + 8 * 15) * 16 * 4
  assert report["sampler"]["peak_bytes"] >= report["bytes"]["kv_cache"]
  assert sum(report["train_steps"][0]["collectives"].values()) > 0
  assert "DOES NOT FIT" not in dry_run.format_report(report)


def test_flops_count_every_scan_iteration_xla_counts_one():
  def scanned(x_MxK, w_KxN):
    return jax.lax.scan(lambda c, _: (c, c @ w_KxN), x_MxK, None, length=5)[1]

  traced = jax.jit(scanned).trace(jax.ShapeDtypeStruct((8, 16), jnp.float32),
                                  jax.ShapeDtypeStruct((16, 32), jnp.float32))
  one_iteration = 2 * 8 * 16 * 32
  assert dry_run.matmul_flops(traced.jaxpr.jaxpr) == 5 * one_iteration
  # XLA's count: one iteration's matmul plus the loop counter's two scalar ops.
  assert traced.lower().compile().cost_analysis()["flops"] == one_iteration + 2


def test_paper_scale_advice_names_the_knobs():
  report = {"rows": 1024, "batch_devices": 8, "micro_batches": 16, "prompt_width": 1024,
                 "max_new_tokens": 8192, "mesh": {"tensor": 1},
                 "model": {"remat": "none", "num_heads": 32},
                 "bytes": {"params": 1, "opt_state": 2, "reference": 0, "kv_cache": 0},
                 "sampler": {"resident_bytes": 0},
                 "train_steps": [{"objective": "grpo", "peak_bytes": 300 * 2**30,
                                  "temp_bytes": 290 * 2**30}]}
  (note,) = dry_run.advice(report, dry_run.ACCELERATORS["v5p"])
  # 16 * 290 / (95 - 10) = 54.6 -> the next micro-batch count leaving 8-row multiples: 64.
  assert "model.remat=full" in note and "optim.micro_batches of at least 64" in note
  assert "attention scores take 81.0 GiB" in note  # 8 rows x 32 heads x 9215^2 x 4 bytes.


def test_real_train_step_stays_within_the_prediction(report):
  """Runs the tiny step for real on the same mesh and compares with the dry run.

  Device temporaries are not observable on CPU, so the comparison is (a) the executable compiled
  from the real, concretely sharded state and batch has the memory analysis the dry run predicted
  (the prediction is of the program that actually runs), and (b) after running, the arrays
  resident on each device are exactly the predicted state bytes and never exceed the peak.
  """
  config = tiny_config()
  mesh = sharding.make_mesh(**{"data": 1, **MESH})
  optimizer = train_step.make_optimizer(config.optim.learning_rate)
  graphdef, state = train_step.init_train_state(random_model(TINY, mesh=mesh), optimizer,
                                                mesh=mesh)
  assert dry_run.per_device_bytes(state.params) == report["bytes"]["params"]
  assert dry_run.per_device_bytes(state.opt_state) == report["bytes"]["opt_state"]
  rows, rng = 32, np.random.default_rng(0)
  batch = sharding.shard_batch(train_step.rollout_batch(
      rng.integers(3, 128, (rows, 64)), rng.integers(1, 64, rows),
      rng.integers(3, 128, (rows, 16)), rng.integers(1, 17, rows),
      np.full((rows, 16), -4.8, np.float32), np.tile([1.0, 0.0, 0.0, 1.0], rows // 4)), mesh)
  step = train_step.make_train_step(graphdef, get_objective("grpo"), optimizer, group_size=4,
                                    micro_batches=config.optim.micro_batches, bos_id=0,
                                    mesh=mesh, state=state)
  compiled = step.lower(state, batch).compile(dry_run.FAST_COMPILE)
  memory = compiled.memory_analysis()
  predicted = report["train_steps"][0]
  assert memory.temp_size_in_bytes == predicted["temp_bytes"] > 0
  assert memory.argument_size_in_bytes == predicted["argument_bytes"]

  new_state, metrics = compiled(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  resident = dry_run.per_device_bytes((new_state.params, new_state.opt_state))
  assert resident == report["bytes"]["params"] + report["bytes"]["opt_state"]
  left = dry_run.per_device_bytes((new_state.params, new_state.opt_state, metrics, batch))
  assert left <= predicted["peak_bytes"]
