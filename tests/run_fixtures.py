"""A tiny trainable checkpoint with SmolLM2's tokenizer, run configs as tpu_run.py parses them,
and other values for every objective key, for trainer and config tests."""

import dataclasses
import os

import transformers
from absl import flags
from ml_collections import config_flags

from prerl_jax.models.presets import smollm2_gguf_path
from prerl_jax.models.tokenizer import load_tokenizer
from prerl_jax.rl import losses, objective as objective_lib
from prerl_jax.rl.schedule import schedule_from_config

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


def parse_config(name: str, arg: str = "", overrides=()):
  """The config launch/tpu_run.py parses from `--config=configs/<name>.py:<arg> *overrides`."""
  path = os.path.join(REPO_ROOT, "configs", f"{name}.py")
  argv = ["tpu_run.py", f"--config={path}:{arg}" if arg else f"--config={path}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Run config file.", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def tiny_config(objective: str, model_dir: str, run_dir: str, steps: int = 4, overrides=()):
  """The settings of tiny_run_overrides and then `overrides`, for in-process runs."""
  return parse_config(objective, overrides=(*tiny_run_overrides(model_dir, run_dir, steps),
                                            *overrides))


def _names_in(*modules) -> list[str]:
  """Every name in the modules' tuples of names: the values a str field may take."""
  return [name for module in modules for value in vars(module).values()
          if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value)
          for name in value]


def _candidates(current) -> list:
  if isinstance(current, bool):
    return [not current]
  if isinstance(current, (int, float)):
    return [None, current + 0.5, current + 1, current / 2]
  if isinstance(current, str):
    return _names_in(losses, objective_lib)
  if current is None:
    return [2.0, 0.5, 1, True, *_names_in(losses, objective_lib)]
  return []


def changed_objective_overrides(name: str, section: str = "objective") -> dict:
  """key -> (command-line text, value) for every Objective field of `section` in
  configs/<name>.py: a value other than the config's that the schedule accepts alone."""
  index = {"objective": -1, "objective.warmup": 0}[section]
  fields = parse_config(name).objective
  if section == "objective.warmup":
    fields = fields.warmup
  changed = {}
  for field in dataclasses.fields(objective_lib.Objective):
    for value in _candidates(fields[field.name]):
      if value == fields[field.name]:
        continue
      text = str(value)
      try:
        config = parse_config(name, overrides=[f"--config.{section}.{field.name}={text}"])
        got = getattr(schedule_from_config(config.objective).phases[index].objective, field.name)
      except (ValueError, TypeError, flags.Error):
        continue
      if got == value:
        changed[field.name] = (text, value)
        break
    else:
      raise AssertionError(f"no other value found for {section}.{field.name} (from "
                           f"{fields[field.name]!r}): teach run_fixtures._candidates its type")
  return changed
