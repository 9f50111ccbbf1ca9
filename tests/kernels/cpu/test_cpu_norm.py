"""The CPU RMSNorm kernel: the same norms as model.rms_norm, and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prerl_jax.kernels.cpu import norm as cpu_norm
from prerl_jax.models.decoder import rms_norm
from kernel_marks import needs_cpu_kernels


@needs_cpu_kernels
@pytest.mark.parametrize("shape,eps", [
    ((2, 3, 44), 1e-5),    # 44 = five 8-lane vectors and a 4-element tail.
    ((64, 1, 576), 1e-5),  # SmolLM2's decode-step norm (one thread).
    ((300, 1, 520), 1e-5),  # Above kThreadedElements: rows split over the pool.
    ((3, 1, 4, 16), 1e-6),  # A Qwen3 q-norm over head_dim.
    ((5, 7), 4.0),          # Shorter than a vector; eps large enough to matter.
])
def test_kernel_matches_rms_norm(shape, eps):
  rng = np.random.default_rng(shape[-1])
  row_scales = rng.uniform(0.1, 10, shape[:-1] + (1,))
  x = jnp.asarray((rng.normal(size=shape) * row_scales).astype(np.float32))
  weight = jnp.asarray(rng.normal(size=shape[-1]).astype(np.float32))
  expected = jax.jit(rms_norm, static_argnums=2)(x, weight, eps)
  got = jax.jit(cpu_norm.rms_norm, static_argnums=2)(x, weight, eps)
  assert got.shape == x.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-6, atol=1e-6)
  if eps > 0.1:  # eps is used: it changes the rows of small scale.
    without_eps = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True)) * weight
    assert float(jnp.abs(got - without_eps).max()) > 0.1


def test_rejects_non_float32():
  with pytest.raises(TypeError, match="float32 inputs, got bfloat16.*kernels='xla'"):
    cpu_norm.rms_norm(jnp.zeros((2, 4), jnp.bfloat16), jnp.ones((4,)), 1e-5)


@needs_cpu_kernels
def test_kernel_rejects_a_weight_of_the_wrong_size():
  with pytest.raises(Exception, match="prerl_rms_norm: .*got D = 8 and a weight of 7"):
    jax.block_until_ready(cpu_norm.rms_norm(jnp.ones((2, 8)), jnp.ones((7,)), 1e-5))
