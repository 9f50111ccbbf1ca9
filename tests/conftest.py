"""Test setup: 8 simulated CPU devices (for sharding tests) and shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402


def pytest_collection_modifyitems(items):
  """Slow tests first, so that pytest-xdist's workers do not end on one long test each."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)

@pytest.fixture(scope="session")
def smollm2():
  """(model, tokenizer) of the bundled SmolLM2-135M GGUF, loaded once per test session."""
  from prerl_jax.models.loading import load_model
  return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
  return smollm2[1]
