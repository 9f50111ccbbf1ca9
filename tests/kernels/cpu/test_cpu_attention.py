"""The CPU decode-attention kernel: same results as decode.write_and_attend, how the sampler
picks the CPU kernels, and what happens when they cannot be built."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_marks import needs_cpu_kernels

from prerl_jax.kernels.cpu import attention as cpu_attention
from prerl_jax.kernels.cpu import library as cpu_kernels
from prerl_jax.kernels.cpu import matmul as cpu_matmul
from prerl_jax.kernels.cpu import norm as cpu_norm
from prerl_jax.generate import decode
from prerl_jax.models import rope
from prerl_jax import sharding
from prerl_jax.models.decoder import dense, gated_dense, rms_norm
from prerl_jax.generate.sampler import resolve_kernels



def _block(rng, rows, kv, head_dim, slots, mask):
  keys = rng.normal(size=(rows, kv, head_dim, slots)).astype(np.float32)
  values = rng.normal(size=(rows, kv, slots, head_dim)).astype(np.float32)
  return jnp.asarray(keys), jnp.asarray(values), jnp.asarray(mask)


def _new_token(rng, rows, kv, head_dim):
  """Keys and values [N, 1, K, H] of a new token, and its rotation at positions up to 4000."""
  keys = rng.normal(size=(rows, 1, kv, head_dim)).astype(np.float32)
  values = rng.normal(size=(rows, 1, kv, head_dim)).astype(np.float32)
  inverse_frequencies = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
  rotation = rope.rotation(jnp.asarray(rng.integers(0, 4000, (rows, 1))),
                           inverse_frequencies.astype(np.float32))
  return jnp.asarray(keys), jnp.asarray(values), rotation


def _assert_matches_xla(q, new_token, offset, blocks, kernel=cpu_attention.write_and_attend,
                        atol=2e-6):
  """The kernel's attention equals XLA's within float32 rounding, and so does its updated last
  block (its values exactly; its rotated keys to an ulp, as a build with FMA instructions may fuse
  the rotation's products); returns the kernel's attention."""
  expected, expected_blocks = jax.jit(decode.write_and_attend)(q, *new_token, offset, blocks)
  got, got_blocks = jax.jit(kernel)(q, *new_token, offset, blocks)
  assert got.shape == expected.shape == q.shape
  assert float(jnp.abs(expected).max()) > 0.5
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=atol, rtol=1e-5)
  (got_k, got_v, got_mask), (expected_k, expected_v, _) = got_blocks[-1], expected_blocks[-1]
  np.testing.assert_allclose(np.asarray(got_k), np.asarray(expected_k), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got_v), np.asarray(expected_v))
  np.testing.assert_array_equal(np.asarray(got_mask), np.asarray(blocks[-1][2]))
  assert not np.array_equal(np.asarray(got_blocks[-1][0]), np.asarray(blocks[-1][0]))
  return got


@needs_cpu_kernels
@pytest.mark.parametrize("kv,groups,head_dim", [(2, 3, 16), (1, 4, 8), (3, 1, 64), (2, 5, 16)])
def test_kernel_matches_xla_block_attention(kv, groups, head_dim):
  rng = np.random.default_rng(kv * 10 + groups)
  rows, prompts = 12, 3
  q = jnp.asarray(rng.normal(size=(rows, 1, kv * groups, head_dim)).astype(np.float32)) * 3
  new_token = _new_token(rng, rows, kv, head_dim)
  prompt_mask = rng.random((prompts, 9)) < 0.6
  prompt_mask[0] = False  # A prompt with no valid slot in this block.
  blocks = [_block(rng, prompts, kv, head_dim, 9, prompt_mask),  # Shared by 4 rows each.
            _block(rng, rows, kv, head_dim, 5, np.ones(5, bool)),
            _block(rng, rows, kv, head_dim, 7, np.arange(7) <= 2)]  # Partly filled last block.
  got = _assert_matches_xla(q, new_token, 2, blocks)
  # Masked slots do not count: changing their keys and values changes nothing.
  last_k, last_v, last_mask = blocks[2]
  blocks[2] = (last_k.at[..., 3:].set(100.0), last_v.at[:, :, 3:].set(-100.0), last_mask)
  changed, _ = jax.jit(cpu_attention.write_and_attend)(q, *new_token, 2, blocks)
  np.testing.assert_allclose(np.asarray(changed), np.asarray(got), atol=1e-6)


@needs_cpu_kernels
@pytest.mark.parametrize("head_dim,groups,q_scale,atol", [(64, 3, 1.0, 2e-6), (128, 4, 1.0, 2e-6),
                                                          (32, 7, 1.0, 2e-6), (64, 3, 40.0, 1e-5)])
def test_kernel_matches_xla_on_wide_blocks(head_dim, groups, q_scale, atol):
  """Blocks wide enough for the kernel's vector tiles (tiles of 3 or 4 query rows, as the 7 query
  heads of a kv head are split; full-width tiles with an overlapping last one, and below a tile's
  width a narrower tile and an overlapping last vector);
  q_scale=40 spreads scores over hundreds, so exp meets arguments below -87 (and a score's
  float32 rounding, about 3e-5 at that size, moves the softmax by more than at q_scale=1)."""
  rng = np.random.default_rng(head_dim + groups)
  rows, prompts, kv = 8, 2, 2
  q = jnp.asarray(rng.normal(size=(rows, 1, kv * groups, head_dim)).astype(np.float32)) * q_scale
  new_token = _new_token(rng, rows, kv, head_dim)
  prompt_mask = np.arange(70)[None, :] >= np.array([[5], [37]])  # Left-padded prompts.
  last_mask = np.arange(30) <= 20  # 21 filled slots: narrower than one tile.
  last_mask[4] = False  # A masked slot inside the filled part.
  blocks = [_block(rng, prompts, kv, head_dim, 70, prompt_mask),
            _block(rng, rows, kv, head_dim, 64, np.ones(64, bool)),
            _block(rng, rows, kv, head_dim, 30, last_mask)]
  got = _assert_matches_xla(q, new_token, 20, blocks, atol=atol)
  # Masked slots contribute exactly nothing, even where their scores overflow to inf.
  last_k, last_v, last_mask = blocks[2]
  hole = ~np.asarray(last_mask)
  blocks[2] = (jnp.where(hole, 1e38, last_k), jnp.where(hole[:, None], 1e30, last_v), last_mask)
  changed, _ = jax.jit(cpu_attention.write_and_attend)(q, *new_token, 20, blocks)
  np.testing.assert_array_equal(np.asarray(changed), np.asarray(got))


@needs_cpu_kernels
def test_portable_build_matches_xla(portable_library):
  """The kernels built without -march=native (the fallback build: 4-lane SSE / NEON vectors where
  the native one has 8-lane AVX) compute the same attention, products and norms."""
  cpu_kernels.register(portable_library, "_portable")
  portable = functools.partial(cpu_attention.write_and_attend, suffix="_portable")
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.normal(size=(6, 1, 4, 32)).astype(np.float32)) * 4
  new_token = _new_token(rng, 6, 2, 32)
  blocks = [_block(rng, 3, 2, 32, 21, np.arange(21)[None, :] >= np.array([[0], [3], [20]])),
            _block(rng, 6, 2, 32, 13, np.arange(13) <= 6)]
  _assert_matches_xla(q, new_token, 6, blocks, kernel=portable)
  x = jnp.asarray(rng.normal(size=(1, 5, 30)).astype(np.float32))
  w, up = (jnp.asarray(rng.normal(size=(30, 40)).astype(np.float32)) for _ in range(2))
  residual = jnp.asarray(rng.normal(size=(1, 5, 40)).astype(np.float32))
  packed, packed_up = cpu_matmul.pack(w), cpu_matmul.pack(up)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
  close(cpu_matmul.matmul(x, packed, suffix="_portable"), dense(x, w))
  close(cpu_matmul.matmul(x, packed, residual, suffix="_portable"), dense(x, w, residual))
  close(cpu_matmul.gated_matmul(x, packed, packed_up, suffix="_portable"), gated_dense(x, w, up))
  close(cpu_norm.rms_norm(x, x[0, 0], 1e-5, suffix="_portable"), rms_norm(x, x[0, 0], 1e-5))


@needs_cpu_kernels
def test_kernel_rejects_non_float32_caches():
  rng = np.random.default_rng(0)
  q = jnp.zeros((2, 1, 2, 8), jnp.bfloat16)
  new_token = _new_token(rng, 2, 1, 8)
  blocks = [_block(rng, 2, 1, 8, 4, np.ones(4, bool))]
  with pytest.raises(TypeError, match="float32.*kernels='xla'"):
    cpu_attention.write_and_attend(q, *new_token, 0, blocks)


@needs_cpu_kernels
def test_kernel_requires_the_last_block_aliased():
  """Called without aliasing its results to the last block, the kernel refuses (it writes the new
  token into that block in place)."""
  rng = np.random.default_rng(1)
  keys, values, mask = _block(rng, 2, 1, 8, 4, np.ones(4, bool))
  call = jax.ffi.ffi_call(cpu_attention.TARGET, (jax.ShapeDtypeStruct((2, 1, 2, 8), jnp.float32),
                                                 jax.ShapeDtypeStruct(keys.shape, jnp.float32),
                                                 jax.ShapeDtypeStruct(values.shape, jnp.float32)))
  with pytest.raises(Exception, match="must alias the last block"):
    jax.block_until_ready(call(jnp.ones((2, 1, 2, 8)), jnp.ones((2, 1, 8)), jnp.ones((2, 1, 8)),
                               jnp.ones((2, 4)), jnp.zeros((2, 4)), jnp.int32(0), keys, values,
                               mask, scale=np.float32(1.0)))


def test_resolve_kernel_choices():
  assert resolve_kernels("xla", jnp.float32, None) == "xla"
  assert resolve_kernels("auto", jnp.bfloat16, None) == "xla"
  mesh = sharding.make_mesh(2, 2, 2)
  assert resolve_kernels("auto", jnp.float32, mesh) == "xla"
  with pytest.raises(ValueError, match="kernels='flash'.*expected one of"):
    resolve_kernels("flash", jnp.float32, None)
  with pytest.raises(ValueError, match="one CPU device and float32.*8 cpu device"):
    resolve_kernels("cpu", jnp.float32, mesh)
  if cpu_kernels.unavailable_reason() is None:
    assert resolve_kernels("auto", jnp.float32, None) == "cpu"


def test_failed_build_names_source_and_compiler(tmp_path, monkeypatch):
  compiler = tmp_path / "broken-c++"
  compiler.write_text("#!/bin/sh\necho 'fake compiler 1.0'\n"
                      "case \"$*\" in *--version*) exit 0;; esac\n"
                      "echo 'no such flag' >&2\nexit 1\n")
  compiler.chmod(0o755)
  monkeypatch.setenv("PRERL_JAX_CACHE", str(tmp_path / "cache"))
  with pytest.raises(RuntimeError,
                     match="decode_attention_cpu.cc, .*packed_matmul_cpu.cc, .*rms_norm_cpu.cc "
                           "with .*broken-c"):
    cpu_kernels.build(str(compiler))
  assert not list((tmp_path / "cache" / "kernels").glob("*.so"))


@needs_cpu_kernels
def test_build_is_cached(tmp_path, monkeypatch):
  monkeypatch.setenv("PRERL_JAX_CACHE", str(tmp_path))
  compiler = cpu_kernels.compiler()
  path = cpu_kernels.build(compiler)
  assert path.startswith(str(tmp_path / "kernels")) and path.endswith(".so")
  built_at = os.stat(path).st_mtime_ns
  assert cpu_kernels.build(compiler) == path
  assert os.stat(path).st_mtime_ns == built_at  # Not rebuilt.
  assert [p.name for p in (tmp_path / "kernels").iterdir()] == [os.path.basename(path)]
