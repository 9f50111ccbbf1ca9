"""Rotary position embeddings (Hugging Face `rotate_half` layout) with checkpoint scaling."""

import math

import jax.numpy as jnp
import numpy as np

from prerl_jax.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
  """Per-pair inverse frequencies [head_dim // 2], with the checkpoint's rope scaling applied."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  scaling = config.rope_scaling_dict
  rope_type = scaling.get("rope_type", "default")
  if rope_type == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif rope_type == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = np.where(wavelen > old_context / low, inv_freq / factor,
                        np.where(wavelen < old_context / high, inv_freq, smoothed))
  return inv_freq.astype(np.float32)


def rotation(positions_BxT: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(cos, sin) [B, T, 1, head_dim // 2] of the tokens' rotary angles (float32).

  Computed once per forward or decode step and shared by every layer's queries and keys: when
  each layer computed its own, XLA:CPU re-evaluated sin and cos inside each consumer fusion
  (three per layer in the decode step).
  """
  angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  return jnp.cos(angles_BxTxH2)[:, :, None, :], jnp.sin(angles_BxTxH2)[:, :, None, :]


def apply_rotation(x_BxTxNxH: jnp.ndarray, rotation: tuple[jnp.ndarray, jnp.ndarray]
                   ) -> jnp.ndarray:
  """Rotates query or key heads by a `rotation(...)` (float32 math, result in x's dtype)."""
  cos, sin = rotation
  x = x_BxTxNxH.astype(jnp.float32)
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x_BxTxNxH.dtype)
