"""Tokenizer loading (from the same checkpoint as the weights) and special-token lookups."""

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile

import transformers

from prerl_jax.errors import UserError
from prerl_jax.training import caches


# Files any one of which holds a vocabulary transformers can load from a checkpoint directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")


def _check_tokenizer_files(directory: str) -> None:
  """An error naming the directory when it holds no tokenizer vocabulary file."""
  if not any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES):
    raise UserError(f"{directory}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                    "copy the tokenizer files of the same model into this directory")


def _cache_dir(checkpoint: str) -> str:
  """Where the tokenizer converted from a GGUF file is kept, keyed by the file's identity."""
  stat = os.stat(checkpoint)
  key = hashlib.sha256(f"{os.path.abspath(checkpoint)}:{stat.st_size}:{stat.st_mtime_ns}"
                       .encode()).hexdigest()[:16]
  return os.path.join(caches.cache_root(), "tokenizers", key)


def _make_parent(path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return os.path.dirname(path)


@functools.lru_cache(maxsize=8)
def load_tokenizer(checkpoint: str) -> transformers.PreTrainedTokenizerBase:
  """Loads the tokenizer of a Hugging Face directory or a .gguf file.

  Converting a GGUF vocabulary takes seconds, so the converted tokenizer is saved under
  $PRERL_JAX_CACHE (default ~/.cache/prerl_jax) and reused while the file is unchanged.
  """
  if checkpoint.endswith(".gguf"):
    cached = _cache_dir(checkpoint)
    if os.path.isfile(os.path.join(cached, "tokenizer.json")):
      tokenizer = transformers.AutoTokenizer.from_pretrained(cached)
    else:
      if importlib.util.find_spec("torch") is None:
        raise ModuleNotFoundError(
            f"{checkpoint}: converting a GGUF tokenizer goes through transformers' GGUF reader, "
            "which imports torch; install it with: pip install 'prerl_jax[gguf]' (the CPU "
            "build is enough)")
      folder, name = os.path.split(os.path.abspath(checkpoint))
      tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
      staging = tempfile.mkdtemp(dir=_make_parent(cached))
      tokenizer.save_pretrained(staging)
      try:
        os.rename(staging, cached)  # Atomic: readers never see a half-written cache.
      except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # Another process got there first.
  else:
    _check_tokenizer_files(checkpoint)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def chat_turn_start_id(tokenizer) -> int:
  """Id of the chat-turn start token (`<|im_start|>`), else the bos token: the marginal BOS."""
  token_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
  if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
    return token_id
  if tokenizer.bos_token_id is None:
    raise UserError("The tokenizer has neither <|im_start|> nor a bos token; set the BOS id "
                    "for marginal scoring explicitly")
  return tokenizer.bos_token_id


def stop_token_ids(tokenizer) -> tuple[int, ...]:
  """Ids that end a response: eos plus the chat-turn end token where the vocabulary has one."""
  ids = {tokenizer.eos_token_id}
  end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  if isinstance(end, int) and end >= 0 and end != tokenizer.unk_token_id:
    ids.add(end)
  return tuple(sorted(i for i in ids if i is not None))
