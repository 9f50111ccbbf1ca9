"""prerl_jax: Pre-train Space RL (PreRL, NSR-PreRL, DSRL) and GRPO baselines in JAX."""

from prerl_jax.export import export_hf
from prerl_jax.loading import load_model, model_config_of, random_model
from prerl_jax.model import Decoder, forward_logits, positions_from_mask
from prerl_jax.model_config import ModelConfig
from prerl_jax.presets import PRESETS
from prerl_jax.sharding import make_mesh, shard_batch

__all__ = [
    "Decoder", "ModelConfig", "PRESETS", "export_hf", "forward_logits", "load_model", "make_mesh",
    "model_config_of", "positions_from_mask", "random_model", "shard_batch",
]
