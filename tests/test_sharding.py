"""Sharded forward on 8 simulated CPU devices equals the single-device forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_models
from prerl_jax import sharding
from prerl_jax.models.loading import load_model
from prerl_jax.models.decoder import positions_from_mask


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return tiny_models.save_hf_model("qwen3", tmp_path_factory.mktemp("qwen3"))


def _forward(model, tokens, mask):
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens, mask):
    hidden, _ = nnx.merge(graphdef, state)(tokens, positions_from_mask(mask), mask)
    return nnx.merge(graphdef, state).logits(hidden)

  return np.asarray(run(state, tokens, mask))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_forward_matches_single_device(checkpoint, mesh_shape):
  assert jax.device_count() == 8
  tokens, mask = tiny_models.left_padded_batch(128, lengths=(7, 4, 9, 2, 5, 9, 1, 8))
  single, _ = load_model(checkpoint, with_tokenizer=False)
  expected = _forward(single, jnp.asarray(tokens), jnp.asarray(mask))
  mesh = sharding.make_mesh(*mesh_shape)
  model, _ = load_model(checkpoint, mesh=mesh, with_tokenizer=False)
  wq = model.layers["wq"][...]
  assert len(wq.sharding.device_set) == 8
  if mesh_shape[2] > 1:  # Heads are split over the tensor axis: each shard holds fewer heads.
    assert wq.addressable_shards[0].data.shape[2] == 4 // mesh_shape[2]
  batch = sharding.shard_batch({"tokens": tokens, "mask": mask}, mesh)
  got = _forward(model, batch["tokens"], batch["mask"])
  assert np.abs(got - expected)[mask].max() <= 1e-5


def test_logical_to_spec_drops_axes_that_do_not_divide():
  mesh = sharding.make_mesh(1, 2, 4)
  spec = sharding.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16),
                                  mesh)
  assert spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
  assert sharding.parse_mesh("fsdp=8,tensor=1") == {"fsdp": 8, "tensor": 1}
  assert sharding.make_mesh(1, 2, 2).devices.size == 4  # A smaller mesh takes the first devices.
  assert sharding.batch_devices(sharding.make_mesh(2, 2, 2)) == 4
  with pytest.raises(ValueError, match="needs 12 devices"):
    sharding.make_mesh(1, 3, 4)
