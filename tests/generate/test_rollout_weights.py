"""The rollout copy of the weights (generate/rollout_weights.py): the layout rule, the meshes and
shardings of each layout, the copy, and the samplers run from it on 8 CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import run_fixtures
import tiny_models
from prerl_jax import sharding
from prerl_jax.aot import collectives
from prerl_jax.generate import continuous, rollout_weights
from prerl_jax.generate.continuous import ContinuousSampler, PoolConfig
from prerl_jax.generate.rollout_weights import RolloutWeights
from prerl_jax.generate.sampler import Sampler, SamplingConfig, prompt_batch
from prerl_jax.models.config import ModelConfig
from prerl_jax.models.decoder import Decoder
from prerl_jax.models.loading import load_model
from prerl_jax.training import trainer
from sampler_checks import BUCKETS, PAD, _prompts

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
  """The sampler's meshes are the trainer's devices in its order; the tensor one splits the
  page pool's kv heads over its tensor axis."""
  devices = list(sharding.make_mesh(2, 4, 1).devices.flat)
  trainer = sharding.make_mesh(2, 4, 1)
  assert rollout_weights.rollout_mesh(trainer, "trainer") is trainer
  assert rollout_weights.rollout_mesh(trainer, "replicated") is trainer
  tensor = rollout_weights.rollout_mesh(trainer, "tensor", model_config=TINY)
  assert dict(tensor.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert list(tensor.devices.flat) == devices
  assert dict(rollout_weights.rollout_mesh(sharding.make_mesh(1, 8, 1), "tensor", 2).shape) == {
      "data": 1, "fsdp": 4, "tensor": 2}
  pool = continuous.abstract_pool(PoolConfig(rows=2, page_size=4), TINY, 8, 8, tensor)
  assert pool.sharding.spec[1] == ("data", "fsdp") and pool.sharding.spec[3] == "tensor"
  folded = rollout_weights.rollout_mesh(sharding.make_mesh(1, 4, 2), "replicated")
  assert dict(folded.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="a tensor axis of 3 does not divide the 8 devices"):
    rollout_weights.rollout_mesh(trainer, "tensor", 3)


def test_shardings_follow_the_logical_axes():
  trainer_mesh = sharding.make_mesh(1, 8, 1)
  params = rollout_weights.abstract_params(TINY)
  spec = lambda plan, *path: functools.reduce(lambda node, key: node[key], path,
                                              plan.shardings).get_value().spec
  tensor = RolloutWeights.build("tensor", TINY, trainer_mesh)
  expected = {("layers", "wq"): P(None, None, "tensor", None),
              ("layers", "wk"): P(None, None, "tensor", None),
              ("layers", "wo"): P(None, "tensor", None, None),
              ("layers", "w_gate"): P(None, None, "tensor"),
              ("layers", "w_down"): P(None, "tensor", None),
              ("layers", "attn_norm"): P(None, None),
              ("embed",): P("tensor", None), ("lm_head",): P(None, "tensor")}
  assert {path: spec(tensor, *path) for path in expected} == expected
  replicated = RolloutWeights.build("replicated", TINY, trainer_mesh)
  assert all(s.is_fully_replicated for s in jax.tree.leaves(replicated.shardings))
  assert replicated.dtype == jnp.bfloat16 and tensor.mesh.shape["tensor"] == 2
  trainer = RolloutWeights.build("trainer", TINY, trainer_mesh)
  assert jax.tree.leaves(trainer.shardings) == jax.tree.leaves(
      sharding.state_shardings(params, trainer_mesh))
  assert spec(trainer, "layers", "wq") == P(None, "fsdp", None, None)


@pytest.fixture(scope="module")
def fsdp_model(tmp_path_factory):
  """The tiny Qwen3 (float32) sharded over fsdp on 8 devices, as the trainer holds it."""
  folder = tiny_models.save_hf_model("qwen3", tmp_path_factory.mktemp("qwen3"))
  mesh = sharding.make_mesh(1, 8, 1)
  return load_model(folder, mesh=mesh, with_tokenizer=False)[0], mesh


def _sample_from_copy(engine, model, mesh, layout, prompts, config):
  """(the layout's plan, what `engine` samples from the rollout copy on the copy's mesh)."""
  plan = RolloutWeights.build(layout, model.config, mesh)
  sampler = engine(model, plan.mesh)
  tokens, mask = sharding.shard_batch(prompt_batch(prompts, config), plan.mesh)
  params = nnx.state(model)
  with jax.set_mesh(plan.mesh):
    out = sampler.sample(plan.copy(params), tokens, mask, jax.random.key(5), config)
  return plan, sharding.to_host(out)


ENGINES = {
    "continuous": lambda model, mesh: ContinuousSampler(
        model, PoolConfig(rows=2, page_size=4, chunk_steps=6), mesh),
    "static": Sampler,
}


@pytest.mark.parametrize("engine, greedy", [("continuous", True), ("continuous", False),
                                            ("static", False)])
def test_layouts_sample_the_same_tokens(fsdp_model, engine, greedy):
  """The replicated and tensor copies sample the trainer layout's tokens, with log-probs within
  1e-5 (float32; the tensor layout sums heads and MLP columns in another order), and leave the
  trainer's parameters as they were (values and shardings)."""
  model, mesh = fsdp_model
  config = SamplingConfig(max_new_tokens=12, pad_id=PAD, temperature=0.9, greedy=greedy, n=2,
                          stop_ids=(5, 7, 11, 13), prompt_buckets=BUCKETS)
  prompts = _prompts((6, 1, 13, 4, 9, 3, 7, 2), seed=3)
  params = nnx.state(model)
  before = sharding.to_host(params)
  placed = jax.tree.map(lambda x: x.sharding, params)
  runs = {layout: _sample_from_copy(ENGINES[engine], model, mesh, layout, prompts, config)
          for layout in ("trainer", "replicated", "tensor")}
  plan, reference = runs["trainer"]
  assert plan.layout == "trainer" and reference.lengths_N.min() < 12
  assert len(set(reference.tokens_NxM[:, 0])) > 3
  for layout in ("replicated", "tensor"):
    plan, out = runs[layout]
    assert plan.mesh.shape["tensor"] == (2 if layout == "tensor" else 1)
    np.testing.assert_array_equal(out.tokens_NxM, reference.tokens_NxM, err_msg=layout)
    np.testing.assert_array_equal(out.lengths_N, reference.lengths_N, err_msg=layout)
    np.testing.assert_allclose(out.logprobs_NxM, reference.logprobs_NxM, atol=1e-5,
                               err_msg=layout)
  jax.tree.map(np.testing.assert_array_equal, sharding.to_host(params), before)
  assert jax.tree.map(lambda x: x.sharding, params) == placed


def test_copy_in_bfloat16_reshards_without_touching_the_params(fsdp_model):
  """The bfloat16 copy holds the parameters rounded to bfloat16, whole on every chip
  (replicated) or split over the tensor axis; the params keep their float32 values."""
  model, mesh = fsdp_model
  config = model.config.replace(dtype="bfloat16")
  params = nnx.state(model)
  wq = np.asarray(params["layers"]["wq"][...])
  for layout, shard_heads in (("replicated", 4), ("tensor", 2)):
    plan = RolloutWeights.build(layout, config, mesh)
    copy = plan.copy(params)
    copied = copy["layers"]["wq"][...]
    assert copied.dtype == jnp.bfloat16 and copied.sharding.mesh == plan.mesh
    assert copied.addressable_shards[0].data.shape == (2, 64, shard_heads, 32)
    np.testing.assert_array_equal(np.asarray(copied), wq.astype(jnp.bfloat16))
  assert params["layers"]["wq"][...].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(params["layers"]["wq"][...]), wq)


