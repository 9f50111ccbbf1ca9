"""Packed vs padded update: `python launch/benchmark.py packing [--json] [--repeats 3 ...]`.

One RL update batch (by default the rl-step setting: 8 prompts x 8 samples, 128-token cap,
4 micro-batches, GRPO, SmolLM2-135M's shape with random weights, float32) with a long-tail
response length mix: most responses short (geometric, mean `--mean_len` tokens), `--at_cap` of
them at the cap. Prompts of 60-120 tokens are left-padded to the sampler's bucket, as the trainer
receives them. The same train step runs on the padded RolloutBatch (responses padded to the cap,
the trainer's width for a batch with a capped response) and on its packed layout, interleaved
(padded, packed, padded, ...) after one compiling call each, from the same parameters (one state,
learning rate 0, so every call sees the same params). Reported: median seconds per side, `speedup`
(padded / packed), both losses, and the tokens each layout feeds.
"""

import argparse
import statistics
import time

import jax
import numpy as np

from benchmarks import common
from prerl_jax.data import padding
from prerl_jax.models.loading import random_model
from prerl_jax.models.presets import preset_model_config
from prerl_jax.rl import objective as oc, packing, train_step
from prerl_jax.rl.batch import rollout_batch


def long_tail_batch(vocab: int, rows: int, group: int, cap: int, mean_len: float, at_cap: int,
                    seed: int = 0):
  """A RolloutBatch whose response lengths are geometric (mean mean_len), at_cap at the cap."""
  rng = np.random.default_rng(seed)
  response_len = np.minimum(rng.geometric(1.0 / mean_len, rows), cap)
  response_len[rng.choice(rows, at_cap, replace=False)] = cap
  prompt_len = rng.integers(60, 121, rows // group).repeat(group)
  width = padding.bucket(int(prompt_len.max()), padding.PROMPT_BUCKETS)
  return rollout_batch(rng.integers(3, vocab, (rows, width)), prompt_len,
                       rng.integers(3, vocab, (rows, cap)), response_len,
                       rng.normal(-2.0, 0.5, (rows, cap)).astype(np.float32),
                       rng.integers(0, 2, rows).astype(np.float32))


def main(argv, as_json: bool = False):
  parser = argparse.ArgumentParser(prog="benchmark.py packing")
  parser.add_argument("--model", default="smollm2-135m", help="preset shape (random weights)")
  parser.add_argument("--num_layers", type=int, default=0, help="fewer layers (0: the preset's)")
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--cap", type=int, default=128, help="max new tokens")
  parser.add_argument("--mean_len", type=float, default=16.0)
  parser.add_argument("--at_cap", type=int, default=4)
  parser.add_argument("--micro_batches", type=int, default=4)
  parser.add_argument("--objective", default="grpo")
  parser.add_argument("--repeats", type=int, default=3, help="measured calls per side")
  args = parser.parse_args(argv)

  config = preset_model_config(args.model, **(
      {"num_layers": args.num_layers} if args.num_layers else {}))
  optimizer = train_step.make_optimizer(0.0)
  objective = oc.get_objective(args.objective)
  batch = long_tail_batch(config.vocab_size, args.prompts * args.group, args.group, args.cap,
                          args.mean_len, args.at_cap)
  packed = packing.pack(batch, train_step.scored_spaces(objective),
                        micro_batches=args.micro_batches, bos_id=1)
  sides = {"padded": (batch, False), "packed": (packed, True)}
  # One state threads through both sides (learning rate 0: the params never change).
  graphdef, state = train_step.init_train_state(random_model(config), optimizer)
  steps = {side: train_step.make_train_step(
      graphdef, objective, optimizer, group_size=args.group, micro_batches=args.micro_batches,
      bos_id=1, packed=is_packed) for side, (_, is_packed) in sides.items()}
  times, losses = {side: [] for side in sides}, {}
  for call in range(args.repeats + 1):  # Call 0 compiles.
    for side, (side_batch, _) in sides.items():
      start = time.perf_counter()
      state, metrics = steps[side](state, side_batch)
      jax.block_until_ready(metrics)
      if call:
        times[side].append(time.perf_counter() - start)
      losses[side] = float(metrics["loss"])
  rows = packed.spaces[oc.CONDITIONAL]
  response_len = batch.response_mask.sum(axis=1)
  results = {
      "model": args.model, "num_layers": config.num_layers, "rows": len(response_len), "cap": args.cap,
      "micro_batches": args.micro_batches, "objective": args.objective, "repeats": args.repeats,
      "length_mix": {"mean": float(response_len.mean()), "at_cap": args.at_cap,
                     "median": float(np.median(response_len)),
                     "total_response_tokens": int(response_len.sum())},
      "fed_tokens": {"padded": int(batch.prompt_tokens.size + batch.response_tokens.size
                                   - len(response_len)),
                     "packed": int(rows.tokens.size),
                     "packed_real": int((rows.segment_ids > 0).sum())},
      "packed_rows": list(rows.tokens.shape),
      "seconds": times, "median_s": {s: statistics.median(t) for s, t in times.items()},
      "loss": losses, "loss_abs_diff": abs(losses["padded"] - losses["packed"]),
      "peak_rss_bytes": common.peak_rss_bytes(),
  }
  results["speedup"] = results["median_s"]["padded"] / results["median_s"]["packed"]
  mix = results["length_mix"]
  lines = [
      f"update of {results['rows']} responses ({args.model} shape, {config.num_layers} layers, "
      f"{args.objective}, "
      f"{args.micro_batches} micro-batches): lengths geometric mean {args.mean_len:g} "
      f"(measured mean {mix['mean']:.1f}, median {mix['median']:g}), {args.at_cap} at the cap "
      f"{args.cap}",
      f"  fed tokens: padded {results['fed_tokens']['padded']}, packed "
      f"{results['fed_tokens']['packed']} (rows {results['packed_rows']})",
      *(f"  {side}: " + ", ".join(f"{t:.2f}" for t in times[side])
        + f" s (median {results['median_s'][side]:.2f} s), loss {losses[side]:.6f}"
        for side in sides),
      f"  speedup (padded / packed, medians of {args.repeats} interleaved calls): "
      f"{results['speedup']:.2f}x; |loss difference| {results['loss_abs_diff']:.2e}",
  ]
  common.report(results, as_json, lines)
