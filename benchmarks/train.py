"""Train-step benchmark: step time per scoring space, achieved FLOP/s vs matmul peak, peak memory.

`python launch/benchmark.py train [--json] [--batch 64 --prompt_len 128 --response_len 256 ...]`
times one GRPO (conditional) and one NSR-PreRL (marginal) step of SmolLM2-135M on random tokens.
FLOPs are 3x the forward's matmuls: 2 * layer params * fed tokens, 2 * hidden * vocab per scored
token, and 4 * layers * fed^2 * hidden for attention (the full square the kernel computes).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from prerl_jax.rl import objective as objective_config, train_step
from prerl_jax.rl.batch import rollout_batch
from prerl_jax.models.loading import load_model
from prerl_jax.models.decoder import layer_shapes
from prerl_jax.models.tokenizer import chat_turn_start_id
from prerl_jax.models import remat


def step_flops(config, batch: int, context: int, response: int) -> float:
  """Forward + backward FLOPs of one step over `context` tokens then `response` scored ones."""
  layer_params = sum(int(np.prod(s)) for s in layer_shapes(config).values())
  fed = context + response - 1
  forward = (2 * layer_params * fed + 2 * config.hidden_size * config.vocab_size * response
             + 4 * config.num_layers * fed**2 * config.num_heads * config.head_dim)
  return 3.0 * forward * batch


def random_batch(vocab: int, batch: int, prompt_len: int, response_len: int, group_size: int):
  rng = np.random.default_rng(0)
  return jax.tree.map(jnp.asarray, rollout_batch(
      rng.integers(3, vocab, (batch, prompt_len)), np.full(batch, prompt_len),
      rng.integers(3, vocab, (batch, response_len)), np.full(batch, response_len),
      np.full((batch, response_len), -10.0, np.float32),
      (np.arange(batch) % group_size == 0).astype(np.float32)))


def time_steps(step, state, batch, repeats: int):
  """(compile seconds, best seconds per step, final state); threads the donated state."""
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    best = min(best, time.perf_counter() - start)
  return compile_s, best, state


def main(argv, as_json: bool = False):
  parser = argparse.ArgumentParser(prog="benchmark.py train")
  parser.add_argument("--model", default="smollm2-135m")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--response_len", type=int, default=256)
  parser.add_argument("--group_size", type=int, default=8)
  parser.add_argument("--micro_batches", type=int, default=8)
  parser.add_argument("--chunk_size", type=int, default=128)
  parser.add_argument("--remat", choices=remat.POLICIES, default="full")
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args(argv)

  peak = common.matmul_peak_flops()
  model, tokenizer = load_model(args.model, remat=args.remat)
  config = model.config
  optimizer = train_step.make_optimizer()
  graphdef, state = train_step.init_train_state(model, optimizer)
  del model
  batch = random_batch(config.vocab_size, args.batch, args.prompt_len, args.response_len,
                       args.group_size)
  results = {"model": args.model, "batch": args.batch, "prompt_len": args.prompt_len,
             "response_len": args.response_len, "micro_batches": args.micro_batches,
             "chunk_size": args.chunk_size, "remat": args.remat,
             "matmul_peak_flops": peak, "device": str(jax.devices()[0].platform)}
  lines = [f"train step, {args.model}, {args.batch} x ({args.prompt_len} prompt + "
           f"{args.response_len} response), {args.micro_batches} micro-batches, "
           f"remat={args.remat}; matmul peak {peak / 1e9:.1f} GFLOP/s"]
  for space, name, context in (("conditional", "grpo", args.prompt_len),
                               ("marginal", "nsr_prerl", 1)):
    step = train_step.make_train_step(
        graphdef, objective_config.get_objective(name), optimizer, group_size=args.group_size,
        micro_batches=args.micro_batches, bos_id=chat_turn_start_id(tokenizer),
        chunk_size=args.chunk_size)
    compile_s, seconds, state = time_steps(step, state, batch, args.repeats)
    flops = step_flops(config, args.batch, context, args.response_len)
    results[space] = {"objective": name, "step_s": seconds, "compile_s": compile_s,
                      "flops": flops, "flops_per_s": flops / seconds,
                      "fraction_of_peak": flops / seconds / peak}
    lines.append(f"  {space:11s} ({name}): {seconds:7.2f} s/step, {flops / 1e12:6.2f} TFLOP, "
                 f"{flops / seconds / 1e9:6.1f} GFLOP/s = {flops / seconds / peak:5.1%} of peak")
  cond, marg = results["conditional"], results["marginal"]
  results["marginal_over_conditional_time"] = marg["step_s"] / cond["step_s"]
  results["marginal_over_conditional_flops"] = marg["flops"] / cond["flops"]
  results["peak_rss_bytes"] = common.peak_rss_bytes()
  lines.append(f"  marginal / conditional: time {results['marginal_over_conditional_time']:.2f}, "
               f"FLOPs {results['marginal_over_conditional_flops']:.2f}")
  lines.append(f"  peak resident memory {results['peak_rss_bytes'] / 2**30:.2f} GiB")
  common.report(results, as_json, lines)
