"""The CPU decode-attention kernel (decode_attention_cpu.cc): built on first use, then an FFI call.

`write_and_attend(q, k, v, rotation, offset, blocks)` has the signature and the results of
`decode.write_and_attend` (float32 only) and runs as one XLA:CPU custom call per layer, which
also rotates the queries and keys and writes the new token into the last block in place. On
SmolLM2-135M at 64 rows the first version cut a 256-token decode step from 0.23 to 0.19 s, and
the tuned one from 0.22-0.25 to 0.20-0.21 s, in interleaved A/Bs (README, Performance).

The library is compiled once per source, compiler and CPU with the system C++ compiler ($CXX, or
c++) into $PRERL_JAX_CACHE/kernels. Where no compiler works, `unavailable_reason()` says why and
the sampler keeps XLA's attention (see `Sampler(attention=...)`).
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from prerl_jax import caches

TARGET = "prerl_decode_attention"
SOURCE = os.path.join(os.path.dirname(__file__), "decode_attention_cpu.cc")
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")


def _cpu_identity() -> str:
  """The CPU model and flags (the library is built with -march=native)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags", "Features"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor()


def _compiler() -> str | None:
  return shutil.which(os.environ.get("CXX", "c++"))


def library_path(compiler: str) -> str:
  """Where the library for this source, compiler, jax version and CPU is kept."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  with open(SOURCE, "rb") as f:
    digest = hashlib.sha256(f.read())
  for part in (compiler, version, jax.__version__, platform.machine(), _cpu_identity()):
    digest.update(part.encode())
  return os.path.join(caches.cache_root(), "kernels",
                      f"decode_attention_{digest.hexdigest()[:16]}.so")


def compile_command(compiler: str, output: str, native: bool) -> list[str]:
  """The command that builds the kernel into `output`, for this CPU (-march=native) or not."""
  arch = ["-march=native"] if native else []
  return [compiler, *_FLAGS, *arch, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", output]


def build(compiler: str) -> str:
  """Compiles the kernel unless it is already in the cache; returns the library's path.

  Raises RuntimeError with the compiler's message when it fails (with and without -march=native).
  """
  path = library_path(compiler)
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  errors = []
  for native in (True, False):
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as scratch:
      built = os.path.join(scratch, "kernel.so")
      run = subprocess.run(compile_command(compiler, built, native), capture_output=True,
                           text=True)
      if run.returncode == 0:
        os.replace(built, path)  # Atomic: concurrent builds (test workers) each write a whole file.
        return path
      errors.append(run.stderr.strip()[-2000:])
  raise RuntimeError(f"building {SOURCE} with {compiler} failed:\n" + "\n".join(errors))


def register(library: str, target: str = TARGET) -> None:
  """Loads a built kernel library and registers its handler as the XLA:CPU FFI target `target`.

  Raises OSError when the library cannot be loaded."""
  handler = ctypes.cdll.LoadLibrary(library).PrerlDecodeAttention
  jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")


@functools.cache
def unavailable_reason() -> str | None:
  """Builds, loads and registers the kernel once per process: None, or why it is unavailable
  (also logged once as a warning)."""
  compiler = _compiler()
  if compiler is None:
    reason = "no C++ compiler found ($CXX or c++)"
  else:
    try:
      register(build(compiler))
    except (RuntimeError, OSError) as error:
      reason = str(error)
    else:
      return None
  logging.warning("CPU decode-attention kernel unavailable: %s", reason)
  return reason


def write_and_attend(q_NxTxNHxH, k_NxTxKxH, v_NxTxKxH, rotation, offset, blocks,
                     target: str = TARGET):
  """`decode.write_and_attend` as one FFI call to `target` (float32 queries, keys and values).

  The last block's keys and values are results aliased to their operands, so inside the decode
  loop the new token is written in place."""
  rows, length, num_heads, head_dim = q_NxTxNHxH.shape
  num_kv = blocks[0][0].shape[1]
  q_NxKxGxH = q_NxTxNHxH.reshape(rows, num_kv, num_heads // num_kv, head_dim)
  new_k_NxKxH = k_NxTxKxH.reshape(rows, num_kv, head_dim)
  new_v_NxKxH = v_NxTxKxH.reshape(rows, num_kv, head_dim)
  cos_NxH2, sin_NxH2 = (x.reshape(rows, head_dim // 2) for x in rotation)
  new_token = [q_NxKxGxH, new_k_NxKxH, new_v_NxKxH, cos_NxH2, sin_NxH2]
  block_arrays = [x for block in blocks for x in block]
  for x in new_token + block_arrays:
    if x.dtype not in (jnp.float32, jnp.bool_):
      raise TypeError(f"the CPU decode-attention kernel takes float32 and bool arrays, got "
                      f"{x.dtype}; use Sampler(attention='xla') for {x.dtype} caches")
  last_k, last_v, last_mask = blocks[-1]
  last_keys_index = len(new_token) + 1 + len(block_arrays) - 3  # Operand index (after offset).
  out, last_k, last_v = jax.ffi.ffi_call(
      target, (jax.ShapeDtypeStruct(q_NxKxGxH.shape, jnp.float32),
               jax.ShapeDtypeStruct(last_k.shape, jnp.float32),
               jax.ShapeDtypeStruct(last_v.shape, jnp.float32)),
      input_output_aliases={last_keys_index: 1, last_keys_index + 1: 2},
  )(*new_token, jnp.asarray(offset, jnp.int32), *block_arrays, scale=np.float32(head_dim**-0.5))
  return (out.reshape(rows, length, num_heads, head_dim),
          blocks[:-1] + [(last_k, last_v, last_mask)])
