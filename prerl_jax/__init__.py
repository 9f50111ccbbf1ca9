"""prerl_jax: Pre-train Space RL (PreRL, NSR-PreRL, DSRL) and GRPO baselines in JAX."""

from prerl_jax.models.export import export_hf
from prerl_jax.models.loading import load_model, model_config_of, random_model
from prerl_jax.models.decoder import Decoder, forward_logits, positions_from_mask
from prerl_jax.models.config import ModelConfig
from prerl_jax.models.presets import PRESETS
from prerl_jax.sharding import make_mesh, shard_batch

__all__ = [
    "Decoder", "ModelConfig", "PRESETS", "export_hf", "forward_logits", "load_model", "make_mesh",
    "model_config_of", "positions_from_mask", "random_model", "shard_batch",
]
