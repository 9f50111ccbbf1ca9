"""The TPU paged attention: its arguments give jax's reference of the ragged kernel the XLA
gather's results, and the kernel compiles for a v5p topology with libtpu (on this CPU host)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as ragged
from jax.sharding import NamedSharding, PartitionSpec

from prerl_jax import sharding
from prerl_jax.generate import page_pool
from prerl_jax.generate.paged_attention import gather_attention
from prerl_jax.generate.paged_forward import write_and_attend_on_shards
from prerl_jax.kernels.tpu import paged_attention as tpu_attention
from paged_cases import random_paged_case


@pytest.mark.parametrize("rows,length,kv_lens", [(3, 1, (5, 17, 9)), (1, 6, (11,))])
def test_kernel_reference_matches_gather_attention(rows, length, kv_lens):
  """One new token per row (decode), and one row of 6 tokens (a prefill chunk)."""
  q, kv_pages, table, kv_lens, positions, _, _ = random_paged_case(rows, length, kv_lens)
  kv_pages = np.nan_to_num(kv_pages)  # The reference reads whole pages.
  queries, cu_q_lens, num_seqs = tpu_attention._ragged_arguments(q, kv_lens, positions)
  expected = ragged.ref_ragged_paged_attention(queries, kv_pages, kv_lens, table, cu_q_lens,
                                               num_seqs, sm_scale=q.shape[-1]**-0.5)
  got = gather_attention(q, kv_pages, table, kv_lens, positions)
  np.testing.assert_allclose(got.reshape(expected.shape), expected, atol=1e-5)


def test_kernel_rejects_several_rows_of_several_tokens():
  q, _, _, kv_lens, positions, _, _ = random_paged_case(rows=2, length=3, kv_lens=(5, 7))
  with pytest.raises(ValueError, match="one token per row or one row of tokens, got 2 rows"):
    tpu_attention._ragged_arguments(q, kv_lens, positions)


def _v5p_mesh():
  """A (data, fsdp, tensor) = (1, 2, 2) mesh of a v5p 2x2x1 slice, described by libtpu."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install jax[tpu])")
  # Compiling needs no TPU; other processes (test workers) may hold libtpu's lockfile meanwhile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  topology = topologies.get_topology_desc(
      platform="tpu", topology_name="v5p:2x2x1", chip_config_name="megacore",
      chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False))
  return sharding.make_mesh(data=1, fsdp=2, tensor=2, devices=topology.devices)


def test_kernel_compiles_for_v5p_under_shard_map():
  """Qwen3-4B's attention shape (32 query heads, 8 kv heads of 128) in bfloat16: a layer's write
  and attention for 16 decode rows over 64-slot tables of 16-slot pages, in `paged_forward`'s
  shard_map: rows and pages split over fsdp, heads over tensor."""
  mesh = _v5p_mesh()
  layers, rows, pages, page_size, per_row = 2, 16, 256, 16, 64
  pool = page_pool.pool_sharding((layers, pages, page_size, 16, 128), mesh)
  assert pool.spec[1] == "fsdp" and pool.spec[3] == "tensor"
  tokens = NamedSharding(mesh, PartitionSpec("fsdp", None, "tensor", None))
  per_row_sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
  row = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype,
                                                             sharding=per_row_sharding)
  args = (jax.ShapeDtypeStruct((layers, pages, page_size, 16, 128), jnp.bfloat16, sharding=pool),
          jax.ShapeDtypeStruct((rows, 1, 32, 128), jnp.bfloat16, sharding=tokens),
          *(jax.ShapeDtypeStruct((rows, 1, 8, 128), jnp.bfloat16, sharding=tokens),) * 2,
          row(rows, per_row), row(rows, 1), row(rows, 1, dtype=jnp.bool_), row(rows),
          jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())))
  step = write_and_attend_on_shards(tpu_attention.ragged_attention, mesh)
  compiled = jax.jit(step, donate_argnums=(0,)).lower(*args).compile()
  assert "ragged_paged_attention_kernel" in compiled.as_text()
  # Each chip holds a quarter of the pool (half the pages, 4 of the 16 combined kv heads) and
  # writes it in place.
  quarter = layers * pages * page_size * 16 * 128 * 2 / 4
  stats = compiled.memory_analysis()
  assert quarter <= stats.argument_size_in_bytes < quarter * 1.1
  assert stats.temp_size_in_bytes < quarter / 4
