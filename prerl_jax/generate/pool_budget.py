"""The continuous engine's page pool sized from the HBM a chip has left while sampling.

Per chip, while the sampler runs, HBM holds the train state (parameters, optimizer state,
reference), the rollout copy of the weights (`rollout_weights`), the page pool, and what the
running sampler program needs beyond its weights and pool: its temporaries, code and the outputs
it does not write in place of its arguments (the larger of the prefill and decode programs', from
the compiler's memory analysis). `rollout.kv_cache_gib=auto` gives the pool the rest:

    pool bytes = HBM - train state - rollout copy - sampler program - margin
    pages per batch shard = floor(pool bytes / one page's bytes on a chip)

(a page's bytes on a chip: all layers' keys and values of `page_size` positions, its kv heads
split over the tensor axis where that divides them). The margin, `MARGIN_BYTES` +
`MARGIN_SHARE` x HBM, covers what the compiler's figures leave out: the runtime's own buffers and
the small arrays that live between programs (row state, sampled tokens: well under the fixed
GiB), and the allocator's fragmentation, which grows with the heap, hence the share (1 + 4.8 GiB
on a v5p's 95.7, 1 + 4.0 on an H100's 79.1). Live rows stay `rollout.live_rows` (the decode
programs are compiled for them); the dry run reports how many rows the pool feeds at the cap.

Both users compute the same `Budget`: the dry run from the target's HBM and the state's exact
per-chip bytes, the engine (`sized_pool`, on its first `sample` call) from the device: HBM is
`memory_stats()["bytes_limit"]` and what is resident is the device's `bytes_in_use` (the train
state, the rollout copy and anything else the run keeps there: all of it counts), agreed over
processes. The programs' bytes come in both from compiling them for a pool of one sequence's
pages. On a device without a memory limit (CPU) `auto` is the engine's default pool, room for
every live row's longest sequence. An explicit `kv_cache_gib` wins, and fails when it exceeds
what the budget leaves, naming the key and the numbers.
"""

import copy
import dataclasses
import math

import jax
import numpy as np

from prerl_jax import sharding
from prerl_jax.errors import UserError
from prerl_jax.generate import page_pool

GIB = 2**30
MARGIN_BYTES = 1 * GIB
MARGIN_SHARE = 0.05


@dataclasses.dataclass(frozen=True)
class Budget:
  """Bytes per chip while sampling; `pool_bytes` is what is left for the page pool."""

  hbm_bytes: float
  state_bytes: float  # Resident: the train state (at run time: all in use but the weights).
  weights_bytes: float  # The weights the sampler decodes from, where they are not in state_bytes.
  program_bytes: float  # The sampler program's own: the larger of prefill's and decode's.

  @property
  def margin_bytes(self) -> float:
    return MARGIN_BYTES + MARGIN_SHARE * self.hbm_bytes

  @property
  def pool_bytes(self) -> float:
    return (self.hbm_bytes - self.state_bytes - self.weights_bytes - self.program_bytes
            - self.margin_bytes)

  def describe(self) -> str:
    """The arithmetic in GiB, e.g. "HBM 95.74 - resident state 5.61 - ... = 74.50 GiB per chip"."""
    parts = (("resident state", self.state_bytes), ("rollout weights", self.weights_bytes),
             ("sampler program", self.program_bytes), ("margin", self.margin_bytes))
    return (f"HBM {self.hbm_bytes / GIB:.2f} - "
            + " - ".join(f"{name} {value / GIB:.2f}" for name, value in parts)
            + f" = {self.pool_bytes / GIB:.2f} GiB per chip")

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "margin_bytes": self.margin_bytes,
            "pool_bytes": self.pool_bytes}


def page_bytes_per_chip(model_config, page_size: int, mesh=None,
                        rules=sharding.DEFAULT_RULES) -> int:
  """Bytes one chip holds of one page of every batch shard's pool part."""
  shape = page_pool.pool_shape(model_config, 1, page_size, page_pool.shards(mesh, rules))
  if mesh is not None:
    shape = page_pool.pool_sharding(shape, mesh, rules).shard_shape(shape)
  return math.prod(shape) * np.dtype(model_config.compute_dtype).itemsize


