"""The rollout copy of the weights: the layout the samplers decode from, made once per RL step.

The trainer keeps its parameters fully sharded (fsdp) in the parameter dtype; decoding from them
all-gathers every layer's weights on every decode step. The samplers instead run from a copy in
the compute dtype, in one of these layouts (`rollout.weights`):

- `replicated`: every weight whole on every chip; the decode reads local weights only. Runs on
  the trainer's mesh (with its tensor axis, if any, folded into fsdp).
- `tensor`: heads, MLP columns and the vocabulary (of the embedding and LM head) split over a
  tensor axis of t chips, the rest replicated, as the model's logical axes and rules say; the
  sampler's mesh is the same devices in the same order reshaped to a tensor axis of t with the
  rest on the batch axes, so the page pool's kv heads are split over the same axis. The decode
  moves activations (a reduction per attention and MLP block, the logits), never weights.
- `trainer`: the trainer's own parameters and mesh (no copy; the cast happens inside the decode
  program, as before this layout existed). The reference the others are tested against.
- `auto`: `resolve_layout`'s rule.

`rollout_copy` makes the copy in one jitted program (cast, then reshard: the one resharding
transfer of an RL step); `RolloutWeights` bundles a run's layout, mesh and shardings, and its
`copy(params)` returns the params themselves for `trainer`.

The reshard's collectives write into the program's temporaries (libtpu then copies their results
into the outputs), so the copy moves each stacked weight one layer at a time (a `lax.map`), and
for `tensor` passes through the trainer's rules on the sampler's mesh (each weight split over its
fsdp axis as the trainer splits it, heads and MLP columns over its tensor axis: an all-to-all
within each tensor group) before gathering over fsdp what the layout replicates. A chip receives
only what it lacks of its part: 3/8 of every split weight with t = 2 on 4 chips, where a direct
reshard gathered each weight whole (3/4) and kept its part. Compiled by libtpu, Qwen3-4B on
v5p:2x2x1: `tensor` (t = 2) holds 0.45 GiB of temporaries for a 3.75 GiB copy per chip (a direct
reshard: 1.67 GiB, a stacked MLP weight whole), `replicated` 0.75 GiB (a direct gather: 7.49 GiB,
the whole copy again). What is left is the embedding and the LM head: whole for `replicated`
(Qwen3-8B: both at once, 2.35 GiB), their parts for `tensor`.
"""

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from prerl_jax import sharding
from prerl_jax.models.config import ModelConfig
from prerl_jax.models.decoder import Decoder

LAYOUTS = ("auto", "replicated", "tensor", "trainer")
# `auto` replicates the copy when it takes at most this share of a chip's HBM, leaving the rest
# to the resident train state, the page pool and the decode's temporaries (Qwen3-4B's 7.5 GiB
# and Qwen3-8B's 15.3 GiB replicate on v5p's 95.7 GiB and an H100's 79.1 GiB; Qwen3-4B on a
# 16 GiB v5e goes to a tensor axis).
REPLICATED_HBM_SHARE = 0.25


def abstract_params(model_config: ModelConfig) -> nnx.State:
  """The model's parameters as shapes (nnx Variables holding ShapeDtypeStructs)."""
  return nnx.state(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0))))


def _batch_axes(rules) -> tuple[str, ...]:
  axes = dict(reversed(rules)).get("batch")
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def weight_rules(rules=sharding.DEFAULT_RULES, keep: tuple[str, ...] = ("tensor",)):
  """`rules` with only the mesh axes in `keep` left to the weights' logical axes (the batch rule
  unchanged): the copy is replicated over every other axis."""
  batch = _batch_axes(rules)

  def kept(logical, axes):
    if logical == "batch":
      return axes
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in keep and a not in batch)
    return axes or None

  return tuple((logical, kept(logical, axes)) for logical, axes in rules)


def rollout_shardings(params, mesh: Mesh, layout: str, rules=sharding.DEFAULT_RULES):
  """NamedShardings of the rollout copy of `params` (an nnx.State, abstract or not) on `mesh`
  (`rollout_mesh(...)`): every leaf whole for `replicated`; split over the tensor axis only for
  `tensor`; the trainer's (`rules`) for `trainer`."""
  keep = {"replicated": (), "tensor": ("tensor",)}
  if layout == "trainer":
    return sharding.state_shardings(params, mesh, rules)
  if layout not in keep:
    raise ValueError(f"rollout_shardings: layout {layout!r} is not one of "
                     "('replicated', 'tensor', 'trainer'); resolve 'auto' first")
  return sharding.state_shardings(params, mesh, weight_rules(rules, keep[layout]))


def copy_bytes_per_chip(params, shardings, dtype) -> int:
  """Bytes one chip holds of the copy of `params` in `dtype` under `shardings` (the busiest
  chip where a dimension does not split evenly)."""
  leaves = jax.tree.leaves(params)
  placed = jax.tree.leaves(shardings)
  itemsize = np.dtype(dtype).itemsize
  return sum(math.prod(s.shard_shape(p.shape)) * itemsize for p, s in zip(leaves, placed))


