"""GPU kernels: cuDNN fused attention for the full-sequence forward and backward."""
