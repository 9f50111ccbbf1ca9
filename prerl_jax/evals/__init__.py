"""Held-out evaluation: mean@k / pass@k and reasoning-behaviour counts."""