def pool_pages(budget: Budget, model_config, page_size: int, mesh=None,
               rules=sharding.DEFAULT_RULES) -> int:
  """Pages per batch shard (its scratch page included) of the pool `budget` leaves room for;
  fewer than 2 is an error naming the numbers."""
  page = page_bytes_per_chip(model_config, page_size, mesh, rules)
  pages = int(max(budget.pool_bytes, 0) // page)
  if pages < 2:
    raise UserError(f"rollout.kv_cache_gib=auto: no room for a page pool ({budget.describe()}; "
                    f"a page takes {page} bytes per chip, at least 2 are needed): decode from "
                    "weights split over a tensor axis (rollout.weights=tensor), or use more "
                    "chips")
  return pages


def check_fits(kv_cache_gib: float, budget: Budget, model_config, page_size: int, mesh=None,
               rules=sharding.DEFAULT_RULES) -> int:
  """Pages per batch shard of an explicit `rollout.kv_cache_gib`; a pool larger than `budget`
  leaves is an error naming the key and the numbers."""
  pages = page_pool.pages_for_memory(model_config, kv_cache_gib, page_size)
  pool_bytes = pages * page_bytes_per_chip(model_config, page_size, mesh, rules)
  if pool_bytes > budget.pool_bytes:
    raise UserError(f"rollout.kv_cache_gib={kv_cache_gib}: its pool takes "
                    f"{pool_bytes / GIB:.2f} GiB per chip, more than the {budget.describe()} "
                    "left for it; lower it, or set it to auto")
  return pages


def program_bytes(memory) -> int:
  """What a compiled program needs beyond its arguments, from its `memory_analysis()`:
  temporaries, code, and the outputs not written in place of (donated) arguments."""
  return (memory.temp_size_in_bytes + memory.generated_code_size_in_bytes
          + memory.output_size_in_bytes - memory.alias_size_in_bytes)


def probe_pages(sampler, prompt_width: int, max_new_tokens: int) -> int:
  """The pool the programs' bytes are measured with: one sequence's pages and the scratch page
  (the programs update the donated pool in place, so their own bytes do not grow with it)."""
  from prerl_jax.generate import continuous  # pylint: disable=import-outside-toplevel
  return continuous.pages_per_sequence(sampler.pool, prompt_width, max_new_tokens) + 1


def sampler_program_bytes(sampler, state, key, config, prompt_width: int,
                          compile_options=None) -> int:
  """The larger of the prefill and decode programs' `program_bytes` of a ContinuousSampler,
  compiled (not run) with a pool of `probe_pages`; state and key may be abstract."""
  probe = copy.copy(sampler)  # The programs do not depend on the pool's size; `trace` reads it.
  probe.pool = dataclasses.replace(
      sampler.pool, pages=probe_pages(sampler, prompt_width, config.max_new_tokens))
  traced = probe.trace(state, key, config, prompt_width)
  return max(program_bytes(program.lower().compile(compile_options).memory_analysis())
             for program in traced.values())


def _devices(mesh) -> list:
  return list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]


def device_hbm_and_in_use(mesh) -> tuple[float, float] | None:
  """(HBM, bytes in use) of the busiest of the mesh's devices on this process, the same on
  every process (the largest); None where the runtime reports no memory limit (CPU)."""
  local = [d for d in _devices(mesh) if d.process_index == jax.process_index()]
  stats = [d.memory_stats() or {} for d in local]
  if not stats or any("bytes_limit" not in s for s in stats):
    return None
  limit = min(s["bytes_limit"] for s in stats)
  in_use = max(s.get("bytes_in_use", 0) for s in stats)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    agreed = multihost_utils.process_allgather(np.asarray([-limit, in_use], np.int64))
    limit, in_use = -int(agreed[:, 0].max()), int(agreed[:, 1].max())
  return float(limit), float(in_use)


def sized_pool(sampler, state, key, config, prompt_width: int):
  """The sampler's PoolConfig with its pages fixed from the device's HBM (module docstring), for
  `kv_cache_gib` auto or explicit (checked); unchanged where pages are given or on a device with
  no memory limit (auto: the default pool there). `state`: the weights `sample` decodes from."""
  pool = sampler.pool
  if pool.pages is not None or not pool.kv_cache_gib:
    return pool
  memory = device_hbm_and_in_use(sampler.mesh)
  if memory is None:
    return dataclasses.replace(pool, kv_cache_gib=None) if pool.kv_cache_gib == "auto" else pool
  hbm, in_use = memory
  weights = float(sharding.per_device_bytes(state))
  budget = Budget(hbm, in_use - weights, weights,
                  sampler_program_bytes(sampler, state, key, config, prompt_width))
  args = (budget, sampler.model_config, pool.page_size, sampler.mesh, sampler.rules)
  if pool.kv_cache_gib == "auto":
    return dataclasses.replace(pool, pages=pool_pages(*args))
  return dataclasses.replace(pool, pages=check_fits(pool.kv_cache_gib, *args))
