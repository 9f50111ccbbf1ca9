"""Gradient alignment of log P(y) and log P(y|x) on sampled or given responses.

python launch/grad_alignment.py [--model smollm2-135m] [--jsonl pairs.jsonl | --run_config cpu]
    [--json]

Without --jsonl, the model samples --samples_per_prompt responses to a few arithmetic questions,
or, with --run_config PRESET, to the first --prompts training problems of that run config's task
(with its system prompt: the base model on its own rollouts of the task it will be trained on).
A JSONL row is {"prompt": user message, "response": assistant text}; the prompt gets the chat
template, the response is tokenized as is. Paper (Qwen3-4B, AMC23): inner product positive for
every sample, mean cosine 0.44.
"""

import argparse
import json
import os
import sys

import jax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configs  # noqa: E402
from prerl_jax.rl import grad_alignment  # noqa: E402
from prerl_jax.rl.batch import RolloutBatch, from_samples, from_token_lists  # noqa: E402
from prerl_jax.sharding import to_host  # noqa: E402
from prerl_jax.models.loading import load_model  # noqa: E402
from prerl_jax.data.prompts import PromptConfig, encode_prompt  # noqa: E402
from prerl_jax.generate.sampler import Sampler, SamplingConfig, prompt_batch  # noqa: E402
from prerl_jax.data.task_data import load_task_data  # noqa: E402
from prerl_jax.models.tokenizer import chat_turn_start_id  # noqa: E402

QUESTIONS = (
    "What is 17 + 25?",
    "What is 9 times 8?",
    "What is 144 divided by 12?",
    "If I have 23 apples and eat 7, how many are left?",
    "What is 15% of 200?",
    "What is 3 squared plus 4 squared?",
)


def read_pairs(path: str) -> list[tuple[str, str]]:
  """(prompt, response) texts of a JSONL file; a bad row raises an error naming file and line."""
  pairs = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        pairs.append((str(row["prompt"]), str(row["response"])))
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{number}: expected a JSON object with 'prompt' and "
                         f"'response' ({e!r})") from None
  if not pairs:
    raise ValueError(f"{path}: no rows")
  return pairs


def question_prompts(tokenizer, args) -> list[list[int]]:
  """Prompt ids of the built-in questions, or of a run config's first training problems."""
  if not args.run_config:
    return [encode_prompt(tokenizer, [{"role": "user", "content": q}], PromptConfig()).ids
            for q in QUESTIONS]
  config = configs.get_config("grpo", args.run_config)
  data = load_task_data(config.data, config.reward)
  try:
    return [encode_prompt(tokenizer, problem.messages, data.prompt_config).ids
            for problem in data.train[:args.prompts]]
  finally:
    data.close()


def build_batch(model, tokenizer, args) -> RolloutBatch:
  """Prompt and response arrays, from the JSONL file or sampled by the model."""
  pad = tokenizer.pad_token_id
  if args.jsonl:
    pairs = read_pairs(args.jsonl)
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": p}], PromptConfig()).ids
               for p, _ in pairs]
    responses = [tokenizer.encode(r, add_special_tokens=False) for _, r in pairs]
    if any(not r for r in responses):
      raise ValueError(f"{args.jsonl}: a response tokenizes to nothing")
    return from_token_lists(prompts, responses, pad)
  config = SamplingConfig.from_tokenizer(
      tokenizer, args.max_new_tokens, greedy=args.temperature == 0,
      temperature=args.temperature or 1.0, n=args.samples_per_prompt)
  tokens, mask = prompt_batch(question_prompts(tokenizer, args), config)
  out = Sampler(model).sample(nnx.state(model), tokens, mask, jax.random.key(args.seed), config)
  return from_samples(to_host(out))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="smollm2-135m", help="preset or checkpoint path")
  parser.add_argument("--jsonl", help="prompt/response pairs instead of sampling")
  parser.add_argument("--run_config", help="sample on this run-config preset's task (cpu, ...)")
  parser.add_argument("--prompts", type=int, default=8, help="problems used with --run_config")
  parser.add_argument("--samples_per_prompt", type=int, default=2)
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=1.0,
                      help="sampling and scoring temperature (0 samples greedily, scores at 1)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args()

  model, tokenizer = load_model(args.model)
  batch = build_batch(model, tokenizer, args)
  result = grad_alignment.alignment(model, batch, chat_turn_start_id(tokenizer),
                                    temperature=args.temperature or 1.0)
  summary = grad_alignment.summarize(result, batch.response_mask)
  if args.json:
    print(json.dumps({"summary": summary, "inner": result["inner"].tolist(),
                      "cosine": result["cosine"].tolist()}, indent=2))
    return
  print(f"{summary['samples']} samples, {args.model}: inner product mean "
        f"{summary['inner_mean']:.3f} (min {summary['inner_min']:.3f}, max "
        f"{summary['inner_max']:.3f}), {summary['percent_negative']:.1f}% negative, mean cosine "
        f"{summary['cosine_mean']:.3f}")
  print(f"token log P(y|x) - log P(y): mean {summary['token_logp_diff_mean']:.3f}; mean |diff| "
        f"first {grad_alignment.EARLY_TOKENS} tokens {summary['token_abs_diff_early']:.3f}, "
        f"later {summary['token_abs_diff_late']:.3f}")


if __name__ == "__main__":
  main()
