"""The rollout copy of the weights (generate/rollout_weights.py): the layout rule, the meshes and
shardings of each layout, the copy, and the samplers run from it on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from prerl_jax import sharding
from prerl_jax.generate import rollout_weights
from prerl_jax.generate.rollout_weights import RolloutWeights
from prerl_jax.models.config import ModelConfig

# The tiny Qwen3 of tests/tiny_models.py. Parameters by hand: embedding and LM head 128 x 64
# each, final norm 64; per layer norms 64 + 64 + 32 + 32, wq 64 x 4 x 32, wk and wv 64 x 2 x 32,
# wo 4 x 32 x 64, three MLP weights 64 x 96: 43,200; two layers: 102,848 parameters, 205,696
# bytes in bfloat16. Split over a tensor axis of 2 (vocabulary, heads, kv heads and MLP columns
# halved, norms whole): 51,648 parameters, 103,296 bytes per chip.
TINY = ModelConfig(model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, qk_norm=True,
                   param_dtype="float32", dtype="bfloat16")
REPLICATED_BYTES, TENSOR_2_BYTES = 205_696, 103_296


def test_copy_bytes_per_chip_by_hand():
  mesh = sharding.make_mesh(1, 8, 1)
  params = rollout_weights.abstract_params(TINY)
  for layout, expected in (("replicated", REPLICATED_BYTES), ("tensor", TENSOR_2_BYTES)):
    plan = RolloutWeights.build(layout, TINY, mesh)
    assert plan.bytes_per_chip(TINY) == expected
    assert rollout_weights.copy_bytes_per_chip(params, plan.shardings, jnp.bfloat16) == expected
  assert RolloutWeights.build("trainer", TINY, mesh).bytes_per_chip(TINY) == 0


def test_auto_layout_rule():
  """Replicated while the copy takes at most a quarter of a chip's HBM (or HBM is unknown), then
  a tensor axis that fits, then the trainer's own layout; one device with parameters in the
  compute dtype is already the copy."""
  mesh = sharding.make_mesh(1, 8, 1)
  resolve = lambda hbm, config=TINY, on=mesh: rollout_weights.resolve_layout("auto", config, on,
                                                                             hbm)
  assert resolve(None) == "replicated"
  assert resolve(4 * REPLICATED_BYTES) == "replicated"
  assert resolve(4 * REPLICATED_BYTES - 1) == "tensor"
  assert rollout_weights.tensor_size(TINY, mesh, 4 * TENSOR_2_BYTES) == 2
  assert resolve(4 * TENSOR_2_BYTES) == "tensor"
  # Two kv heads: no tensor axis beyond 2 splits them, so nothing fits below this.
  assert resolve(4 * TENSOR_2_BYTES - 1) == "trainer"
  with pytest.raises(ValueError, match=r"rollout.weights=tensor: no tensor axis \(tried \[2\]"):
    rollout_weights.tensor_size(TINY, mesh, 4 * TENSOR_2_BYTES - 1)
  one_device = sharding.make_mesh(1, 1, 1)
  float32 = TINY.replace(dtype="float32")
  assert resolve(None, float32, one_device) == "trainer"
  assert resolve(None, TINY, one_device) == "replicated"  # A bfloat16 copy is a different one.
  assert resolve(None, float32) == "replicated"  # Sharded over fsdp: the copy gathers it.
  assert rollout_weights.resolve_layout("tensor", TINY, mesh) == "tensor"
  with pytest.raises(ValueError, match=r"rollout.weights='tp': expected one of \('auto', "):
    rollout_weights.resolve_layout("tp", TINY, mesh)


def test_meshes_keep_the_device_order():
  devices = list(sharding.make_mesh(2, 4, 1).devices.flat)
  trainer = sharding.make_mesh(2, 4, 1)
  assert rollout_weights.rollout_mesh(trainer, "trainer") is trainer
  assert rollout_weights.rollout_mesh(trainer, "replicated") is trainer
  tensor = rollout_weights.rollout_mesh(trainer, "tensor", model_config=TINY)
  assert dict(tensor.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert list(tensor.devices.flat) == devices
  assert dict(rollout_weights.rollout_mesh(sharding.make_mesh(1, 8, 1), "tensor", 2).shape) == {
      "data": 1, "fsdp": 4, "tensor": 2}
  folded = rollout_weights.rollout_mesh(sharding.make_mesh(1, 4, 2), "replicated")
  assert dict(folded.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="a tensor axis of 3 does not divide the 8 devices"):
    rollout_weights.rollout_mesh(trainer, "tensor", 3)


def test_shardings_follow_the_logical_axes():
  trainer_mesh = sharding.make_mesh(1, 8, 1)
  params = rollout_weights.abstract_params(TINY)
  specs = lambda plan: {name: plan.shardings["layers"][name].get_value().spec
                        for name in ("wq", "wk", "wo", "w_gate", "w_down", "attn_norm")} | {
      "embed": plan.shardings["embed"].get_value().spec,
      "lm_head": plan.shardings["lm_head"].get_value().spec}
  tensor = RolloutWeights.build("tensor", TINY, trainer_mesh)
  assert specs(tensor) == {
      "wq": PartitionSpec(None, None, "tensor", None), "wk": PartitionSpec(None, None, "tensor",
                                                                           None),
      "wo": PartitionSpec(None, "tensor", None, None), "w_gate": PartitionSpec(None, None,
                                                                               "tensor"),
      "w_down": PartitionSpec(None, "tensor", None), "attn_norm": PartitionSpec(None, None),
      "embed": PartitionSpec("tensor", None), "lm_head": PartitionSpec(None, "tensor")}
  replicated = RolloutWeights.build("replicated", TINY, trainer_mesh)
  assert all(s.is_fully_replicated for s in jax.tree.leaves(replicated.shardings))
  assert replicated.dtype == jnp.bfloat16 and tensor.mesh.shape["tensor"] == 2
  trainer = RolloutWeights.build("trainer", TINY, trainer_mesh)
  assert jax.tree.leaves(trainer.shardings) == jax.tree.leaves(
      sharding.state_shardings(params, trainer_mesh))
  assert trainer.shardings["layers"]["wq"].get_value().spec == PartitionSpec(None, "fsdp", None,
                                                                             None)
