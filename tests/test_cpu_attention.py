"""The CPU decode-attention kernel: same result as decode.block_attention, how the sampler picks
it, and what happens when it cannot be built."""

import functools
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prerl_jax import cpu_attention, decode, sharding
from prerl_jax.sampler import _resolve_attention

needs_kernel = pytest.mark.skipif(cpu_attention.unavailable_reason() is not None,
                                  reason="no working C++ compiler")


def _block(rng, rows, kv, head_dim, slots, mask):
  keys = rng.normal(size=(rows, kv, head_dim, slots)).astype(np.float32)
  values = rng.normal(size=(rows, kv, slots, head_dim)).astype(np.float32)
  return jnp.asarray(keys), jnp.asarray(values), jnp.asarray(mask)


@needs_kernel
@pytest.mark.parametrize("kv,groups,head_dim", [(2, 3, 16), (1, 4, 8), (3, 1, 64)])
def test_kernel_matches_xla_block_attention(kv, groups, head_dim):
  rng = np.random.default_rng(kv * 10 + groups)
  rows, prompts = 12, 3
  q = jnp.asarray(rng.normal(size=(rows, 1, kv * groups, head_dim)).astype(np.float32)) * 3
  prompt_mask = rng.random((prompts, 9)) < 0.6
  prompt_mask[0] = False  # A prompt with no valid slot in this block.
  blocks = [_block(rng, prompts, kv, head_dim, 9, prompt_mask),  # Shared by 4 rows each.
            _block(rng, rows, kv, head_dim, 5, np.ones(5, bool)),
            _block(rng, rows, kv, head_dim, 7, np.arange(7) <= 2)]  # Partly filled last block.
  expected = jax.jit(decode.block_attention)(q, blocks)
  got = jax.jit(cpu_attention.block_attention)(q, blocks)
  assert got.shape == expected.shape == q.shape
  assert float(jnp.abs(expected).max()) > 0.5
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-6, rtol=1e-5)
  # Masked slots do not count: changing their keys and values changes nothing.
  k, v, m = blocks[2]
  blocks[2] = (k.at[..., 3:].set(100.0), v.at[:, :, 3:].set(-100.0), m)
  np.testing.assert_allclose(np.asarray(jax.jit(cpu_attention.block_attention)(q, blocks)),
                             np.asarray(got), atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("head_dim,q_scale", [(64, 1.0), (128, 1.0), (64, 40.0)])
def test_kernel_matches_xla_on_wide_blocks(head_dim, q_scale):
  """Blocks wide enough for the kernel's vector tiles (64-, 8-lane and overlapping last tiles);
  q_scale=40 spreads scores over hundreds, so exp meets arguments below -87."""
  rng = np.random.default_rng(head_dim)
  rows, prompts, kv, groups = 8, 2, 2, 3
  q = jnp.asarray(rng.normal(size=(rows, 1, kv * groups, head_dim)).astype(np.float32)) * q_scale
  prompt_mask = np.arange(70)[None, :] >= np.array([[5], [37]])  # Left-padded prompts.
  last_mask = np.arange(19) <= 10
  last_mask[4] = False  # A masked slot inside the filled part.
  blocks = [_block(rng, prompts, kv, head_dim, 70, prompt_mask),
            _block(rng, rows, kv, head_dim, 64, np.ones(64, bool)),
            _block(rng, rows, kv, head_dim, 19, last_mask)]
  expected = jax.jit(decode.block_attention)(q, blocks)
  got = jax.jit(cpu_attention.block_attention)(q, blocks)
  assert float(jnp.abs(expected).max()) > 0.5
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-6, rtol=1e-5)
  # Masked slots contribute exactly nothing, even where their scores overflow to inf.
  k, v, m = blocks[2]
  hole = ~np.asarray(m)
  blocks[2] = (jnp.where(hole, 1e38, k), jnp.where(hole[:, None], 1e30, v), m)
  np.testing.assert_array_equal(np.asarray(jax.jit(cpu_attention.block_attention)(q, blocks)),
                                np.asarray(got))


@needs_kernel
def test_portable_build_matches_xla(tmp_path):
  """The kernel built without -march=native (the fallback build: 4-lane SSE / NEON vectors where
  the native one has 8-lane AVX) computes the same attention."""
  library = str(tmp_path / "portable.so")
  subprocess.run(cpu_attention.compile_command(cpu_attention._compiler(), library, native=False),
                 check=True, capture_output=True)
  cpu_attention.register(library, "prerl_decode_attention_portable")
  portable = functools.partial(cpu_attention.block_attention,
                               target="prerl_decode_attention_portable")
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.normal(size=(6, 1, 4, 32)).astype(np.float32)) * 4
  blocks = [_block(rng, 3, 2, 32, 21, np.arange(21)[None, :] >= np.array([[0], [3], [20]])),
            _block(rng, 6, 2, 32, 13, np.arange(13) <= 6)]
  np.testing.assert_allclose(np.asarray(jax.jit(portable)(q, blocks)),
                             np.asarray(jax.jit(decode.block_attention)(q, blocks)),
                             atol=2e-6, rtol=1e-5)


@needs_kernel
def test_kernel_rejects_non_float32_caches():
  rng = np.random.default_rng(0)
  q = jnp.zeros((2, 1, 2, 8), jnp.bfloat16)
  blocks = [_block(rng, 2, 1, 8, 4, np.ones(4, bool))]
  with pytest.raises(TypeError, match="float32.*attention='xla'"):
    cpu_attention.block_attention(q, blocks)


def test_resolve_attention_choices():
  assert _resolve_attention("xla", jnp.float32, None) == "xla"
  assert _resolve_attention("auto", jnp.bfloat16, None) == "xla"
  mesh = sharding.make_mesh(2, 2, 2)
  assert _resolve_attention("auto", jnp.float32, mesh) == "xla"
  with pytest.raises(ValueError, match="attention='flash'.*expected one of"):
    _resolve_attention("flash", jnp.float32, None)
  with pytest.raises(ValueError, match="one CPU device and float32.*8 cpu device"):
    _resolve_attention("cpu_kernel", jnp.float32, mesh)
  if cpu_attention.unavailable_reason() is None:
    assert _resolve_attention("auto", jnp.float32, None) == "cpu_kernel"


def test_failed_build_names_source_and_compiler(tmp_path, monkeypatch):
  compiler = tmp_path / "broken-c++"
  compiler.write_text("#!/bin/sh\necho 'fake compiler 1.0'\n"
                      "case \"$*\" in *--version*) exit 0;; esac\n"
                      "echo 'no such flag' >&2\nexit 1\n")
  compiler.chmod(0o755)
  monkeypatch.setenv("PRERL_JAX_CACHE", str(tmp_path / "cache"))
  with pytest.raises(RuntimeError, match="decode_attention_cpu.cc with .*broken-c\\+\\+ failed"):
    cpu_attention.build(str(compiler))
  assert not list((tmp_path / "cache" / "kernels").glob("*.so"))


@needs_kernel
def test_build_is_cached(tmp_path, monkeypatch):
  monkeypatch.setenv("PRERL_JAX_CACHE", str(tmp_path))
  compiler = cpu_attention._compiler()  # pylint: disable=W0212
  path = cpu_attention.build(compiler)
  assert path.startswith(str(tmp_path / "kernels")) and path.endswith(".so")
  built_at = os.stat(path).st_mtime_ns
  assert cpu_attention.build(compiler) == path
  assert os.stat(path).st_mtime_ns == built_at  # Not rebuilt.
  assert [p.name for p in (tmp_path / "kernels").iterdir()] == [os.path.basename(path)]
