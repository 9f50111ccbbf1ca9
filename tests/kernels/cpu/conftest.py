"""Fixtures of the CPU kernel tests: the kernels built without -march=native, once."""

import subprocess

import pytest

from prerl_jax.kernels.cpu import library as cpu_kernels


@pytest.fixture(scope="session")
def portable_library(tmp_path_factory) -> str:
  """The kernels compiled without -march=native (the fallback build), shared by the attention
  and paged-attention tests (each registers it under its own suffix)."""
  library = str(tmp_path_factory.mktemp("portable") / "portable.so")
  subprocess.run(cpu_kernels.compile_command(cpu_kernels.compiler(), library, native=False),
                 check=True, capture_output=True)
  return library
