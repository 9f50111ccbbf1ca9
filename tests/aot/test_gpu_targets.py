"""GPU targets: XLA:GPU compiles the tiny train step for an H100 host, deviceless (CUDA plugin)."""

import dataclasses

import jax
import pytest

from prerl_jax.aot import abstract_state, programs as program_lib, targets, update_programs
from test_dry_run import TINY, tiny_config

pytestmark = pytest.mark.skipif(not targets.xla_gpu_installed(),
                                reason="XLA:GPU needs the CUDA plugin: pip install -e .[gpu-aot]")

# h100x8's default mesh puts all 8 chips on fsdp, which splits `embed` (64 / 8 = 8 per chip);
# the RMSNorm scales are replicated. Float32 elements per chip of TINY (2 layers):
PARAM_ELEMENTS_PER_CHIP = (
    (2 * 128 * 64  # embed and lm_head [vocab 128, embed 64]
     + 2 * 2 * 64 * 4 * 16  # wq, wo [embed, 4 heads, head_dim 16]
     + 2 * 2 * 64 * 2 * 16  # wk, wv [embed, 2 kv heads, head_dim 16]
     + 2 * 3 * 64 * 96) // 8  # w_gate, w_up, w_down [embed, mlp 96]
    + 64 + 2 * 2 * 64)  # final norm; attention and mlp norms of each layer
# One chip's 32 / 8 = 4 rows of the train batch: prompt tokens (int32) and mask (bool) of 64,
# response tokens (int32), mask (bool) and sampler log-probs (float32) of 16, rewards (float32).
BATCH_BYTES_PER_CHIP = 4 * (64 * 4 + 64 + 16 * 4 + 16 + 16 * 4 + 4)


def test_xla_gpu_compiles_the_tiny_train_step_for_an_h100_host():
  target = targets.get_target("h100x8")
  assert target.compiler == "xla-gpu"
  config = tiny_config()
  config.optim.pack = False  # The batch bytes below are a padded RolloutBatch's.
  mesh = abstract_state.make_target_mesh(target, None)
  assert {(d.platform, d.device_kind) for d in mesh.devices.flat} == {
      ("gpu", "NVIDIA H100 80GB HBM3")}
  with jax.set_mesh(mesh):
    model = dataclasses.replace(TINY, attention="chunked")
    shapes = abstract_state.step_shapes(config, mesh, model)
    (program,) = update_programs.train_programs(config, shapes, config.optim.micro_batches)
    train = program_lib.compile_program(program, target)
  params = PARAM_ELEMENTS_PER_CHIP * 4
  assert shapes.bytes["params"] == params == 40192
  assert shapes.bytes["opt_state"] == 2 * params + 4  # Adam moments and the int32 count.
  # XLA:GPU's memory analysis: the program takes exactly one chip's shard of the state (params,
  # Adam state, int32 step and skipped count, the uint32[2] rng key) and of the batch, and
  # donates the state.
  assert train["compiler_status"] == "compiled" and train["fits"]
  state = params + (2 * params + 4) + 4 + 4 + 8
  assert train["argument_bytes"] == state + BATCH_BYTES_PER_CHIP == 122468
  assert train["alias_bytes"] == state
  assert 0 < train["temp_bytes"] < target.hbm_bytes


def test_gpu_targets_plan_chunked_attention():
  config = tiny_config()
  for attention in ("auto", "cudnn", "xla"):
    config.model.attention = attention
    planned = abstract_state.model_config_for(config, targets.get_target("h200x1")).attention
    assert planned == ("xla" if attention == "xla" else "chunked")
  config.model.attention = "auto"
  assert abstract_state.model_config_for(config, targets.get_target("v5p-8")).attention == "splash"


@pytest.mark.parametrize("name, chips, kind", [
    ("h100x1", 1, "NVIDIA H100 80GB HBM3"), ("h200x1", 1, "NVIDIA H200 141GB HBM3e"),
    ("h200x8", 8, "NVIDIA H200 141GB HBM3e")])
def test_each_gpu_target_is_one_host_of_its_chips(name, chips, kind):
  devices = targets.target_devices(targets.get_target(name))
  assert [(d.platform, d.device_kind, d.process_index) for d in devices] == [
      ("gpu", kind, 0)] * chips
