"""Where prerl-jax keeps derived files, and JAX's persistent compilation cache.

Everything lives under $PRERL_JAX_CACHE (default ~/.cache/prerl_jax): tokenizers converted from
GGUF files and compiled XLA programs. With the compilation cache on, a run whose programs were
compiled before (by an earlier run, a resumed run, or another objective with the same shapes)
loads them instead of compiling.
"""

import os

import jax


def cache_root() -> str:
  """$PRERL_JAX_CACHE, or ~/.cache/prerl_jax."""
  return os.environ.get("PRERL_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "prerl_jax"))


def enable_compilation_cache(directory: str | None = None, min_compile_seconds: float = 1.0) -> str:
  """Turns on JAX's persistent cache for programs that took at least min_compile_seconds."""
  directory = directory or os.path.join(cache_root(), "xla")
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  return directory
