"""Skip marks for tests that need a backend's kernels."""

import pytest

from prerl_jax.kernels.cpu import library as cpu_kernels

needs_cpu_kernels = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                                       reason="no working C++ compiler")