def _decode_traffic(layout) -> collectives.Traffic:
  """What the continuous engine's compiled decode chunk (8 steps) moves per chip, for the tiny
  bfloat16 model on a (1, 8, 1) trainer mesh."""
  plan = RolloutWeights.build(layout, TINY, sharding.make_mesh(1, 8, 1))
  model = nnx.eval_shape(lambda: Decoder(TINY, rngs=nnx.Rngs(0)))
  abstract = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(
      p.shape, p.dtype if layout == "trainer" else plan.dtype, sharding=s),
      nnx.state(model), plan.shardings)
  sampler = ContinuousSampler(model, PoolConfig(rows=4, page_size=4, chunk_steps=8), plan.mesh)
  config = SamplingConfig(max_new_tokens=16, pad_id=PAD, n=2, prompt_buckets=BUCKETS)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(plan.mesh))
  decode = sampler.trace(abstract, key, config, prompt_width=8)["decode"]
  return collectives.traffic(decode.lower().compile().as_text(), while_trips=(8,))


def test_replicated_decode_gathers_no_weights():
  """Compiled for 8 CPU devices, the decode chunk (8 steps) from the replicated copy moves no
  weights: its only collective is the loop condition's "is a row live" (a 1-byte all-reduce over
  8 chips, (1 + 1) x 7/8 bytes per check, 9 checks). From the trainer's fsdp params it gathers
  every layer's weights on every step; the tensor copy only reduces activations (its gathers
  are smaller than the smallest weight, a 32-element norm)."""
  trainer, replicated, tensor = map(_decode_traffic, ("trainer", "replicated", "tensor"))
  assert {kind: count for kind, count in replicated.ops.items() if count} == {"all-reduce": 9}
  assert replicated.total_bytes == 9 * 2 * 7 / 8
  layer_weights_bf16 = 2 * 43_200 * 2
  assert trainer.bytes["all-gather"] >= 8 * layer_weights_bf16 * 7 / 8
  assert tensor.bytes["all-gather"] / tensor.ops["all-gather"] < 32 * 2
  assert tensor.bytes["all-reduce"] > 0 and tensor.ops["all-to-all"] == 0


