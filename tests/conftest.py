"""Test setup: 8 simulated CPU devices (for sharding tests), one torch thread, slow tests first,
and unoptimized machine code for modules that compile many programs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One torch (OpenMP) thread: the tests run two xdist workers on two cores, where a second OpenMP
# thread spins waiting for a core (the SmolLM2 greedy test took 84 CPU-s with two, 44 with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(items):
  """Slow tests first, so that pytest-xdist's workers do not end on one long test each."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="module")
def unoptimized_machine_code():
  """For a module whose tests mostly compile programs and compare two of them (or one with a
  formula) within a tolerance: XLA compiles in half the time without LLVM's optimization passes
  (jax_disable_most_optimizations, as JAX's own tests run: the same HLO, the machine code left
  unoptimized). Rounding can differ from optimized code (test_remat's policies then differ by
  3e-5 relative, beyond its 1e-6), so not for tolerances at float32 rounding. The programs
  compiled meanwhile are dropped after the module, so no other test runs them."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)
  jax.clear_caches()