def _reshaped(mesh: Mesh, data: int, fsdp: int, tensor: int) -> Mesh:
  """The mesh's devices, in the same order, as a (data, fsdp, tensor) mesh. The same order keeps
  one device assignment, so a jitted program can read the trainer's arrays and write the copy."""
  return Mesh(mesh.devices.reshape(data, fsdp, tensor), sharding.MESH_AXES,
              axis_types=(AxisType.Auto,) * 3)


def rollout_mesh(mesh: Mesh, layout: str, tensor: int | None = None,
                 model_config: ModelConfig | None = None, hbm_bytes: float | None = None) -> Mesh:
  """The mesh the sampler runs on for `layout` (not `auto`).

  trainer: `mesh`. replicated: `mesh`, or its devices with the tensor axis folded into fsdp
  where it has one. tensor: its devices reshaped to a tensor axis of `tensor` chips (default
  `tensor_size(model_config, mesh, hbm_bytes)`), the trainer's data axis kept where it divides
  the rest, and the rest on fsdp.
  """
  data, fsdp, width = (mesh.shape[a] for a in sharding.MESH_AXES)
  devices = data * fsdp * width
  if layout == "trainer" or (layout == "replicated" and width == 1):
    return mesh
  if layout == "replicated":
    return _reshaped(mesh, data, fsdp * width, 1)
  if layout != "tensor":
    raise ValueError(f"rollout_mesh: layout {layout!r} is not one of ('replicated', 'tensor', "
                     "'trainer'); resolve 'auto' first")
  if tensor is None:
    if model_config is None:
      raise ValueError("rollout_mesh(layout='tensor') needs `tensor` or `model_config`")
    tensor = tensor_size(model_config, mesh, hbm_bytes)
  if tensor < 1 or devices % tensor:
    raise ValueError(f"rollout_mesh: a tensor axis of {tensor} does not divide the {devices} "
                     "devices")
  rest = devices // tensor
  data = data if rest % data == 0 else 1
  return _reshaped(mesh, data, rest // data, tensor)


def _fits(bytes_per_chip: float, hbm_bytes: float | None) -> bool:
  return hbm_bytes is None or bytes_per_chip <= REPLICATED_HBM_SHARE * hbm_bytes


def tensor_size(model_config: ModelConfig, mesh: Mesh, hbm_bytes: float | None = None) -> int:
  """The tensor axis of the `tensor` layout: the smallest t > 1 dividing the mesh's devices and
  the kv heads whose copy takes at most `REPLICATED_HBM_SHARE` of `hbm_bytes` per chip (any such
  t when hbm_bytes is None). Raises, naming the numbers, when none does."""
  devices = mesh.devices.size
  params = abstract_params(model_config)
  candidates = [t for t in range(2, devices + 1)
                if devices % t == 0 and model_config.num_kv_heads % t == 0]
  for t in candidates:
    tensor_mesh = rollout_mesh(mesh, "tensor", t)
    shardings = rollout_shardings(params, tensor_mesh, "tensor")
    if _fits(copy_bytes_per_chip(params, shardings, model_config.compute_dtype), hbm_bytes):
      return t
  share = "" if hbm_bytes is None else (
      f" in {REPLICATED_HBM_SHARE:.0%} of {hbm_bytes / 2**30:.1f} GiB of HBM per chip")
  raise ValueError(f"rollout.weights=tensor: no tensor axis (tried {candidates}: divisors of the "
                   f"{devices} devices and the {model_config.num_kv_heads} kv heads) fits the "
                   f"copy{share}; rollout.weights=trainer decodes from the trainer's parameters")


def resolve_layout(layout: str, model_config: ModelConfig, mesh: Mesh,
                   hbm_bytes: float | None = None, rules=sharding.DEFAULT_RULES) -> str:
  """The layout `layout` names; `auto` is:

  - `trainer` where the trainer's parameters are already whole on every chip and in the compute
    dtype (one device, say): the copy would equal them;
  - else `replicated` where the copy takes at most `REPLICATED_HBM_SHARE` of a chip's
    `hbm_bytes` (always, when hbm_bytes is None, as on CPU);
  - else `tensor` where some tensor axis fits (`tensor_size`);
  - else `trainer`.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"rollout.weights={layout!r}: expected one of {LAYOUTS}")
  if layout != "auto":
    return layout
  params = abstract_params(model_config)
  trainer = jax.tree.leaves(sharding.state_shardings(params, mesh, rules))
  if (model_config.weight_dtype == model_config.compute_dtype
      and all(s.is_fully_replicated for s in trainer)):
    return "trainer"
  replicated = rollout_shardings(params, mesh, "replicated", rules)
  if _fits(copy_bytes_per_chip(params, replicated, model_config.compute_dtype), hbm_bytes):
    return "replicated"
  try:
    tensor_size(model_config, mesh, hbm_bytes)
  except ValueError:
    return "trainer"
  return "tensor"


def _layer(placement: NamedSharding) -> NamedSharding:
  return NamedSharding(placement.mesh, PartitionSpec(*placement.spec[1:]))


def _place(x, dtype, target: NamedSharding, staging: NamedSharding | None):
  x = x.astype(dtype)
  if staging is not None:
    x = jax.lax.with_sharding_constraint(x, staging)
  return jax.lax.with_sharding_constraint(x, target)


def _copy_leaf(x, dtype, target, staging, stacked: bool):
  if not stacked:
    return _place(x, dtype, target, staging)
  layer_target = _layer(target)
  layer_staging = None if staging is None else _layer(staging)
  layers = jax.lax.map(lambda w: _place(w, dtype, layer_target, layer_staging), x)
  return jax.lax.with_sharding_constraint(layers, target)


@jax.jit(static_argnums=(1, 2))
def _cast_and_place(leaves, dtype, plans):
  return [_copy_leaf(x, dtype, *plan) for x, plan in zip(leaves, plans)]


def _leaf_plan(placed, shape, rules) -> tuple:
  """(target, staging or None, stacked) of one leaf of the copy, from its sharding as
  `rollout_shardings` gives it (an nnx Variable holding a NamedSharding, or a NamedSharding).

  staging: the leaf as `rules` split it on the copy's mesh, where that is neither the target nor
  whole. stacked: its first axis is the layers, which neither splits, and `rules` split it
  somewhere (a leaf they leave whole, a norm say, is cast where it is: nothing moves)."""
  axes = placed.get_metadata().get("logical_axes") if isinstance(placed, nnx.Variable) else None
  target = placed.get_value() if isinstance(placed, nnx.Variable) else placed
  if axes is None:
    return target, None, False
  ruled = NamedSharding(target.mesh, sharding.logical_to_spec(axes, shape, target.mesh, rules))
  if ruled.is_fully_replicated:
    return target, None, False
  staging = None
  if not (target.is_fully_replicated or ruled.is_equivalent_to(target, len(shape))):
    staging = ruled
  unsplit = lambda s: not s.spec or s.spec[0] is None
  return target, staging, axes[0] == "layers" and unsplit(target) and unsplit(ruled)


def rollout_copy(params, shardings, dtype, rules=sharding.DEFAULT_RULES):
  """A copy of `params` in `dtype` placed as `shardings` (`rollout_shardings` of the same
  `rules`): one jitted program (compiled once per layout), whose outputs are the copy's shards;
  `params` are read, not changed."""
  leaves, treedef = jax.tree.flatten(params)
  placed = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  if len(placed) != len(leaves):
    raise ValueError(f"rollout_copy: {len(placed)} shardings for {len(leaves)} parameters")
  plans = tuple(_leaf_plan(p, x.shape, rules) for p, x in zip(placed, leaves))
  return jax.tree.unflatten(treedef, _cast_and_place(leaves, np.dtype(dtype), plans))


def device_hbm_bytes(mesh: Mesh) -> float | None:
  """HBM of one of this process's devices of the mesh, as its runtime reports it (None where it
  does not: CPU)."""
  local = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  stats = local.memory_stats()
  return None if not stats or "bytes_limit" not in stats else float(stats["bytes_limit"])


@dataclasses.dataclass(frozen=True, eq=False)
class RolloutWeights:
  """A run's rollout layout (resolved), the mesh its sampler runs on, the copy's shardings and
  dtype, and the sharding rules they follow."""

  layout: str
  mesh: Mesh
  shardings: Any
  dtype: Any
  rules: Any = sharding.DEFAULT_RULES

  @classmethod
  def build(cls, layout: str, model_config: ModelConfig, mesh: Mesh,
            hbm_bytes: float | None = None, rules=sharding.DEFAULT_RULES) -> "RolloutWeights":
    """The layout `layout` (`LAYOUTS`) resolves to for this model on the trainer's `mesh`."""
    layout = resolve_layout(layout, model_config, mesh, hbm_bytes, rules)
    sampler_mesh = rollout_mesh(mesh, layout, model_config=model_config, hbm_bytes=hbm_bytes)
    shardings = rollout_shardings(abstract_params(model_config), sampler_mesh, layout, rules)
    return cls(layout, sampler_mesh, shardings, model_config.compute_dtype, rules)

  def copy(self, params):
    """The weights the sampler decodes from: `params` themselves for `trainer`, else
    `rollout_copy`."""
    if self.layout == "trainer":
      return params
    return rollout_copy(params, self.shardings, self.dtype, self.rules)

  def bytes_per_chip(self, model_config: ModelConfig) -> int:
    """Bytes one chip holds of the copy (0 for `trainer`: no copy is made)."""
    if self.layout == "trainer":
      return 0
    return copy_bytes_per_chip(abstract_params(model_config), self.shardings, self.dtype)
