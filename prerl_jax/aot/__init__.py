"""Ahead-of-time compilation: the dry run that proves a step fits a target."""
