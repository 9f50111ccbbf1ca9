"""The packed-weight CPU matmul kernels: the same products as model.dense (with and without a
residual) and model.gated_dense, packing, and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prerl_jax.kernels.cpu import matmul as cpu_matmul
from prerl_jax.models.decoder import INPUT_AXES, dense, gated_dense
from kernel_marks import needs_cpu_kernels


def _normal(rng, *shape):
  return jnp.asarray(rng.normal(size=shape).astype(np.float32))


@needs_cpu_kernels
@pytest.mark.parametrize("x_shape,w_shape,input_axes", [
    ((2, 3, 40), (40, 50), 1),        # 6 rows (a 4-row tile and 2 single rows), a partial panel.
    ((5, 1, 64), (64, 3, 16), 1),     # Two output axes (wq), 48 columns: two full panels.
    ((3, 7, 33), (33, 30), 1),        # 21 rows: two 8-row tiles, a 4-row tile and a single row.
    ((4, 2, 24), (2, 12, 72), 2),     # Two input axes (wo).
    ((1, 1, 7), (7, 1), 1),           # One column.
])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matmul_matches_dense(x_shape, w_shape, input_axes, with_residual):
  rng = np.random.default_rng(sum(w_shape))
  x, w = _normal(rng, *x_shape), _normal(rng, *w_shape)
  residual = _normal(rng, *x_shape[:2], *w_shape[input_axes:]) * 5 if with_residual else None
  packed = cpu_matmul.pack(w, input_axes)
  assert packed.panels_PxKxR.shape[0] == -(-np.prod(w_shape[input_axes:]) // cpu_matmul.PANEL)
  expected = jax.jit(dense)(x, w, residual)
  got = jax.jit(cpu_matmul.matmul)(x, packed, residual)
  assert got.shape == expected.shape == x_shape[:2] + w_shape[input_axes:]
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
  if with_residual:  # The residual is really added (it is larger than the product).
    assert float(jnp.abs(got - jax.jit(dense)(x, w)).max()) > 1.0


@needs_cpu_kernels
@pytest.mark.parametrize("x_shape,columns,gate_scale", [
    ((2, 3, 40), 50, 1.0),   # 6 rows (a 4-row tile and 2 single rows), a partial panel.
    ((4, 1, 16), 48, 30.0),  # Gate values far past +-88, where the kernel's exp saturates.
    ((2, 7, 24), 30, 1.0),   # 14 rows: an 8-row tile, a 4-row tile and 2 single rows.
])
def test_gated_matmul_matches_gated_dense(x_shape, columns, gate_scale):
  rng = np.random.default_rng(columns)
  x = _normal(rng, *x_shape)
  gate, up = _normal(rng, x_shape[-1], columns) * gate_scale, _normal(rng, x_shape[-1], columns)
  expected = jax.jit(gated_dense)(x, gate, up)
  got = jax.jit(cpu_matmul.gated_matmul)(x, cpu_matmul.pack(gate), cpu_matmul.pack(up))
  assert got.shape == expected.shape == x_shape[:2] + (columns,)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-6, atol=1e-5)
  pre_activation = np.asarray(dense(x, gate))
  assert (pre_activation < -2).any() and (pre_activation > 2).any()
  if gate_scale > 1:
    assert np.abs(pre_activation).max() > 150


def test_gated_matmul_rejects_weights_of_different_shapes():
  rng = np.random.default_rng(0)
  gate, up = cpu_matmul.pack(_normal(rng, 8, 30)), cpu_matmul.pack(_normal(rng, 8, 20))
  with pytest.raises(ValueError,
                     match=r"gate and up weights differ in shape \(\(30,\) vs \(20,\)\)"):
    cpu_matmul.gated_matmul(_normal(rng, 2, 1, 8), gate, up)


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


@needs_cpu_kernels
def test_kernel_rejects_a_wrong_packing():
  call = jax.ffi.ffi_call(cpu_matmul.TARGET, jax.ShapeDtypeStruct((2, 20), jnp.float32))
  with pytest.raises(Exception, match=r"packed as \[panels, K, 24\]"):
    jax.block_until_ready(call(jnp.ones((2, 8)), jnp.ones((2, 8, 16))))
  with pytest.raises(Exception, match="x must be"):
    jax.block_until_ready(call(jnp.ones((2, 9)), jnp.ones((1, 8, 24))))
  with pytest.raises(Exception, match="panels of 24 columns covering N"):
    jax.block_until_ready(call(jnp.ones((2, 8)), jnp.ones((2, 8, 24))))
  residual = jax.ffi.ffi_call(cpu_matmul.RESIDUAL_TARGET,
                              jax.ShapeDtypeStruct((2, 20), jnp.float32))
  with pytest.raises(Exception, match="prerl_packed_matmul_residual: the residual must have out"):
    jax.block_until_ready(residual(jnp.ones((2, 8)), jnp.ones((1, 8, 24)), jnp.ones((2, 19))))
  gated = jax.ffi.ffi_call(cpu_matmul.GATED_TARGET, jax.ShapeDtypeStruct((2, 20), jnp.float32))
  with pytest.raises(Exception, match="prerl_gated_matmul: the gate and up weights must be packed"):
    jax.block_until_ready(gated(jnp.ones((2, 8)), jnp.ones((1, 8, 24)), jnp.ones((1, 9, 24))))
