"""Hardware-specific kernels, one folder per backend."""
