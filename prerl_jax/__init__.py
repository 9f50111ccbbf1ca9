"""prerl_jax: Pre-train Space RL (PreRL, NSR-PreRL, DSRL) and GRPO baselines in JAX.

The curated API: load or build a model, sample from it, build a rollout batch, score it in either
space, and train on it with an objective. Everything else lives in the role subpackages.
"""

from prerl_jax.generate.sampler import Sampler, SamplingConfig
from prerl_jax.models.config import ModelConfig
from prerl_jax.models.decoder import Decoder, forward_logits, positions_from_mask
from prerl_jax.models.export import export_hf
from prerl_jax.models.loading import load_model, model_config_of, random_model
from prerl_jax.models.presets import PRESETS
from prerl_jax.rl.batch import RolloutBatch
from prerl_jax.rl.objective import Objective, get_objective
from prerl_jax.rl.scoring import score
from prerl_jax.rl.train_step import init_train_state, make_optimizer, make_train_step
from prerl_jax.sharding import make_mesh, shard_batch

__all__ = [
    "Decoder", "ModelConfig", "Objective", "PRESETS", "RolloutBatch", "Sampler", "SamplingConfig",
    "export_hf", "forward_logits", "get_objective", "init_train_state", "load_model",
    "make_mesh", "make_optimizer", "make_train_step", "model_config_of", "positions_from_mask",
    "random_model", "score", "shard_batch",
]
