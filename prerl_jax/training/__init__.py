"""The training loop, run configs, checkpointing, logging and caches."""
