"""Benchmarks, one module per `python launch/benchmark.py <name>` subcommand; measured, never tested."""
