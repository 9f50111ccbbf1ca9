"""Prompt token ids: the tokenizer's chat template, an optional system prompt, left truncation."""

import dataclasses
from typing import NamedTuple


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """How chat messages become prompt token ids."""

  max_prompt_tokens: int = 1024
  system_prompt: str | None = None  # None: keep the row's; "": drop it; text: replace or add it.
  enable_thinking: bool | None = None  # Qwen3: False selects the non-thinking template.


class EncodedPrompt(NamedTuple):
  """Prompt token ids and whether they were cut."""

  ids: list[int]
  truncated: bool  # True when the left end was cut to fit max_prompt_tokens.


def with_system_prompt(messages, system_prompt: str | None) -> list[dict[str, str]]:
  """Messages with the system message kept (None), dropped ("") or replaced / added (text)."""
  messages = [dict(m) for m in messages]
  if system_prompt is None:
    return messages
  rest = [m for m in messages if m["role"] != "system"]
  if not system_prompt:
    return rest
  return [{"role": "system", "content": system_prompt}] + rest


def prompt_text(tokenizer, messages, config: PromptConfig) -> str:
  """The chat-templated prompt text, ending with the assistant turn header."""
  extra = {} if config.enable_thinking is None else {"enable_thinking": config.enable_thinking}
  return tokenizer.apply_chat_template(with_system_prompt(messages, config.system_prompt),
                                       tokenize=False, add_generation_prompt=True, **extra)


def encode_prompt(tokenizer, messages, config: PromptConfig) -> EncodedPrompt:
  """Prompt token ids, left-truncated to the last config.max_prompt_tokens ids."""
  ids = tokenizer.encode(prompt_text(tokenizer, messages, config), add_special_tokens=False)
  truncated = len(ids) > config.max_prompt_tokens
  return EncodedPrompt(ids[-config.max_prompt_tokens:] if truncated else ids, truncated)
