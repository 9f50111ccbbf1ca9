"""Tests for prompt encoding (chat template, left truncation) and the grain batch pipeline."""

import json
import pathlib

import numpy as np
import pytest
import run_fixtures

from prerl_jax.data import pipeline as data_pipeline
from prerl_jax.data import datasets
from prerl_jax.data import prompts
from prerl_jax.models.presets import smollm2_gguf_path
from prerl_jax.models.tokenizer import chat_turn_start_id
from prerl_jax.models.tokenizer import load_tokenizer

DATA_DIR = pathlib.Path(run_fixtures.SHARED_DATA)
QUESTION = "What is 2 + 3?"


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer(smollm2_gguf_path())


def _problem(i: int) -> datasets.Problem:
  return datasets.Problem(({"role": "user", "content": f"q{i}"},), str(i), "toy", str(i))


def _fake_encode(problem: datasets.Problem) -> prompts.EncodedPrompt:
  value = int(problem.index)
  return prompts.EncodedPrompt([value + 1] * (value % 3 + 1), value % 3 == 2)


def _indices(batches) -> list[list[int]]:
  return [[int(p.index) for p in batch["problems"]] for batch in batches]


def _batches(num_problems=10, process_index=0, process_count=1, seed=0, **kwargs):
  settings = dict(global_batch_size=4, num_epochs=3, seed=seed, pad_id=0, max_prompt_tokens=4)
  settings.update(kwargs)
  return data_pipeline.prompt_batches([_problem(i) for i in range(num_problems)], _fake_encode,
                                      process_index=process_index, process_count=process_count,
                                      **settings)


def test_smollm2_prompt_text_and_ids(tokenizer):
  messages = [{"role": "system", "content": "Reason, then box."},
              {"role": "user", "content": QUESTION}]
  config = prompts.PromptConfig(max_prompt_tokens=1024)
  expected = ("<|im_start|>system\nReason, then box.<|im_end|>\n<|im_start|>user\n"
              f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
  assert prompts.prompt_text(tokenizer, messages, config) == expected
  replaced = prompts.PromptConfig(system_prompt="Be brief.")
  assert prompts.prompt_text(tokenizer, messages, replaced).startswith(
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
  encoded = prompts.encode_prompt(tokenizer, messages, config)
  assert not encoded.truncated
  assert encoded.ids[0] == chat_turn_start_id(tokenizer) and encoded.ids[1] != encoded.ids[0]
  assert tokenizer.decode(encoded.ids) == expected
  short = prompts.encode_prompt(tokenizer, messages, prompts.PromptConfig(max_prompt_tokens=8))
  assert short.truncated and short.ids == encoded.ids[-8:]
  assert tokenizer.decode(short.ids).endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"{DATA_DIR} not present")
def test_eval_file_batches_with_real_tokenizer(tokenizer):
  problems = datasets.load_rl_file(str(DATA_DIR / "aime_2024_20times.parquet")).problems
  config = prompts.PromptConfig(max_prompt_tokens=128)
  batches = data_pipeline.prompt_batches(
      problems, lambda p: prompts.encode_prompt(tokenizer, p.messages, config),
      global_batch_size=8, num_epochs=1, seed=0, pad_id=tokenizer.pad_token_id,
      max_prompt_tokens=128, shuffle=False, process_index=0, process_count=1)
  assert len(batches) == 75
  batch = batches[0]
  assert batch["prompt_ids"].shape == (8, 128) and batch["prompt_ids"].dtype == np.int32
  first_ids = prompts.encode_prompt(tokenizer, problems[0].messages,
                                    prompts.PromptConfig(max_prompt_tokens=10_000)).ids
  length = int(batch["prompt_lengths"][0])
  assert batch["prompt_truncated"][0] == (len(first_ids) > 128)
  assert batch["prompt_ids"][0, -length:].tolist() == first_ids[-128:]
  assert (batch["prompt_ids"][0, :128 - length] == tokenizer.pad_token_id).all()
  assert batch["problems"][0].ground_truth == "540"


class _RecordingTokenizer:
  def __init__(self):
    self.calls = []

  def apply_chat_template(self, messages, **kwargs):
    self.calls.append((messages, kwargs))
    return "|".join(m["content"] for m in messages)


def test_system_prompt_options_and_enable_thinking():
  fake = _RecordingTokenizer()
  messages = ({"role": "system", "content": "S"}, {"role": "user", "content": "U"})
  assert prompts.prompt_text(fake, messages, prompts.PromptConfig()) == "S|U"
  assert prompts.prompt_text(fake, messages, prompts.PromptConfig(system_prompt="")) == "U"
  assert prompts.prompt_text(fake, messages[1:], prompts.PromptConfig(system_prompt="N")) == "N|U"
  prompts.prompt_text(fake, messages, prompts.PromptConfig(enable_thinking=False))
  assert fake.calls[0][1] == {"tokenize": False, "add_generation_prompt": True}
  assert fake.calls[-1][1]["enable_thinking"] is False


def test_left_padding_lengths_and_truncation_flags():
  batch = _batches(shuffle=False)[0]
  assert batch["prompt_ids"].tolist() == [[0, 0, 0, 1], [0, 0, 2, 2], [0, 3, 3, 3], [0, 0, 0, 4]]
  assert batch["prompt_lengths"].tolist() == [1, 2, 3, 1]
  assert batch["prompt_truncated"].tolist() == [False, False, True, False]


def test_shuffle_is_deterministic_and_reshuffled_each_epoch():
  order = _indices(_batches(seed=7))
  assert order == _indices(_batches(seed=7))
  assert order != _indices(_batches(seed=8))
  assert len(order) == 6  # 10 problems, batches of 4: 2 per epoch, the remainder dropped.
  epochs = [sum(order[2 * e:2 * e + 2], []) for e in range(3)]
  for epoch in epochs:
    assert len(set(epoch)) == 8 and set(epoch) <= set(range(10))
  assert epochs[0] != epochs[1]


def test_processes_split_each_global_batch():
  global_order = _indices(_batches(seed=3))
  shards = [_indices(_batches(seed=3, process_index=i, process_count=2)) for i in range(2)]
  assert [a + b for a, b in zip(*shards)] == global_order
  with pytest.raises(ValueError, match="global_batch_size 4 is not divisible by process_count 3"):
    _batches(process_count=3)
  with pytest.raises(ValueError, match="3 problems do not fill one batch of 4"):
    _batches(num_problems=3)


def test_resumed_iterator_continues_the_same_order():
  iterator = data_pipeline.resumable_iterator(_batches(seed=5))
  for _ in range(3):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))
  rest = _indices(iterator)
  resumed = data_pipeline.resumable_iterator(_batches(seed=5))
  resumed.set_state(state)
  assert _indices(resumed) == rest
  assert rest == _indices(_batches(seed=5))[3:]
