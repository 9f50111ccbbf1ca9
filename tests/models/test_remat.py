"""Remat policies change what the backward pass keeps, never the gradients; packed rows through
the whole decoder equal each sequence alone, with every backend."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prerl_jax.models.config import ModelConfig
from prerl_jax.models.loading import random_model

CONFIG = ModelConfig("qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
SEGMENTS = jnp.asarray([[0, 0, 0] + [1] * 9, [1] * 5 + [2] * 6 + [0]], jnp.int32)
POSITIONS = jnp.asarray([[0, 0, 0] + list(range(9)), list(range(5)) + list(range(6)) + [0]])


@functools.cache
def random_state():
  """One random model's (graph, state), built once: the configs below differ in no weight."""
  return nnx.split(random_model(CONFIG, seed=1))


def with_config(config):
  """The random model run with `config` (same weights)."""
  model = nnx.merge(*random_state())
  model.config = config
  return model


def loss_fn(config):
  """(state, loss(state) -> (loss, masked hidden)) of the random model with this config."""
  graph, state = nnx.split(with_config(config))
  weights = jnp.asarray(np.random.default_rng(2).normal(size=(2, 12, 32)), jnp.float32)
  valid = (SEGMENTS > 0)[..., None]

  def loss(state):
    hidden, _ = nnx.merge(graph, state)(TOKENS, POSITIONS, SEGMENTS)
    hidden = jnp.where(valid, hidden, 0.0)
    return jnp.sum(hidden * weights), hidden

  return state, loss


@functools.cache
def hidden_and_grads(config):
  state, loss = loss_fn(config)
  grads, hidden = jax.jit(jax.grad(loss, has_aux=True))(state)
  return hidden, jax.tree.leaves(grads)


@pytest.mark.parametrize("policy", ["full", "save_dots", "offload"])
def test_remat_policy_keeps_gradients(policy):
  _, reference = hidden_and_grads(CONFIG)
  _, grads = hidden_and_grads(CONFIG.replace(remat=policy))
  for grad, ref in zip(grads, reference):
    np.testing.assert_allclose(grad, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["chunked", "splash"])
def test_decoder_backends_match_xla(backend):
  ref_hidden, reference = hidden_and_grads(CONFIG.replace(attention="xla"))
  hidden, grads = hidden_and_grads(CONFIG.replace(attention=backend))
  np.testing.assert_allclose(hidden, ref_hidden, atol=1e-5, rtol=1e-5)
  for grad, ref in zip(grads, reference):  # float32 sums over the whole model: 1e-5 of the scale
    np.testing.assert_allclose(grad, ref, atol=1e-5 * np.abs(ref).max(), rtol=1e-5)


def test_packed_row_equals_each_sequence_alone():
  model = with_config(CONFIG.replace(attention="xla"))
  packed, _ = model(TOKENS, POSITIONS, SEGMENTS)
  first, _ = model(TOKENS[1:, :5], POSITIONS[1:, :5], jnp.ones((1, 5), jnp.int32))
  second, _ = model(TOKENS[1:, 5:11], POSITIONS[1:, 5:11], jnp.ones((1, 6), jnp.int32))
  np.testing.assert_allclose(packed[1:, :5], first, atol=1e-5)
  np.testing.assert_allclose(packed[1:, 5:11], second, atol=1e-5)


def test_offload_moves_layer_inputs_to_host():
  for policy, host in (("offload", True), ("full", False)):
    state, loss = loss_fn(CONFIG.replace(remat=policy))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda s: loss(s)[0]))(state))
    # The stacked inputs of both layers wait in host memory for the backward pass.
    assert ("f32<host>[2,2,12,32]" in jaxpr) == host
