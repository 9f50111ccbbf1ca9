"""Every benchmark behind launch/benchmark.py imports and parses its default arguments."""

import importlib
import os
import subprocess
import sys

import pytest

import run_fixtures

sys.path.insert(0, os.path.join(run_fixtures.REPO_ROOT, "launch"))
import benchmark  # noqa: E402  pylint: disable=wrong-import-position


@pytest.mark.parametrize("name", sorted(benchmark.SUITES))
def test_benchmark_module_imports(name):
  module = importlib.import_module(benchmark.SUITES[name])
  assert callable(module.main)


def test_benchmark_help_lists_every_suite():
  result = subprocess.run([sys.executable, os.path.join(run_fixtures.REPO_ROOT, "launch",
                                                        "benchmark.py"), "--help"],
                          capture_output=True, text=True, timeout=120, check=True)
  assert all(name in result.stdout for name in benchmark.SUITES)
