"""A tiny trainable checkpoint with SmolLM2's tokenizer, and a small run config, for trainer tests."""

import os

import transformers

from prerl_jax.models.presets import smollm2_gguf_path
from prerl_jax.training.run_config import make_config, set_from_text
from prerl_jax.models.tokenizer import load_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")  # The project's data files.


def save_tiny_chat_model(directory: str, seed: int = 0) -> str:
  """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer, saved as a HF directory."""
  import torch  # pylint: disable=import-outside-toplevel
  tokenizer = load_tokenizer(smollm2_gguf_path())
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  model.save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  return directory


def tiny_run_overrides(model_dir: str, run_dir: str, steps: int = 4) -> list[str]:
  """Command-line overrides that make a run fast: tiny model, few prompts, short responses."""
  return [
      f"--config.model.name={model_dir}", f"--config.train.run_dir={run_dir}",
      f"--config.train.steps={steps}", "--config.train.checkpoint_every=2",
      "--config.rollout.prompts_per_step=2", "--config.rollout.group_size=4",
      "--config.rollout.max_new_tokens=8", "--config.data.train_size=32",
      "--config.data.eval_size=4", "--config.eval.at_start=false", "--config.eval.at_end=false",
      "--config.optim.micro_batches=1", "--config.optim.learning_rate=0.01",
      "--config.mesh.fsdp=1", "--config.eval.prompts_per_call=2",
  ]


def tiny_config(objective: str, model_dir: str, run_dir: str, steps: int = 4):
  """The same settings as tiny_run_overrides, as a ConfigDict for in-process runs."""
  config = make_config(objective)
  for override in tiny_run_overrides(model_dir, run_dir, steps):
    key, value = override[len("--config."):].split("=", 1)
    set_from_text(config, key, value)
  return config
