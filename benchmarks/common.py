"""Shared measurements for benchmarks: matmul peak, memory bandwidth, timing, peak memory."""

import json
import resource
import time

import jax
import jax.numpy as jnp


def time_call(fn, *args, repeats: int = 3, warmup: int = 1) -> float:
  """Best wall time in seconds of fn(*args) (outputs blocked on) after warm-up calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def time_first_and_best(fn, first, then, repeats: int = 1) -> tuple[float, float]:
  """(seconds of fn(first), compilation included; best seconds of fn(then) after it)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(first))
  return time.perf_counter() - start, time_call(fn, then, repeats=repeats, warmup=0)


def matmul_peak_flops(size: int = 2048, dtype=jnp.float32) -> float:
  """Achieved FLOP/s of a jitted square matmul on the default device: the run's compute peak."""
  a = jnp.ones((size, size), dtype)
  b = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  return 2 * size**3 / time_call(matmul, a, b, repeats=5)


def memory_bandwidth(megabytes: int = 512) -> float:
  """Achieved bytes/s of a jitted read of a large float32 array: the run's bandwidth peak."""
  x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  return x.nbytes / time_call(total, x, repeats=5)


def peak_rss_bytes() -> int:
  """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def report(results: dict, as_json: bool, summary_lines: list[str]):
  """Prints a short human summary, or the results as one JSON object."""
  if as_json:
    print(json.dumps(results, indent=2, sort_keys=True))
  else:
    print("\n".join(summary_lines))
