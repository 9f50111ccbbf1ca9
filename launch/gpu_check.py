"""GPU check: sampler tokens/s against the HBM roofline, train-step MFU, one RL step's time split.

`python launch/gpu_check.py [--size=full|tiny] [--json]`, run by launch/gpu_check.sh after its
install block and the kernel tests. `full`: a Qwen3-1.7B-shaped model with random weights on the
default device (one H100/H200, a few minutes); `tiny`: a 2-layer model, so the script can be
checked on a CPU in seconds. Peaks are the chip's datasheet dense bf16 FLOP/s and HBM bandwidth
when its kind is known (H100, H200), else the ones measured here (benchmarks/common.py).

- sampler: 32 prompts x n=8 = 256 rows, bf16 weights and compute, no stop tokens (every row
  decodes all new tokens); roofline of a decode step = (weight bytes + the KV cache it reads at
  the mean context) / HBM bandwidth.
- train step: GRPO (conditional) on random tokens, float32 params and Adam, bf16 compute, remat;
  MFU = model FLOPs (3 x the forward's matmuls, benchmarks/train.py) / time / bf16 peak.
- RL step: sample, score (a length reward on the host, in place of a math verifier) and update,
  as the trainer runs them, float32 params and bf16 compute; the second step is timed.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common as bench_common, train as bench_train  # noqa: E402
from prerl_jax.generate.sampler import Sampler, SamplingConfig  # noqa: E402
from prerl_jax.models import presets
from prerl_jax.models.config import ModelConfig
from prerl_jax.models.loading import random_model
from prerl_jax.rl import train_step
from prerl_jax.rl.batch import from_samples
from prerl_jax.rl.objective import get_objective

# Datasheet peaks by device kind: (dense bf16 FLOP/s, HBM bytes/s).
DATASHEET = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
SIZES = {
    # model, prompts, n, prompt length, new tokens (sampler); batch, response length,
    # micro-batches (train step); prompts, new tokens (RL step).
    "full": dict(model="qwen3-1.7b", prompts=32, n=8, prompt_len=256, new_tokens=512,
                 train_batch=32, train_prompt_len=512, train_response_len=1536,
                 micro_batches=8, rl_prompts=32, rl_new_tokens=512),
    "tiny": dict(model="tiny", prompts=4, n=2, prompt_len=64, new_tokens=32,
                 train_batch=8, train_prompt_len=64, train_response_len=64,
                 micro_batches=2, rl_prompts=4, rl_new_tokens=32),
}
TINY = dict(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
            max_position_embeddings=4096)


def model_config(name: str, **dtypes) -> ModelConfig:
  if name == "tiny":
    return ModelConfig.from_hf_dict(TINY, source="gpu_check tiny", **dtypes)
  return presets.preset_model_config(name, **dtypes)


def peaks() -> tuple[float, float, str]:
  """(bf16 FLOP/s, HBM bytes/s, where they come from) of the default device."""
  kind = jax.devices()[0].device_kind
  for name, (flops, bandwidth) in DATASHEET.items():
    if name in kind:
      return flops, bandwidth, f"{kind} datasheet"
  return (bench_common.matmul_peak_flops(dtype=jnp.bfloat16), bench_common.memory_bandwidth(),
          f"{kind} measured here")


def random_prompts(vocab: int, prompts: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  return rng.integers(3, vocab, (prompts, length), dtype=np.int32), np.ones((prompts, length), bool)


def sampler_check(size: dict, bandwidth: float) -> dict:
  """Tokens/s of the sampler at size['prompts'] x size['n'] rows and its HBM-roofline share."""
  config = model_config(size["model"], param_dtype="bfloat16", dtype="bfloat16")
  model = random_model(config)
  tokens, mask = random_prompts(config.vocab_size, size["prompts"], size["prompt_len"])
  sampling = SamplingConfig(max_new_tokens=size["new_tokens"], pad_id=0, stop_ids=(),
                            n=size["n"], prompt_buckets=(size["prompt_len"],))
  sampler, state = Sampler(model, kernels="xla"), nnx.state(model)
  first_s, seconds = bench_common.time_first_and_best(
      lambda key: sampler.sample(state, tokens, mask, key, sampling), jax.random.key(0),
      jax.random.key(1), repeats=2)
  rows = size["prompts"] * size["n"]
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  context = size["prompt_len"] + size["new_tokens"] / 2
  kv_bytes = (2 * config.num_layers * config.num_kv_heads * config.head_dim
              * config.compute_dtype.itemsize * context * rows)
  roofline_step_s = (weight_bytes + kv_bytes) / bandwidth
  tokens_per_s = rows * size["new_tokens"] / seconds
  return {"rows": rows, "new_tokens": size["new_tokens"], "seconds": seconds,
          "first_call_s": first_s, "tokens_per_s": tokens_per_s,
          "roofline_tokens_per_s": rows / roofline_step_s,
          "fraction_of_hbm_roofline": tokens_per_s * roofline_step_s / rows,
          "weight_bytes": weight_bytes, "kv_bytes_per_step": kv_bytes}


def train_check(size: dict, flops_peak: float) -> dict:
  """Seconds and MFU of one GRPO train step on random tokens (the second of two)."""
  config = model_config(size["model"], param_dtype="float32", dtype="bfloat16", remat="full")
  optimizer = train_step.make_optimizer()
  graphdef, state = train_step.init_train_state(random_model(config), optimizer)
  batch = bench_train.random_batch(config.vocab_size, size["train_batch"],
                                   size["train_prompt_len"], size["train_response_len"], 8)
  step = train_step.make_train_step(graphdef, get_objective("grpo"), optimizer, group_size=8,
                                    micro_batches=size["micro_batches"])
  compile_s, seconds, _ = bench_train.time_steps(step, state, batch, repeats=2)
  flops = bench_train.step_flops(config, size["train_batch"], size["train_prompt_len"],
                                 size["train_response_len"])
  return {"batch": size["train_batch"], "prompt_len": size["train_prompt_len"],
          "response_len": size["train_response_len"], "micro_batches": size["micro_batches"],
          "compile_s": compile_s, "step_s": seconds, "flops": flops,
          "mfu": flops / seconds / flops_peak}


def rl_step_check(size: dict) -> dict:
  """Time split (sample, score, update) of the second of two RL steps on random prompts."""
  config = model_config(size["model"], param_dtype="float32", dtype="bfloat16", remat="full")
  model = random_model(config)
  optimizer = train_step.make_optimizer()
  sampler = Sampler(model, kernels="xla")
  graphdef, state = train_step.init_train_state(model, optimizer)
  group = 8
  sampling = SamplingConfig(max_new_tokens=size["rl_new_tokens"], pad_id=0, stop_ids=(1,),
                            n=group, prompt_buckets=(size["prompt_len"],))
  step = train_step.make_train_step(graphdef, get_objective("grpo"), optimizer,
                                    group_size=group, micro_batches=size["micro_batches"])
  tokens, mask = random_prompts(config.vocab_size, size["rl_prompts"], size["prompt_len"])
  times = {}
  for seed in range(2):
    start = time.perf_counter()
    out = jax.device_get(sampler.sample(state.params, tokens, mask, jax.random.key(seed),
                                        sampling))
    times["sample_s"] = time.perf_counter() - start
    start = time.perf_counter()
    rewards = (out.lengths_N > np.median(out.lengths_N)).astype(np.float32)
    batch = from_samples(out, rewards)
    times["score_s"] = time.perf_counter() - start
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times["update_s"] = time.perf_counter() - start
  times["step_s"] = sum(times.values())
  return {"rows": size["rl_prompts"] * group, "new_tokens": size["rl_new_tokens"], **times,
          "loss_finite": bool(np.isfinite(float(metrics["loss"])))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="full")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args()
  size = SIZES[args.size]
  flops_peak, bandwidth, source = peaks()
  device = jax.devices()[0]
  results = {"size": args.size, "model": size["model"], "device": device.device_kind,
             "platform": device.platform, "peaks_from": source, "bf16_flops_peak": flops_peak,
             "hbm_bandwidth": bandwidth}
  header = (f"gpu check ({args.size}: {size['model']}, random weights) on {device.platform} "
            f"{device.device_kind}; peaks ({source}) {flops_peak / 1e12:.0f} TFLOP/s bf16, "
            f"{bandwidth / 1e9:.0f} GB/s")
  if not args.json:
    print(header, flush=True)
  for name, check, describe in (("sampler", lambda: sampler_check(size, bandwidth), _sampler_line),
                                ("train_step", lambda: train_check(size, flops_peak), _train_line),
                                ("rl_step", lambda: rl_step_check(size), _rl_line)):
    start = time.perf_counter()
    results[name] = check()
    results[name]["check_s"] = time.perf_counter() - start
    if not args.json:  # Each figure as soon as it exists: a later check may fail or time out.
      print(describe(results[name]), f"[{results[name]['check_s']:.0f} s]", flush=True)
  if args.json:
    print(json.dumps(results, indent=2))


def _sampler_line(s: dict) -> str:
  return (f"  sampler: {s['tokens_per_s']:.0f} tokens/s at batch {s['rows']} ({s['new_tokens']} "
          f"new tokens, {s['seconds']:.2f} s; first call {s['first_call_s']:.1f} s) = "
          f"{100 * s['fraction_of_hbm_roofline']:.0f}% of the HBM roofline "
          f"({s['roofline_tokens_per_s']:.0f} tokens/s)")


def _train_line(t: dict) -> str:
  return (f"  train step: {t['step_s']:.2f} s for {t['batch']} x ({t['prompt_len']} + "
          f"{t['response_len']}) tokens, {t['micro_batches']} micro-batches: MFU "
          f"{100 * t['mfu']:.1f}% (compile {t['compile_s']:.0f} s)")


def _rl_line(r: dict) -> str:
  return (f"  RL step ({r['rows']} rows, up to {r['new_tokens']} new tokens): sample "
          f"{r['sample_s']:.2f} s, score {r['score_s']:.2f} s, update {r['update_s']:.2f} s = "
          f"{r['step_s']:.2f} s (loss finite: {r['loss_finite']})")


if __name__ == "__main__":
  main()