def test_trainer_samples_from_the_copy_and_keeps_its_params(tmp_path):
  """A step of a run on fsdp=2 (rollout.weights=auto: replicated, float32 on CPU) makes the copy
  (time/reshard), keeps the params' shardings, and updates them as the same step sampled from
  the trainer's own params (rollout.weights=trainer) does."""
  model_dir = run_fixtures.save_tiny_chat_model(str(tmp_path / "model"))
  run = trainer.Trainer(run_fixtures.tiny_config(
      "w_reinforce", model_dir, str(tmp_path / "run"), steps=1,
      overrides=["--config.mesh.fsdp=2"]))
  try:
    assert run.evaluator.rollout_weights.layout == "replicated"
    placed = jax.tree.map(lambda x: x.sharding, run.state.params)
    start = jax.tree.map(lambda x: x.copy(), run.state)
    batch = next(run.batches())
    params, logged = {}, {}
    for layout in ("replicated", "trainer"):
      run.state = jax.tree.map(lambda x: x.copy(), start)
      run.evaluator.rollout_weights = RolloutWeights.build(layout, run.model.config, run.mesh)
      logged[layout], _ = run.train_step(1, batch)
      assert jax.tree.map(lambda x: x.sharding, run.state.params) == placed
      params[layout] = sharding.to_host(run.state.params)
  finally:
    run.close()
  assert logged["replicated"]["time/reshard"] > 0
  assert logged["replicated"]["sampler/max_abs_logp_diff"] <= 1e-5
  assert logged["replicated"]["response/lengths"] == logged["trainer"]["response/lengths"]
  changed = jax.tree.map(lambda a, b: np.abs(a - b).max(), params["replicated"],
                         sharding.to_host(start.params))
  assert max(jax.tree.leaves(changed)) > 1e-4  # The step moved the params ...
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params["replicated"],
               params["trainer"])  # ... as the step from the trainer's params did.


def test_every_leaf_of_the_copy_is_the_params_in_bfloat16(fsdp_model):
  """Layer by layer and through the trainer's split on the copy's mesh, each copy holds every
  parameter rounded to bfloat16, placed as its plan says, from a (1, 8, 1) and a (2, 4, 1)
  trainer mesh."""
  model, mesh = fsdp_model
  config = model.config.replace(dtype="bfloat16")
  params = nnx.state(model)
  expected = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), sharding.to_host(params))
  data_mesh = sharding.make_mesh(2, 4, 1)
  on_data_mesh = jax.device_put(params, sharding.state_shardings(params, data_mesh))
  for trainer_mesh, trainer_params in ((mesh, params), (data_mesh, on_data_mesh)):
    for layout in ("replicated", "tensor"):
      plan = RolloutWeights.build(layout, config, trainer_mesh)
      copy = plan.copy(trainer_params)
      placed = zip(jax.tree.leaves(copy), jax.tree.leaves(plan.shardings), strict=True)
      assert all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in placed)
      assert {x.dtype for x in jax.tree.leaves(copy)} == {jnp.dtype(jnp.bfloat16)}
      jax.tree.map(np.testing.assert_array_equal, sharding.to_host(copy), expected)
