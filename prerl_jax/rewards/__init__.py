"""Verifiers: boxed-answer math grading and reasoning-gym scoring."""
