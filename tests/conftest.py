"""Test setup: 8 simulated CPU devices (for sharding tests), one torch thread, slow tests first."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One torch (OpenMP) thread: the tests run two xdist workers on two cores, where a second OpenMP
# thread spins waiting for a core (the SmolLM2 greedy test took 84 CPU-s with two, 44 with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(items):
  """Slow tests first, so that pytest-xdist's workers do not end on one long test each."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
