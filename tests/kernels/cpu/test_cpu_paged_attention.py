"""The CPU paged decode-attention kernel: the same attention and pool write as rotating, then
page_pool.write_tokens and gather_attention; only the live rows' new slots change; pages no live
row reads never matter; bad tables and dtypes are refused."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_marks import needs_cpu_kernels

from prerl_jax.generate import page_pool
from prerl_jax.generate.paged_attention import gather_attention
from prerl_jax.kernels.cpu import library as cpu_kernels
from prerl_jax.kernels.cpu import paged_attention as cpu_paged_attention
from prerl_jax.models import rope

LAYERS, PAGES, PAGE_SIZE = 3, 16, 4
# Rows 0-2 are the samples of one prompt (pages 1 and 2 shared, then a page of their own); row 0
# writes inside a page, row 1 its page's last slot, row 2 the first slot of a new page; row 3
# decodes its first position; row 4 writes the first slot of its third page; row 5 is not live,
# and its table and position point into row 0's pages (it must write nothing there).
TABLES = np.array([[1, 2, 3, 0], [1, 2, 4, 0], [1, 2, 5, 9], [6, 0, 0, 0], [7, 8, 10, 0],
                   [1, 2, 3, 0]], np.int32)
POSITIONS = np.array([9, 11, 12, 0, 8, 9], np.int32)
LIVE = np.array([True, True, True, True, True, False])


def _case(kv, groups, head_dim, seed=0):
  """(q, new keys, new values, rotation, pool) with random pages (the scratch page included)."""
  rng = np.random.default_rng(seed)
  rows = len(POSITIONS)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))
  pool = normal(LAYERS, PAGES, PAGE_SIZE, 2 * kv, head_dim)
  inverse_frequencies = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
  rotation = rope.rotation(jnp.asarray(POSITIONS)[:, None],
                           inverse_frequencies.astype(np.float32))
  return (normal(rows, 1, kv * groups, head_dim) * 3, normal(rows, 1, kv, head_dim),
          normal(rows, 1, kv, head_dim), rotation, pool)


@jax.jit
def _reference(q, k, v, rotation, pool, layer):
  """Rotation, `page_pool.write_tokens` and `gather_attention` on one layer of the pool."""
  q, k = rope.apply_rotation(q, rotation), rope.apply_rotation(k, rotation)
  positions_Nx1 = jnp.asarray(POSITIONS)[:, None]
  pages = page_pool.write_tokens(pool[layer], page_pool.combine_kv(k, v), jnp.asarray(TABLES),
                                 positions_Nx1, jnp.asarray(LIVE)[:, None])
  out = gather_attention(q, pages, jnp.asarray(TABLES), positions_Nx1[:, 0] + 1, positions_Nx1)
  return out, pool.at[layer].set(pages)


def _kernel(q, k, v, rotation, pool, layer, suffix=""):
  kernel = functools.partial(cpu_paged_attention.write_and_attend, suffix=suffix)
  return jax.jit(kernel, static_argnums=5)(q, k, v, rotation, pool, layer, TABLES, POSITIONS,
                                          LIVE)


@needs_cpu_kernels
@pytest.mark.parametrize("kv,groups,head_dim", [(2, 3, 16), (1, 4, 8), (3, 1, 64), (2, 5, 36)])
def test_kernel_matches_write_tokens_and_gather_attention(kv, groups, head_dim):
  q, k, v, rotation, pool = _case(kv, groups, head_dim, seed=kv * 10 + groups)
  got, got_pool = _kernel(q, k, v, rotation, pool, 1)
  expected, expected_pool = _reference(q, k, v, rotation, pool, 1)
  got, expected = np.asarray(got), np.asarray(expected)
  assert np.abs(expected[LIVE]).max() > 0.5
  np.testing.assert_allclose(got[LIVE], expected[LIVE], atol=1e-5, rtol=1e-5)
  assert not got[~LIVE].any()  # A row that is not live attends to nothing.
  # The pool: the live rows' new slots written (their keys rotated, to an ulp where FMA fuses the
  # rotation's products), nothing else changed; the reference also scribbled on the scratch page.
  got_pool, expected_pool, before = (np.asarray(x)[:, 1:] for x in (got_pool, expected_pool,
                                                                     pool))
  np.testing.assert_allclose(got_pool, expected_pool, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got_pool[..., 1::2, :], expected_pool[..., 1::2, :])
  changed = np.argwhere((got_pool != before).any(axis=(3, 4)))
  written = {(1, TABLES[n, p // PAGE_SIZE] - 1, p % PAGE_SIZE) for n, p in enumerate(POSITIONS)
             if LIVE[n]}
  assert {tuple(x) for x in changed} == written


@needs_cpu_kernels
def test_portable_build_matches_reference(portable_library):
  """Built without -march=native (4-lane vectors, so other lane sums), the kernel computes the
  same attention, with a head size that leaves scalar columns after the vectors."""
  cpu_kernels.register(portable_library, "_paged_portable")
  for kv, groups, head_dim in ((2, 3, 16), (1, 2, 10)):
    q, k, v, rotation, pool = _case(kv, groups, head_dim, seed=head_dim)
    got, _ = _kernel(q, k, v, rotation, pool, 0, suffix="_paged_portable")
    expected, _ = _reference(q, k, v, rotation, pool, 0)
    np.testing.assert_allclose(np.asarray(got)[LIVE], np.asarray(expected)[LIVE], atol=1e-5,
                               rtol=1e-5)


@needs_cpu_kernels
def test_pages_no_live_row_reads_do_not_matter():
  """Pages outside the live rows' tables, the live rows' slots past their position and the whole
  scratch page hold NaN or 1e30: the attention is the clean pool's."""
  q, k, v, rotation, pool = _case(2, 3, 16, seed=3)
  clean, _ = _kernel(q, k, v, rotation, pool, 2)
  read = np.zeros((PAGES, PAGE_SIZE), bool)
  for n in np.flatnonzero(LIVE):
    for position in range(POSITIONS[n] + 1):
      read[TABLES[n, position // PAGE_SIZE], position % PAGE_SIZE] = True
  assert read[1:].sum() < read[1:].size // 2 and not read[0].any()
  poison = np.where(np.arange(PAGES)[:, None] % 2 == 0, np.nan, 1e30)[:, :, None, None]
  poisoned = jnp.where(read[:, :, None, None], pool, poison.astype(np.float32))
  got, got_pool = _kernel(q, k, v, rotation, poisoned, 2)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(clean))
  assert np.isfinite(np.asarray(got)).all()
  untouched = np.asarray(got_pool)[:, ~read]
  np.testing.assert_array_equal(untouched, np.asarray(poisoned)[:, ~read])


@needs_cpu_kernels
def test_kernel_refuses_bad_tables_and_dtypes():
  q, k, v, rotation, pool = _case(2, 3, 16)
  call = lambda tables, positions, pool=pool: jax.block_until_ready(
      cpu_paged_attention.write_and_attend(q, k, v, rotation, pool, 0, tables, positions, LIVE))
  tables = TABLES.copy()
  tables[1, 2] = PAGES
  with pytest.raises(Exception, match="row 1: page table entry 2 is page 16, outside the pool's "
                                      "16 pages"):
    call(tables, POSITIONS)
  positions = POSITIONS.copy()
  positions[3] = 16
  with pytest.raises(Exception, match="row 3: position 16 is outside its page table's 16 slots"):
    call(TABLES, positions)
  tables[1, 2] = -1
  tables[5] = -1  # Not live: never read, so not checked.
  with pytest.raises(Exception, match="row 1: page table entry 2 is page -1"):
    call(tables, POSITIONS)
  with pytest.raises(TypeError, match="float32.*kernels='xla'"):
    call(TABLES, POSITIONS, pool.astype(jnp.bfloat16))
