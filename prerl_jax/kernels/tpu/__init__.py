"""Pallas TPU kernels, and their wrappers with the signatures of the generic XLA code."""
