"""Sampler benchmark: SmolLM2-135M, 8 prompts x 8 samples, 256 new tokens; ours vs transformers.

Both sides are warmed up, then timed in turn (ours, transformers, ours, ...; --repeats runs
each); the medians, every run's time and the 1-minute load average around it are reported.

Also reports the roofline of one decode step, max(weight bytes / memory bandwidth, FLOPs / matmul
peak), with bandwidth and peak measured in the same run (launch/common.py), and the time of
one decode step's weight matmuls alone at the decode batch (`_decode_matmuls_s`): what XLA's
matmuls cost at those shapes, before attention, norms and sampling (with `--kernels=cpu` the
sampler's products run in the packed-weight kernel instead, so it can beat this chain).
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import torch
import transformers
from flax import nnx

from benchmarks import common
from prerl_jax.models import presets
from prerl_jax.models.loading import load_model
from prerl_jax.generate.sampler import KERNEL_CHOICES, Sampler, SamplingConfig, prompt_batch

TEXTS = (
    "The history of mathematics spans thousands of years, from counting with tally marks",
    "Write a short story about a robot who learns to paint landscapes in the mountains",
    "Explain step by step how to solve the quadratic equation x^2 - 5x + 6 = 0 and check",
    "def merge_sort(values):\n    \"\"\"Sorts a list of integers in ascending order.\"\"\"\n",
    "The weather today is sunny with a light breeze coming from the west, and the forecast",
    "Question: A train travels 120 km in 2 hours. What is its average speed? Answer:",
    "In a small village by the sea there lived an old fisherman who every morning went",
    "List five interesting facts about the planet Jupiter and its many moons, including",
)


def repeated_prompts(tokenizer, length: int) -> list[list[int]]:
  """Each text repeated until it has `length` tokens."""
  prompts = []
  for text in TEXTS:
    ids = tokenizer(text)["input_ids"]
    prompts.append((ids * (length // len(ids) + 1))[:length])
  return prompts


def _decode_step_roofline(config, rows: int, context: float, flops_peak: float,
                          bandwidth: float) -> dict:
  """Seconds of one decode step at the memory and compute rooflines (float32 weights)."""
  c = config
  attention = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = 3 * c.hidden_size * c.intermediate_size
  layer_params = c.num_layers * (attention + mlp)
  head_params = c.vocab_size * c.hidden_size
  weight_bytes = 4 * (layer_params + head_params * (1 if c.tie_word_embeddings else 2))
  matmul_flops = 2 * rows * (layer_params + head_params)
  attention_flops = 4 * rows * context * c.num_heads * c.head_dim * c.num_layers
  return {"weight_bytes": weight_bytes, "flops": matmul_flops + attention_flops,
          "memory_s": weight_bytes / bandwidth,
          "compute_s": (matmul_flops + attention_flops) / flops_peak}


def _decode_matmuls_s(model, rows: int) -> float:
  """Best seconds of one decode step's weight matmuls alone (all layers and the logits), as one
  jitted chain over the model's weights at `rows` rows, each product feeding the next."""

  def matmuls(x_NxD, layer_weights):
    for w in layer_weights:
      q = jnp.einsum("nd,dah->nah", x_NxD, w["wq"])
      kv = jnp.einsum("nd,dkh->nkh", x_NxD, w["wk"]) + jnp.einsum("nd,dkh->nkh", x_NxD, w["wv"])
      heads_NxF = (q + jnp.mean(kv)).reshape(rows, -1)  # Merged heads, as in decoder_layer.
      x_NxD = x_NxD + jnp.einsum("nf,fd->nd", heads_NxF, w["wo"].reshape(-1, w["wo"].shape[-1]))
      gate = jnp.einsum("nd,df->nf", x_NxD, w["w_gate"])
      gated = gate * jnp.einsum("nd,df->nf", x_NxD, w["w_up"])
      x_NxD = x_NxD + jnp.einsum("nf,fd->nd", gated, w["w_down"])
      x_NxD = x_NxD * jax.lax.rsqrt(jnp.mean(x_NxD * x_NxD))  # Keeps the chain finite.
    return model.logits(x_NxD[:, None])

  x_NxD = jax.random.normal(jax.random.key(0), (rows, model.config.hidden_size))
  return common.time_call(jax.jit(matmuls), x_NxD, model.layer_weights(), repeats=5)


