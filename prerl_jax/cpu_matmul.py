"""The packed-weight CPU matmul (packed_matmul_cpu.cc) as an FFI call: the decode step's products.

A weight is packed once per sampler call (`pack`, `pack_layer`): its columns in panels of
`PANEL`, each panel [K, PANEL] contiguous, so the kernel streams a panel per task instead of
re-packing the weight on every product as XLA:CPU's dots do. `matmul(x, packed)` equals
`model.dense(x, weight)` (float32). The kernel is built and registered by `prerl_jax.cpu_kernels`.
"""

import math

import jax
import jax.numpy as jnp
from flax import struct

from prerl_jax.model import INPUT_AXES

TARGET = "prerl_packed_matmul"  # Registered by prerl_jax.cpu_kernels.
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


def matmul(x, weight: PackedWeight, target: str = TARGET):
  """x [..., K] times the packed weight: [..., *outputs] (float32)."""
  outputs = math.prod(weight.output_shape)
  out = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((*x.shape[:-1], outputs), jnp.float32))(
      x.astype(jnp.float32), weight.panels_PxKxR)
  return out.reshape(*x.shape[:-1], *weight.output_shape)
