"""The packed-weight CPU matmul kernel: same products as model.dense, packing, and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prerl_jax import cpu_matmul
from prerl_jax.model import INPUT_AXES, dense
from test_cpu_attention import needs_kernel


def _normal(rng, *shape):
  return jnp.asarray(rng.normal(size=shape).astype(np.float32))


@needs_kernel
@pytest.mark.parametrize("x_shape,w_shape,input_axes", [
    ((2, 3, 40), (40, 50), 1),        # 6 rows (a 4-row tile and 2 single rows), a partial panel.
    ((5, 1, 64), (64, 3, 16), 1),     # Two output axes (wq), 48 columns: two full panels.
    ((4, 2, 24), (2, 12, 72), 2),     # Two input axes (wo).
    ((1, 1, 7), (7, 1), 1),           # One column.
])
def test_matmul_matches_dense(x_shape, w_shape, input_axes):
  rng = np.random.default_rng(sum(w_shape))
  x, w = _normal(rng, *x_shape), _normal(rng, *w_shape)
  packed = cpu_matmul.pack(w, input_axes)
  assert packed.panels_PxKxR.shape[0] == -(-np.prod(w_shape[input_axes:]) // cpu_matmul.PANEL)
  expected = jax.jit(dense)(x, w)
  got = jax.jit(cpu_matmul.matmul)(x, packed)
  assert got.shape == expected.shape == x_shape[:2] + w_shape[input_axes:]
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_pack_layout_and_zero_padding():
  w = jnp.arange(3 * 30, dtype=jnp.float32).reshape(3, 30)
  panels = np.asarray(cpu_matmul.pack(w).panels_PxKxR)
  assert panels.shape == (2, 3, 24)
  np.testing.assert_array_equal(panels[1, 2, :6], np.asarray(w[2, 24:]))  # Columns 24..29.
  assert not panels[1, :, 6:].any()


def test_pack_layer_packs_only_the_products():
  rng = np.random.default_rng(0)
  layer = {"attn_norm": _normal(rng, 8), "wq": _normal(rng, 8, 2, 4), "wo": _normal(rng, 2, 4, 8)}
  packed = cpu_matmul.pack_layer(layer)
  assert packed["attn_norm"] is layer["attn_norm"]
  assert packed["wq"].output_shape == (2, 4) and packed["wo"].output_shape == (8,)
  assert packed["wo"].panels_PxKxR.shape == (1, 8, 24)
  assert set(packed) == set(layer) and INPUT_AXES["wo"] == 2


def test_pack_rejects_non_float32():
  with pytest.raises(TypeError, match="float32 weights, got bfloat16.*kernels='xla'"):
    cpu_matmul.pack(jnp.zeros((4, 4), jnp.bfloat16))


@needs_kernel
def test_kernel_rejects_a_wrong_packing():
  call = jax.ffi.ffi_call(cpu_matmul.TARGET, jax.ShapeDtypeStruct((2, 20), jnp.float32))
  with pytest.raises(Exception, match=r"packed as \[panels, K, 24\]"):
    jax.block_until_ready(call(jnp.ones((2, 8)), jnp.ones((2, 8, 16))))
  with pytest.raises(Exception, match="x must be"):
    jax.block_until_ready(call(jnp.ones((2, 9)), jnp.ones((1, 8, 24))))
  with pytest.raises(Exception, match="panels of 24 columns covering N"):
    jax.block_until_ready(call(jnp.ones((2, 8)), jnp.ones((2, 8, 24))))
