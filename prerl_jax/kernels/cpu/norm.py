"""The CPU RMSNorm kernel (rms_norm_cpu.cc) as an FFI call: the decode step's norms.

`rms_norm(x, weight, eps)` equals `model.rms_norm` for float32 x (to the rounding of its sum of
squares) in one call where XLA:CPU runs several small ops. Built and registered by
`prerl_jax.kernels.cpu.library`.
"""

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "prerl_rms_norm"  # Registered by prerl_jax.kernels.cpu.library.


def rms_norm(x, weight, eps: float, suffix: str = ""):
  """RMSNorm of float32 x [..., D] over its last axis with a weight [D]. `suffix` picks a library
  registered under other names (`library.register`)."""
  if x.dtype != jnp.float32:
    raise TypeError(f"the CPU RMSNorm kernel takes float32 inputs, got {x.dtype}; use "
                    "Sampler(kernels='xla')")
  return jax.ffi.ffi_call(TARGET + suffix, jax.ShapeDtypeStruct(x.shape, jnp.float32))(
      x, weight.astype(jnp.float32), eps=np.float32(eps))
