"""Every attention backend against the `xla` reference: causal, GQA, packed segments and left
padding, forward and gradients; chunked memory grows linearly in the sequence length."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prerl_jax import sharding
from prerl_jax.kernels.tpu import splash
from prerl_jax.models import attention, chunked_attention
from prerl_jax.models.config import ModelConfig


def inputs(length, seed=0, batch=3, num_heads=4, num_kv=2, head_dim=32):
  """q, k, v and segment ids: row 0 left-padded, row 1 three packed sequences and end padding,
  row 2 one full sequence."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, length, num_heads, head_dim))
  k, v = (rng.normal(size=(batch, length, num_kv, head_dim)) for _ in range(2))
  segments = np.ones((batch, length), np.int32)
  segments[0, :length // 5] = 0
  third = length // 3
  segments[1, third:2 * third] = 2
  segments[1, 2 * third:] = 3
  segments[1, -7:] = 0
  as_f32 = lambda x: jnp.asarray(x, jnp.float32)
  return as_f32(q), as_f32(k), as_f32(v), jnp.asarray(segments)


def value_and_grads(fn, q, k, v, segments):
  """fn's output and the gradients of a weighted sum of it, compiled as the decoder runs fn."""
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, segments) * weights)
  return jax.jit(lambda q, k, v: (fn(q, k, v, segments),
                                  jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


def assert_matches_reference(fn, length):
  q, k, v, segments = inputs(length)
  out, grads = value_and_grads(fn, q, k, v, segments)
  ref_out, ref_grads = value_and_grads(attention.xla_attention, q, k, v, segments)
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  for grad, ref_grad in zip(grads, ref_grads):
    np.testing.assert_allclose(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_reference_keeps_segments_apart():
  q, k, v, segments = inputs(24)
  out = attention.xla_attention(q, k, v, segments)
  # Row 1's second sequence alone gives the same output as inside the packed row.
  alone = attention.xla_attention(q[1:2, 8:16], k[1:2, 8:16], v[1:2, 8:16],
                                  jnp.ones((1, 8), jnp.int32))
  np.testing.assert_allclose(out[1:2, 8:16], alone, atol=1e-6)
  # A left-padded row equals the same tokens unpadded.
  alone = attention.xla_attention(q[:1, 4:], k[:1, 4:], v[:1, 4:], jnp.ones((1, 20), jnp.int32))
  np.testing.assert_allclose(out[:1, 4:], alone, atol=1e-6)


def test_branches_share_a_prefix_in_xla_and_chunked():
  q, k, v, _ = inputs(24)
  # Row 0: one segment, a 6-token prefix (branch 0) then branches 1, 2, 3 of 6 tokens each.
  segments = jnp.ones((3, 24), jnp.int32)
  branches = jnp.asarray(np.tile(np.repeat([0, 1, 2, 3], 6), (3, 1)), jnp.int32)
  out = attention.xla_attention(q, k, v, segments, branches)
  for b, cols in ((1, slice(6, 12)), (3, slice(18, 24))):
    # A branch sees the prefix and itself: the same output as [prefix][branch] alone.
    alone = lambda x: jnp.concatenate([x[:1, :6], x[:1, cols]], axis=1)
    ref = attention.xla_attention(alone(q), alone(k), alone(v), jnp.ones((1, 12), jnp.int32))
    np.testing.assert_allclose(out[:1, cols], ref[:, 6:], atol=1e-6)
  assert not np.allclose(out, attention.xla_attention(q, k, v, segments), atol=1e-3)
  chunked = lambda q, k, v, s: chunked_attention.attention(q, k, v, s, block=8,
                                                           branch_ids_BxT=branches)
  reference = lambda q, k, v, s: attention.xla_attention(q, k, v, s, branches)
  (out, grads), (ref_out, ref_grads) = (value_and_grads(fn, q, k, v, segments)
                                        for fn in (chunked, reference))
  for got, want in zip((out, *grads), (ref_out, *ref_grads)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="model.attention='splash' cannot share a prompt"):
    attention.attend(q, k, v, segments, "splash", branches)
  assert attention.supports_branches("auto") and not attention.supports_branches("cudnn")


@pytest.mark.parametrize("length,block", [(200, 64), (96, 96)])
def test_chunked_matches_xla(length, block):
  assert_matches_reference(lambda *a: chunked_attention.attention(*a, block=block), length)


def test_splash_interpreted_matches_xla():
  assert_matches_reference(splash.attention, 200)  # padded to 256 inside: two 128-blocks


def test_splash_under_shard_map_matches_xla():
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=2)
  q, k, v, segments = inputs(128, batch=2)
  with jax.set_mesh(mesh):
    out = jax.jit(splash.attention)(q, k, v, segments)
  np.testing.assert_allclose(out, attention.xla_attention(q, k, v, segments), atol=1e-5)


def test_cudnn_falls_back_to_chunked_off_gpu(caplog):
  q, k, v, segments = inputs(64)
  with caplog.at_level(logging.INFO):
    out = attention.attend(q, k, v, segments, "cudnn")
  assert "falls back to chunked: cuDNN needs a GPU" in caplog.text
  np.testing.assert_allclose(out, attention.xla_attention(q, k, v, segments), atol=1e-5)


def test_auto_picks_by_length_on_cpu():
  assert attention.resolve("auto", 512, jnp.float32) == "xla"
  assert attention.resolve("auto", attention.CPU_CHUNKED_FROM, jnp.float32) == "chunked"
  assert attention.resolve("splash", 512, jnp.float32) == "splash"


def test_unknown_backend_and_remat_are_named():
  with pytest.raises(ValueError, match="model.attention='flash': expected one of auto, xla"):
    ModelConfig("llama", 8, 8, 8, 1, 1, 1, 8, attention="flash")
  with pytest.raises(ValueError, match="model.remat=True: expected one of none, full"):
    ModelConfig("llama", 8, 8, 8, 1, 1, 1, 8, remat=True)


def temp_bytes(fn, length):
  q = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
  segments = jax.ShapeDtypeStruct((1, length), jnp.int32)
  grad = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s)), argnums=(0, 1, 2)))
  return grad.lower(q, kv, kv, segments).compile().memory_analysis().temp_size_in_bytes


def test_chunked_temp_memory_grows_linearly():
  chunked = temp_bytes(chunked_attention.attention, 8192) / temp_bytes(
      chunked_attention.attention, 1024)
  reference = temp_bytes(attention.xla_attention, 8192) / temp_bytes(attention.xla_attention, 1024)
  assert 7 < chunked < 9  # 8x the tokens: 8x the temp bytes (measured 7.98)
  assert reference > 32  # the full score matrix: quadratic (measured 38)
