"""The packed-weight CPU matmuls (packed_matmul_cpu.cc) as FFI calls: the decode step's products.

A weight is packed once per sampler call (`pack`, `pack_layer`): its columns in panels of
`PANEL`, each panel [K, PANEL] contiguous, so the kernel streams a panel per task instead of
re-packing the weight on every product as XLA:CPU's dots do. `matmul(x, packed, residual)` equals
`model.dense(x, weight, residual)` and `gated_matmul(x, gate, up)` `model.gated_dense` (float32,
to rounding: the kernel's silu uses its own exp). The kernels are built and registered by
`prerl_jax.kernels.cpu.library`.
"""

import math

import jax
import jax.numpy as jnp
from flax import struct

from prerl_jax.models.decoder import INPUT_AXES

# Registered by prerl_jax.kernels.cpu.library.
TARGET, RESIDUAL_TARGET, GATED_TARGET = ("prerl_packed_matmul", "prerl_packed_matmul_residual",
                                         "prerl_gated_matmul")
PANEL = 24  # Columns per panel: kPanel in packed_matmul_cpu.cc.


@struct.dataclass
class PackedWeight:
  """A weight [*inputs, *outputs] packed as panels [ceil(N / PANEL), K, PANEL], K the product of
  the input axes and N of the output axes (columns past N are zero)."""

  panels_PxKxR: jax.Array
  output_shape: tuple[int, ...] = struct.field(pytree_node=False)


def pack(weight, input_axes: int = 1) -> PackedWeight:
  """Packs a float32 weight whose first `input_axes` axes are contracted by the product."""
  if weight.dtype != jnp.float32:
    raise TypeError(f"the CPU matmul kernel takes float32 weights, got {weight.dtype}; use "
                    "Sampler(kernels='xla')")
  output_shape = tuple(weight.shape[input_axes:])
  inputs, outputs = math.prod(weight.shape[:input_axes]), math.prod(output_shape)
  panels = -(-outputs // PANEL)
  padded = jnp.pad(weight.reshape(inputs, outputs), ((0, 0), (0, panels * PANEL - outputs)))
  return PackedWeight(padded.reshape(inputs, panels, PANEL).transpose(1, 0, 2), output_shape)


def pack_layer(layer_weights: dict) -> dict:
  """One layer's weights (`Decoder.layer_weights`) with its products' weights packed."""
  return {name: pack(w, INPUT_AXES[name]) if name in INPUT_AXES else w
          for name, w in layer_weights.items()}


def matmul(x, weight: PackedWeight, residual=None, suffix: str = ""):
  """x [..., K] times the packed weight, plus `residual` where given: [..., *outputs] (float32).
  `suffix` picks a library registered under other names (`library.register`)."""
  outputs = math.prod(weight.output_shape)
  result = jax.ShapeDtypeStruct((*x.shape[:-1], outputs), jnp.float32)
  operands = [x.astype(jnp.float32), weight.panels_PxKxR]
  if residual is not None:
    operands.append(residual.astype(jnp.float32).reshape(result.shape))
  target = TARGET if residual is None else RESIDUAL_TARGET
  out = jax.ffi.ffi_call(target + suffix, result)(*operands)
  return out.reshape(*x.shape[:-1], *weight.output_shape)


def gated_matmul(x, gate: PackedWeight, up: PackedWeight, suffix: str = ""):
  """silu(x @ gate) * (x @ up) for x [..., K] and two weights [K, N] packed alike: [..., N]."""
  if gate.panels_PxKxR.shape != up.panels_PxKxR.shape or gate.output_shape != up.output_shape:
    raise ValueError(f"gated_matmul: the gate and up weights differ in shape "
                     f"({gate.output_shape} vs {up.output_shape})")
  result = jax.ShapeDtypeStruct((*x.shape[:-1], math.prod(gate.output_shape)), jnp.float32)
  out = jax.ffi.ffi_call(GATED_TARGET + suffix, result)(x.astype(jnp.float32), gate.panels_PxKxR,
                                                        up.panels_PxKxR)
  return out.reshape(*x.shape[:-1], *gate.output_shape)
