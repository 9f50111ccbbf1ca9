"""Sampling: the fused prefill + decode program and its KV cache."""
