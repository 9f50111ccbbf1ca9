"""A page-pool KV cache: fixed-size pages of keys and values shared by all live sequences.

The pool is one array `kv_pages` [layers, pages, page_size, 2 * kv_heads, head_dim] in the
compute dtype; keys and values of a kv head sit side by side (combined head 2h is head h's keys,
2h + 1 its values), the layout of the TPU ragged paged attention kernel. A sequence owns a page
table (the pool pages holding its positions 0, page_size, 2 * page_size, ...); pages of a
prompt are written once and listed in the tables of all of its samples.

Page 0 is the scratch page: rows that are not decoding write there and unused page-table
entries point there, so it is never handed to a sequence (`PageAllocator`).

Under a mesh the pages are split over the batch axes: a pool for S batch shards holds S parts of
equal size, each with its own scratch page (its first), used by that shard's rows only, whose
page tables hold indices into their part (one `PageAllocator` per shard). The kv heads are split
over the tensor axis where it divides them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prerl_jax import sharding
from prerl_jax.models.config import ModelConfig

SCRATCH_PAGE = 0
POOL_AXES = ("layers", "batch", None, "kv_heads", "head_dim")


def pool_shape(config: ModelConfig, pages: int, page_size: int, shards: int = 1) -> tuple[int, ...]:
  """Shape of a pool of `pages` pages per batch shard (its scratch page included)."""
  return (config.num_layers, shards * pages, page_size, 2 * config.num_kv_heads, config.head_dim)


def page_bytes(config: ModelConfig, page_size: int) -> int:
  """Bytes of one page over all layers, in the compute dtype."""
  return math.prod(pool_shape(config, 1, page_size)) * jnp.dtype(config.compute_dtype).itemsize


def pages_for_memory(config: ModelConfig, gib: float, page_size: int) -> int:
  """How many pages (the scratch page included) fit in `gib` GiB."""
  pages = int(gib * 2**30 // page_bytes(config, page_size))
  if pages < 2:
    raise ValueError(f"rollout.kv_cache_gib={gib} holds {pages} pages of {page_size} slots for "
                     f"this model ({page_bytes(config, page_size)} bytes each); at least 2 needed")
  return pages


def pool_sharding(shape, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> NamedSharding:
  """The pool's sharding: pages over the batch axes, kv heads over the tensor axis where it
  divides them (module docstring)."""
  spec = sharding.logical_to_spec(POOL_AXES, shape[:3] + (shape[3] // 2,) + shape[4:], mesh,
                                  rules)
  return NamedSharding(mesh, spec)


def shards(mesh: Mesh | None, rules=sharding.DEFAULT_RULES) -> int:
  """How many parts a pool (and the rows reading it) is split into on this mesh."""
  return 1 if mesh is None else sharding.batch_devices(mesh, rules)


def empty_pool(config: ModelConfig, pages: int, page_size: int, mesh: Mesh | None = None,
               rules=sharding.DEFAULT_RULES) -> jax.Array:
  """A zero-filled pool of `pages` pages per batch shard (on the mesh where given)."""
  shape = pool_shape(config, pages, page_size, shards(mesh, rules))
  if mesh is None:
    return jnp.zeros(shape, config.compute_dtype)
  return jax.jit(lambda: jnp.zeros(shape, config.compute_dtype),
                 out_shardings=pool_sharding(shape, mesh, rules))()


def combine_kv(k_NxTxKxH, v_NxTxKxH) -> jax.Array:
  """Keys and values [N, T, 2K, H] interleaved per head (the pool's layout)."""
  rows, length, heads, dim = k_NxTxKxH.shape
  return jnp.stack([k_NxTxKxH, v_NxTxKxH], axis=3).reshape(rows, length, 2 * heads, dim)


def write_tokens(kv_pages, kv_NxTx2KxH, page_table_NxP, positions_NxT, valid_NxT):
  """The pages [pages, page_size, 2K, H] with the tokens' combined keys and values written at
  their positions (invalid tokens go to the scratch page)."""
  page_size = kv_pages.shape[1]
  column_NxT = jnp.minimum(positions_NxT // page_size, page_table_NxP.shape[1] - 1)
  page_NxT = jnp.where(valid_NxT, jnp.take_along_axis(page_table_NxP, column_NxT, axis=1),
                       SCRATCH_PAGE)
  slot_NxT = jnp.where(valid_NxT, positions_NxT % page_size, 0)
  return kv_pages.at[page_NxT, slot_NxT].set(kv_NxTx2KxH.astype(kv_pages.dtype))


def _copy_local(kv_pages, sources_1xM, destinations_1xM):
  return kv_pages.at[:, destinations_1xM[0]].set(kv_pages[:, sources_1xM[0]])


def copy_pages(kv_pages, sources_SxM, destinations_SxM, mesh: Mesh | None = None,
               rules=sharding.DEFAULT_RULES):
  """The pool with pages `destinations_SxM[s]` of shard s (every layer) replaced by copies of its
  pages `sources_SxM[s]` (local indices; pad with the scratch page, copied onto itself)."""
  if mesh is None:
    return _copy_local(kv_pages, sources_SxM, destinations_SxM)
  pool = pool_sharding(kv_pages.shape, mesh, rules).spec
  per_shard = PartitionSpec(pool[1], None)
  return jax.shard_map(_copy_local, mesh=mesh, in_specs=(pool, per_shard, per_shard),
                       out_specs=pool)(kv_pages, sources_SxM, destinations_SxM)


class PageAllocator:
  """Host bookkeeping of free pages and of how many sequences hold each page.

  A page is free again when the last sequence holding it releases it. Every decision depends
  only on the calls made, so every host of a multi-host run makes the same ones.
  """

  def __init__(self, pages: int):
    if pages < 2:
      raise ValueError(f"a page pool needs at least 2 pages (one is scratch), got {pages}")
    self.pages = pages
    self._free = list(range(pages - 1, SCRATCH_PAGE, -1))  # Pops the lowest page first.
    self._holders = np.zeros(pages, np.int32)

  @property
  def free_pages(self) -> int:
    return len(self._free)

  def allocate(self, count: int) -> list[int]:
    """`count` free pages, each now held once; raises if fewer are free."""
    if count > len(self._free):
      raise MemoryError(f"{count} pages asked, {len(self._free)} free")
    pages = [self._free.pop() for _ in range(count)]
    self._holders[pages] = 1
    return pages

  def share(self, pages) -> None:
    """One more holder for each of these (held) pages."""
    np.add.at(self._holders, list(pages), 1)

  def release(self, pages) -> list[int]:
    """Drops one holder of each page; returns the pages that became free."""
    freed = []
    for page in pages:
      if self._holders[page] <= 0:
        raise RuntimeError(f"page {page} released but not held")
      self._holders[page] -= 1
      if self._holders[page] == 0:
        freed.append(page)
    self._free.extend(sorted(freed, reverse=True))
    self._free.sort(reverse=True)
    return freed
