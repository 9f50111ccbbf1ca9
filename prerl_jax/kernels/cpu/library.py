"""The sampler's CPU kernels (C++ XLA:CPU FFI handlers): built on first use, then registered.

One library holds the kernels: the decode attention (`decode_attention_cpu.cc`, used through
`cpu_attention`), the paged decode attention (`paged_attention_cpu.cc`, through
`cpu_paged_attention`), the packed-weight matmuls (`packed_matmul_cpu.cc`, through
`cpu_matmul`) and the RMSNorm (`rms_norm_cpu.cc`, through `cpu_norm`). It is compiled once per
source, compiler and CPU with the system C++ compiler ($CXX, or c++) into
$PRERL_JAX_CACHE/kernels. Where no
compiler works, `unavailable_reason()` says why and the sampler keeps XLA's code (see
`Sampler(kernels=...)`).
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

from prerl_jax.training import caches

_HERE = os.path.dirname(__file__)
SOURCES = tuple(os.path.join(_HERE, name) for name in (
    "decode_attention_cpu.cc", "paged_attention_cpu.cc", "packed_matmul_cpu.cc",
    "rms_norm_cpu.cc"))
HEADERS = tuple(os.path.join(_HERE, name) for name in (
    "cpu_attention_lanes.h", "cpu_kernel_pool.h", "cpu_new_token.h", "cpu_register_tile.h",
    "cpu_vector_exp.h"))
# FFI target name -> the handler symbol the library exports.
HANDLERS = {"prerl_decode_attention": "PrerlDecodeAttention",
            "prerl_paged_attention": "PrerlPagedAttention",
            "prerl_packed_matmul": "PrerlPackedMatmul",
            "prerl_packed_matmul_residual": "PrerlPackedMatmulResidual",
            "prerl_gated_matmul": "PrerlGatedMatmul",
            "prerl_rms_norm": "PrerlRmsNorm"}
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")


def _cpu_identity() -> str:
  """The CPU model and flags (the library is built with -march=native)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags", "Features"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor()


def compiler() -> str | None:
  """The C++ compiler the kernels are built with ($CXX, or c++), or None."""
  return shutil.which(os.environ.get("CXX", "c++"))


def library_path(compiler_path: str) -> str:
  """Where the library for these sources, compiler, jax version and CPU is kept."""
  version = subprocess.run([compiler_path, "--version"], capture_output=True, text=True).stdout
  digest = hashlib.sha256()
  for source in SOURCES + HEADERS:
    with open(source, "rb") as f:
      digest.update(f.read())
  for part in (compiler_path, version, jax.__version__, platform.machine(), _cpu_identity()):
    digest.update(part.encode())
  return os.path.join(caches.cache_root(), "kernels", f"cpu_kernels_{digest.hexdigest()[:16]}.so")


def compile_command(compiler_path: str, output: str, native: bool) -> list[str]:
  """The command that builds the library into `output`, for this CPU (-march=native) or not."""
  arch = ["-march=native"] if native else []
  return [compiler_path, *_FLAGS, *arch, f"-I{jax.ffi.include_dir()}", *SOURCES, "-o", output]


def build(compiler_path: str) -> str:
  """Compiles the library unless it is already in the cache; returns its path.

  Raises RuntimeError with the compiler's message when it fails (with and without -march=native).
  """
  path = library_path(compiler_path)
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  errors = []
  for native in (True, False):
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as scratch:
      built = os.path.join(scratch, "kernels.so")
      run = subprocess.run(compile_command(compiler_path, built, native), capture_output=True,
                           text=True)
      if run.returncode == 0:
        os.replace(built, path)  # Atomic: concurrent builds (test workers) each write a whole file.
        return path
      errors.append(run.stderr.strip()[-2000:])
  raise RuntimeError(f"building {', '.join(SOURCES)} with {compiler_path} failed:\n"
                     + "\n".join(errors))


def register(library: str, suffix: str = "") -> None:
  """Loads a built library and registers its handlers as XLA:CPU FFI targets (the names of
  HANDLERS, each followed by `suffix`). Raises OSError when the library cannot be loaded."""
  loaded = ctypes.cdll.LoadLibrary(library)
  for target, symbol in HANDLERS.items():
    jax.ffi.register_ffi_target(target + suffix, jax.ffi.pycapsule(getattr(loaded, symbol)),
                                platform="cpu")


@functools.cache
def unavailable_reason() -> str | None:
  """Builds, loads and registers the kernels once per process: None, or why they are
  unavailable (also logged once as a warning)."""
  compiler_path = compiler()
  if compiler_path is None:
    reason = "no C++ compiler found ($CXX or c++)"
  else:
    try:
      register(build(compiler_path))
    except (RuntimeError, OSError) as error:
      reason = str(error)
    else:
      return None
  logging.warning("CPU kernels unavailable: %s", reason)
  return reason