def main(argv, as_json: bool):
  parser = argparse.ArgumentParser(prog="benchmark.py sampler")
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--n", type=int, default=8)
  parser.add_argument("--prompt-length", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--skip-transformers", action="store_true")
  parser.add_argument("--repeats", type=int, default=2,
                      help="timed runs per side after a warm-up, interleaved; medians reported")
  parser.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES,
                      help="the sampler's decode code (prerl_jax/sampler.py)")
  args = parser.parse_args(argv)

  model, tokenizer = load_model("smollm2-135m")
  prompts = repeated_prompts(tokenizer, args.prompt_length)[:args.prompts]
  rows = len(prompts) * args.n
  # No stop ids: every row generates all new tokens, as transformers does with min_new_tokens.
  config = SamplingConfig(max_new_tokens=args.new_tokens, pad_id=tokenizer.pad_token_id,
                          stop_ids=(), temperature=args.temperature, n=args.n)
  tokens, mask = prompt_batch(prompts, config)
  sampler = Sampler(model, kernels=args.kernels)
  state = nnx.state(model)
  start = time.perf_counter()
  jax.block_until_ready(sampler.sample(state, tokens, mask, jax.random.key(0), config))
  compile_and_first_s = time.perf_counter() - start
  sides = {"ours": lambda repeat: jax.block_until_ready(
      sampler.sample(state, tokens, mask, jax.random.key(repeat + 1), config))}
  if not args.skip_transformers:
    folder, name = presets.smollm2_gguf_path().rsplit("/", 1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                           dtype=torch.float32).eval()
    hf_inputs = dict(input_ids=torch.tensor(tokens).long(),
                     attention_mask=torch.tensor(mask).long(), do_sample=True,
                     temperature=args.temperature, top_k=0, top_p=1.0,
                     num_return_sequences=args.n, pad_token_id=tokenizer.pad_token_id)

    def hf_generate(new_tokens):
      with torch.no_grad():
        out = hf.generate(**hf_inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
      assert out.shape == (rows, tokens.shape[1] + new_tokens), out.shape

    hf_generate(2)  # Warm-up.
    sides["transformers"] = lambda _: hf_generate(args.new_tokens)
  runs = {side: [] for side in sides}
  for repeat in range(args.repeats):  # Interleaved: ours, transformers, ours, ...
    for side, generate in sides.items():
      before = os.getloadavg()[0]
      start = time.perf_counter()
      generate(repeat)
      runs[side].append({"s": time.perf_counter() - start, "load_before": before,
                         "load_after": os.getloadavg()[0]})
  ours_s = statistics.median(r["s"] for r in runs["ours"])
  generated = rows * args.new_tokens
  results = {"rows": rows, "new_tokens": args.new_tokens, "prompt_bucket": tokens.shape[1],
             "kernels": sampler.kernels, "runs": runs,
             "ours_s": ours_s, "ours_tokens_per_s": generated / ours_s,
             "ours_first_call_s": compile_and_first_s}
  if "transformers" in runs:
    hf_s = statistics.median(r["s"] for r in runs["transformers"])
    results.update(transformers_s=hf_s, transformers_tokens_per_s=generated / hf_s,
                   speedup_vs_transformers=hf_s / ours_s)

  flops_peak = common.matmul_peak_flops()
  bandwidth = common.memory_bandwidth()
  roofline = _decode_step_roofline(model.config, rows, tokens.shape[1] + args.new_tokens / 2,
                                   flops_peak, bandwidth)
  step_s = max(roofline["memory_s"], roofline["compute_s"])
  matmuls_s = _decode_matmuls_s(model, rows)
  results.update(decode_matmuls_s=matmuls_s, decode_matmuls_tokens_per_s=rows / matmuls_s,
                 fraction_of_decode_matmuls=generated / ours_s / (rows / matmuls_s),
                 matmul_peak_flops=flops_peak, memory_bandwidth=bandwidth,
                 roofline_step_s=step_s, roofline_tokens_per_s=rows / step_s,
                 fraction_of_roofline=generated / ours_s / (rows / step_s),
                 **{f"roofline_{k}": v for k, v in roofline.items()})

  results["peak_rss_bytes"] = common.peak_rss_bytes()

  lines = [
      f"sampler: SmolLM2-135M, {len(prompts)} prompts x n={args.n}, prompt bucket "
      f"{tokens.shape[1]}, {args.new_tokens} new tokens, float32, {jax.devices()[0].platform}, "
      f"{sampler.kernels} decode kernels",
      f"  ours:         {results['ours_tokens_per_s']:8.1f} tokens/s ({ours_s:.2f} s; first call "
      f"with compile {compile_and_first_s:.1f} s)",
      f"  roofline:     {results['roofline_tokens_per_s']:8.1f} tokens/s (step "
      f"{1e3 * roofline['memory_s']:.1f} ms memory at {bandwidth / 1e9:.1f} GB/s, "
      f"{1e3 * roofline['compute_s']:.1f} ms compute at {flops_peak / 1e9:.0f} GFLOP/s); "
      f"ours is {100 * results['fraction_of_roofline']:.0f}% of it",
      f"  matmuls only: {results['decode_matmuls_tokens_per_s']:8.1f} tokens/s (one step's weight "
      f"matmuls alone at {rows} rows: {1e3 * matmuls_s:.1f} ms); ours is "
      f"{100 * results['fraction_of_decode_matmuls']:.0f}% of it",
  ]
  if "transformers_s" in results:
    lines.append(f"  transformers: {results['transformers_tokens_per_s']:8.1f} tokens/s "
                 f"({results['transformers_s']:.2f} s); ours is "
                 f"{results['speedup_vs_transformers']:.2f}x (medians of {args.repeats} "
                 "interleaved runs each)")
  common.report(results, as_json, lines)
