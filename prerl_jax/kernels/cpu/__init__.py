"""C++ XLA FFI kernels for the CPU decode step, and their Python wrappers."""
