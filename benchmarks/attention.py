"""Update step speed per attention backend: `python launch/benchmark.py attention [--json]
[--tokens 8192] [--backends cudnn,chunked,xla] [--remat full]`.

The gradient of the mean token log-probability of one micro-batch (random Qwen3-1.7B-shaped
weights, float32 parameters, bfloat16 compute on GPU/TPU) per backend, sides interleaved;
MFU counts the weight products (6 x non-embedding parameters x tokens, plus the vocabulary
projection) and causal attention (half the T x T products), forward and backward, against the
measured bfloat16 matmul peak of the device.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common
from prerl_jax.models import presets, remat
from prerl_jax.models.loading import random_model
from prerl_jax.rl import scoring

QWEN3_1_7B = dict(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                  num_kv_heads=8, head_dim=128, tie_word_embeddings=True)


def update_flops(config, rows, tokens) -> float:
  """Forward + backward FLOPs of the update (no remat recompute counted)."""
  c = config
  per_layer = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + (
      c.num_heads * c.head_dim * c.hidden_size) + 3 * c.hidden_size * c.intermediate_size
  weights = 2 * (per_layer * c.num_layers + c.hidden_size * c.vocab_size) * rows * tokens
  attention = 2 * 2 * c.num_heads * c.head_dim * tokens**2 / 2 * c.num_layers * rows
  return 3 * (weights + attention)


def main(argv=None, as_json=False):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--rows", type=int, default=1)
  parser.add_argument("--backends", default="cudnn,chunked,xla")
  parser.add_argument("--remat", choices=remat.POLICIES, default="full")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--layers", type=int, default=QWEN3_1_7B["num_layers"])
  args = parser.parse_args(argv)
  config = presets.preset_model_config("qwen3-4b", **{**QWEN3_1_7B, "num_layers": args.layers},
                                       dtype=args.dtype, remat=args.remat)
  graph, state = nnx.split(random_model(config))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (args.rows, args.tokens)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(args.tokens), tokens.shape)
  segments = jnp.ones_like(tokens)

  def step_for(backend):
    def loss(state):
      model = nnx.merge(graph, state)
      model.config = config.replace(attention=backend)
      hidden, _ = model(tokens, positions, segments)
      return jnp.mean(scoring.token_logprobs(model, hidden[:, :-1], tokens[:, 1:])[0])
    return jax.jit(jax.value_and_grad(loss))

  steps = {b: step_for(b) for b in args.backends.split(",")}
  losses = {b: float(step(state)[0]) for b, step in steps.items()}  # compile + warm up
  times = {b: [] for b in steps}
  for _ in range(args.repeats):
    for b, step in steps.items():
      times[b].append(common.time_call(step, state, repeats=1, warmup=0))
  peak = common.matmul_peak_flops(8192, jnp.dtype(args.dtype))
  flops = update_flops(config, args.rows, args.tokens)
  result = {"device": jax.devices()[0].device_kind, "tokens": args.tokens, "rows": args.rows,
            "remat": args.remat, "dtype": args.dtype, "matmul_peak_tflops": peak / 1e12,
            "repeats": args.repeats,
            "backends": {b: {"step_s": min(t), "loss": losses[b],
                             "mfu": flops / min(t) / peak} for b, t in times.items()}}
  if as_json:
    print(json.dumps(result))
  else:
    for b, r in result["backends"].items():
      print(f"{b}: {r['step_s']:.3f} s per update step, MFU {100 * r['mfu']:.1f}% of "
            f"{peak / 1e12:.0f} TFLOP/s, loss {r['loss']:.5f}")
