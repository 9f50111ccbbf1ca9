"""Pallas TPU kernels (Mosaic), and their wrappers with the signatures of the generic XLA code."""
