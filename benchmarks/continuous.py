"""Continuous batching vs the static batch at equal KV-cache memory, on a long-tail length mix.

SmolLM2-135M, float32. The mix: prompts 0, 4, 8, ... (a quarter) have responses of exactly
`--long` tokens, the others of 8 to `--short` tokens (drawn once, seed 0); every prompt has `--n`
samples and the lengths are per-prompt response limits (no stop ids), so both engines produce
the same useful tokens. The static sampler runs the prompts in consecutive batches of
`--static-rows` rows, each batch for its longest response (the static program decodes every
row to the end); its KV cache holds every row at the prompt bucket plus that length. The
continuous sampler gets a page pool of the same number of token slots (prompt bucket +
`--long` per static row) and `--rows` live rows. The two sides alternate `--runs` times; the
speedup is the ratio of their best useful tokens/s.
"""

import argparse
import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from benchmarks import common
from benchmarks.sampler import repeated_prompts
from prerl_jax.generate.continuous import ContinuousSampler, PoolConfig
from prerl_jax.generate.sampler import Sampler, SamplingConfig, prompt_batch
from prerl_jax.models.loading import load_model


def length_mix(prompts: int, long: int, short: int) -> np.ndarray:
  """Each prompt's response length: `long` for every fourth prompt, else 8..short."""
  lengths = np.random.default_rng(0).integers(8, short + 1, prompts)
  lengths[::4] = long
  return lengths


def main(argv, as_json: bool):
  parser = argparse.ArgumentParser(prog="benchmark.py continuous")
  parser.add_argument("--prompts", type=int, default=16)
  parser.add_argument("--n", type=int, default=4)
  parser.add_argument("--prompt-length", type=int, default=64)
  parser.add_argument("--long", type=int, default=256)
  parser.add_argument("--short", type=int, default=32)
  parser.add_argument("--static-rows", type=int, default=16)
  parser.add_argument("--rows", type=int, default=32)
  parser.add_argument("--page-size", type=int, default=16)
  parser.add_argument("--chunk-steps", type=int, default=16)
  parser.add_argument("--runs", type=int, default=2)
  args = parser.parse_args(argv)
  if args.static_rows % args.n:
    raise SystemExit(f"--static-rows={args.static_rows} must be a multiple of --n={args.n}")

  model, tokenizer = load_model("smollm2-135m")
  state = nnx.state(model)
  base = repeated_prompts(tokenizer, args.prompt_length)
  prompts = [base[i % len(base)] for i in range(args.prompts)]
  lengths = length_mix(args.prompts, args.long, args.short)
  config = SamplingConfig(max_new_tokens=args.long, pad_id=tokenizer.pad_token_id, stop_ids=(),
                          n=args.n)
  tokens, mask = prompt_batch(prompts, config)
  useful = int(lengths.sum()) * args.n

  static = Sampler(model)
  per_batch = args.static_rows // args.n
  batches = [slice(i, i + per_batch) for i in range(0, args.prompts, per_batch)]

  def run_static(key):
    for part in batches:
      batch_config = dataclasses.replace(config, max_new_tokens=int(lengths[part].max()))
      out = static.sample(state, tokens[part], mask[part], key, batch_config)
      jax.block_until_ready(out.tokens_NxM)

  slots = args.static_rows * (tokens.shape[1] + args.long)
  pool = PoolConfig(rows=args.rows, page_size=args.page_size,
                    pages=slots // args.page_size + 1, chunk_steps=args.chunk_steps)
  continuous = ContinuousSampler(model, pool)

  def run_continuous(key):
    out = continuous.sample(state, tokens, mask, key, config, max_new_tokens_B=lengths)
    assert np.array_equal(out.lengths_N, np.repeat(lengths, args.n)), out.lengths_N

  sides = {"static": run_static, "continuous": run_continuous}
  first_call_s = {}
  for name, run in sides.items():
    start = time.perf_counter()
    run(jax.random.key(0))
    first_call_s[name] = time.perf_counter() - start
  times = {name: [] for name in sides}
  for repeat in range(args.runs):
    for name, run in sides.items():
      start = time.perf_counter()
      run(jax.random.key(1 + repeat))
      times[name].append(time.perf_counter() - start)
  best = {name: min(t) for name, t in times.items()}
  results = {
      "prompts": args.prompts, "n": args.n, "long": args.long, "short": args.short,
      "long_share": float(np.mean(lengths == args.long)), "useful_tokens": useful,
      "prompt_bucket": int(tokens.shape[1]), "static_rows": args.static_rows,
      "static_kernels": static.kernels, "continuous_kernels": continuous.kernels,
      "rows": args.rows, "page_size": args.page_size,
      "pool_pages": pool.pages, "kv_slots": slots, "chunk_steps": args.chunk_steps,
      "runs": args.runs, "times_s": times, "first_call_s": first_call_s,
      "static_tokens_per_s": useful / best["static"],
      "continuous_tokens_per_s": useful / best["continuous"],
      "speedup": best["static"] / best["continuous"],
      "peak_rss_bytes": common.peak_rss_bytes(),
  }
  lines = [
      f"continuous: SmolLM2-135M, {args.prompts} prompts x n={args.n}, prompt bucket "
      f"{tokens.shape[1]}; every fourth prompt's responses run to {args.long} tokens, the rest "
      f"stop at 8..{args.short}; {useful} useful tokens; {args.runs} interleaved runs, best of "
      "each side",
      f"  static:     {results['static_tokens_per_s']:7.1f} tokens/s ({len(batches)} batches of "
      f"{args.static_rows} rows, {static.kernels} kernels; {best['static']:.1f} s)",
      f"  continuous: {results['continuous_tokens_per_s']:7.1f} tokens/s ({args.rows} rows, "
      f"{pool.pages} pages of {args.page_size} = the static batch's {slots} slots; chunks of "
      f"{args.chunk_steps} steps, {continuous.kernels} kernels; {best['continuous']:.1f} s)",
      f"  speedup:    {results['speedup']:.2f}x",
  ]
  common.report(results, as_json, lines)
