"""Prompts, datasets and the grain input pipeline."""
