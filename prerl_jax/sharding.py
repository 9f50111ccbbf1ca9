"""Device mesh and logical-axis sharding rules: model code names logical axes, never mesh axes."""

import functools
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axes) pairs; the first rule naming a logical axis wins.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("length", None),
    ("cache_length", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over the first devices; one axis may be -1 to take the rest."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not "
                       f"divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) > len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; "
                     f"{len(devices)} are available")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices[:math.prod(sizes)])


def batch_devices(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """How many ways the batch axis is split on this mesh."""
  spec = batch_sharding(mesh, 1, rules).spec[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(mesh.shape[a] for a in axes)


def parse_mesh(spec: str) -> dict[str, int]:
  """Parses 'fsdp=8,tensor=1' into make_mesh keyword arguments."""
  sizes = {}
  for item in filter(None, spec.split(",")):
    name, _, value = item.partition("=")
    if name not in MESH_AXES or not value.lstrip("-").isdigit():
      raise ValueError(f"mesh spec {spec!r}: expected comma-separated axis=size with axes "
                       f"{MESH_AXES}, got {item!r}")
    sizes[name] = int(value)
  return sizes


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for an array with these logical axes.

  A mesh axis is dropped for a dimension it does not divide (for example 2 kv heads on a
  tensor axis of 4), and never used twice in one spec; such dimensions stay replicated.
  """
  rule_map = {}
  for logical, mesh_axes in rules:
    rule_map.setdefault(logical, mesh_axes)
  used = set()
  spec = []
  for name, size in zip(logical_axes, shape):
    if name is not None and name not in rule_map:
      raise KeyError(f"no sharding rule for logical axis {name!r}")
    wanted = rule_map.get(name)
    wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted or ())
    chosen = []
    for axis in wanted:
      if axis in used or mesh.shape[axis] == 1:
        continue
      if size % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]) == 0:
        chosen.append(axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return PartitionSpec(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for an nnx.State (or any pytree holding nnx Variables with logical_axes).

  Leaves that are not Variables with `logical_axes` (optimizer counters, scalars) are replicated.
  """
  def one(leaf):
    if _is_variable(leaf) and "logical_axes" in leaf.get_metadata():
      spec = logical_to_spec(leaf.get_metadata()["logical_axes"], leaf.get_value().shape, mesh, rules)
      return leaf.replace(NamedSharding(mesh, spec))
    if _is_variable(leaf):
      return leaf.replace(NamedSharding(mesh, PartitionSpec()))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, state, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding for an array whose first axis is the batch and the rest are replicated."""
  rule_map = dict(reversed(rules))
  axes = rule_map.get("batch")
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  axes = tuple(a for a in axes if mesh.shape[a] > 1)
  first = axes if len(axes) > 1 else (axes[0] if axes else None)
  return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))


def shard_batch(batch, mesh: Mesh, rules=DEFAULT_RULES):
  """Places a pytree of host arrays with the first axis over the batch mesh axes.

  Every process passes the same global arrays and each device receives only its rows, so this
  works unchanged on one host or many (`jax.make_array_from_callback`).
  """
  def place(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim, rules),
                                        lambda index: x[index])
  return jax.tree.map(place, batch)


def to_host(tree):
  """Numpy copies of a pytree of (possibly multi-host sharded) arrays, the same on every host."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _context_mesh():
  """The mesh in context, None without one or inside `shard_map` (manual axes)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or AxisType.Manual in mesh.axis_types else mesh


def constrain(x, logical_axes: Sequence[str | None], rules=DEFAULT_RULES):
  """`x` laid out by its logical axes on the mesh in context (`jax.set_mesh`).

  Unchanged without a mesh of several devices or inside `shard_map` (manual axes). Model code
  pins its activations so (rows over the batch axes), else XLA's partitioner may keep the
  weights' fsdp split and all-reduce activations instead of gathering weights. Programs given a
  mesh trace under it (`traced_on`), whatever the caller's context.
  """
  mesh = _context_mesh()
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh, rules))


def context_batch_shards(length: int, rules=DEFAULT_RULES) -> int:
  """Into how many parts the batch axes of the mesh in context split `length` (1 without one)."""
  mesh = _context_mesh()
  if mesh is None:
    return 1
  axes = logical_to_spec(("batch",), (length,), mesh, rules)[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def traced_on(mesh: Mesh | None, fn):
  """`fn`, traced with `mesh` as the mesh in context (for `constrain`); `fn` itself when None."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def on_mesh(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return on_mesh


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded arrays or ShapeDtypeStructs (its largest)."""
  totals = {}
  for leaf in jax.tree.leaves(tree):
    size = math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    for device in leaf.sharding.device_set:
      totals[device] = totals.get(device, 0) + size
  return max(totals.values(), default=0)
