"""Readers of weight files (safetensors directories and GGUF files) as named numpy tensors.

Both present tensors under Hugging Face names and layouts, read lazily one at a time, so a
loader never holds more than one tensor on the host beyond what it has placed.
"""

import json
import os
import struct

import gguf
import ml_dtypes
import numpy as np

from prerl_jax.errors import UserError

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _json_object(path: str, data: bytes) -> dict:
  """The JSON object in data, read from path; an error naming the path when it is not one."""
  try:
    value = json.loads(data)
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise UserError(f"{path}: not valid JSON ({error})") from None
  if not isinstance(value, dict):
    raise UserError(f"{path}: expected a JSON object ({{...}}), found a JSON "
                    f"{_JSON_TYPES[type(value)]}")
  return value


def _json_file(path: str) -> dict:
  """The JSON object of a file; an error naming it when it is not one."""
  with open(path, "rb") as f:
    return _json_object(path, f.read())


class SafetensorsCheckpoint:
  """A Hugging Face checkpoint directory: config.json plus one or more .safetensors files."""

  def __init__(self, directory: str):
    self.directory = directory
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
      raise UserError(f"{directory}: no config.json (not a Hugging Face checkpoint)")
    self.hf_config = _json_file(config_path)
    self.config_source = config_path
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index_path):
      weight_map = _json_file(index_path).get("weight_map")
      if not isinstance(weight_map, dict) or not all(isinstance(f, str)
                                                     for f in weight_map.values()):
        raise UserError(f"{index_path}: expected a \"weight_map\" object of tensor -> file name")
      files = sorted(set(weight_map.values()))
      for name in files:
        if not os.path.isfile(os.path.join(directory, name)):
          raise UserError(f"{index_path}: lists {name!r}, which is not in {directory}")
    else:
      files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
      raise UserError(f"{directory}: no .safetensors files")
    self._entries = {}
    for name in files:
      self._read_header(os.path.join(directory, name))

  def _read_header(self, path: str):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise UserError(f"{path}: truncated safetensors file (no header)")
      (header_len,) = struct.unpack("<Q", raw)
      if 8 + header_len > size:
        raise UserError(f"{path}: truncated safetensors file (header of {header_len} bytes)")
      header = _json_object(f"{path} (safetensors header)", f.read(header_len))
    header.pop("__metadata__", None)
    for tensor_name, info in header.items():
      try:
        (begin, end), dtype, shape = info["data_offsets"], info["dtype"], tuple(info["shape"])
      except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: tensor {tensor_name!r} has a malformed header entry {info!r} "
                        "(expected dtype, shape and data_offsets)") from None
      if 8 + header_len + end > size:
        raise UserError(f"{path}: truncated safetensors file; tensor {tensor_name!r} ends at "
                        f"byte {8 + header_len + end} of {size}")
      if dtype not in _SAFETENSORS_DTYPES:
        raise UserError(f"{path}: tensor {tensor_name!r} has unsupported dtype {dtype}")
      self._entries[tensor_name] = (path, 8 + header_len + begin, dtype, shape)

  @property
  def names(self) -> set[str]:
    return set(self._entries)

  @property
  def stored_tensors(self) -> list[tuple[str, str, str]]:
    """(file, name in the file, Hugging Face name) of every tensor the checkpoint holds."""
    return [(path, name, name) for name, (path, *_) in self._entries.items()]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][3]

  def where(self, name: str) -> str:
    return self._entries[name][0]

  def read(self, name: str) -> np.ndarray:
    path, offset, dtype, shape = self._entries[name]
    return np.memmap(path, dtype=_SAFETENSORS_DTYPES[dtype], mode="r", offset=offset,
                     shape=shape)


# GGUF tensor name (after `blk.{i}.`) -> Hugging Face name (after `model.layers.{i}.`).
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name_of_gguf(name: str) -> str | None:
  if name in _GGUF_GLOBAL_NAMES:
    return _GGUF_GLOBAL_NAMES[name]
  if name.startswith("blk."):
    _, layer, rest = name.split(".", 2)
    if rest in _GGUF_LAYER_NAMES:
      return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[rest]}"
  return None


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's reordering of q/k rows (interleaved rotary pairs -> rotate_half halves)."""
  half = weight.shape[0] // num_heads // 2
  return (weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2)
          .reshape(weight.shape))


class GGUFCheckpoint:
  """A GGUF file (llama / qwen2 / qwen3 architectures), dequantized to float32 on read."""

  def __init__(self, path: str):
    self.path = path
    try:
      reader = gguf.GGUFReader(path)
    except Exception as e:  # The gguf package raises assorted errors on damaged files.
      raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    self._reader = reader
    self._fields = {k: f.contents() for k, f in reader.fields.items()
                    if not k.startswith("tokenizer.")}
    size = os.path.getsize(path)
    self._tensors = {}
    self._stored_names = []  # (name in the file, Hugging Face name or None) of every tensor.
    for tensor in reader.tensors:
      block, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
      expected = int(tensor.n_elements) // block * type_size
      end = int(tensor.data_offset) + expected
      if tensor.data.nbytes < expected or end > size:
        raise UserError(f"{path}: truncated GGUF file; tensor {tensor.name!r} ends at byte "
                        f"{end} of {size}")
      hf_name = _hf_name_of_gguf(tensor.name)
      self._stored_names.append((tensor.name, hf_name))
      if hf_name is not None:
        self._tensors[hf_name] = tensor
    self.config_source = path
    self.hf_config = self._hf_config()

  def _field(self, key: str, default=None):
    arch = self._fields.get("general.architecture")
    return self._fields.get(f"{arch}.{key}", default)

  def _hf_config(self) -> dict:
    arch = self._fields.get("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
      return {"model_type": arch}
    missing = [k for k in ("block_count", "embedding_length", "feed_forward_length",
                           "attention.head_count") if self._field(k) is None]
    if missing:
      raise UserError(f"{self.path}: GGUF metadata lacks {arch}.{missing[0]}")
    embed = self._tensors.get("model.embed_tokens.weight")
    if embed is None:
      raise UserError(f"{self.path}: GGUF file has no tensor 'token_embd.weight'")
    num_heads = int(self._field("attention.head_count"))
    hidden = int(self._field("embedding_length"))
    hf = dict(
        model_type=arch,
        vocab_size=int(embed.shape[1]),
        hidden_size=hidden,
        intermediate_size=int(self._field("feed_forward_length")),
        num_hidden_layers=int(self._field("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(self._field("attention.head_count_kv", num_heads)),
        head_dim=int(self._field("attention.key_length", hidden // num_heads)),
        rope_theta=float(self._field("rope.freq_base", 10000.0)),
        rms_norm_eps=float(self._field("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(self._field("context_length", 2048)),
        tie_word_embeddings="lm_head.weight" not in self._tensors,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in self._tensors,
    )
    scaling_type = self._field("rope.scaling.type")
    if scaling_type not in (None, "none"):
      hf["rope_scaling"] = {"rope_type": scaling_type,
                            "factor": float(self._field("rope.scaling.factor", 1.0))}
    return hf

  @property
  def names(self) -> set[str]:
    return set(self._tensors)

  @property
  def stored_tensors(self) -> list[tuple[str, str, str | None]]:
    """(file, name in the file, Hugging Face name or None if unknown) of every tensor it holds."""
    return [(self.path, name, hf_name) for name, hf_name in self._stored_names]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(self._tensors[name].shape))

  def where(self, name: str) -> str:
    return f"{self.path} (tensor {self._tensors[name].name})"

  def read(self, name: str) -> np.ndarray:
    tensor = self._tensors[name]
    weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    weight = np.asarray(weight, np.float32).reshape(self.shape(name))
    if self.hf_config["model_type"] == "llama":
      if name.endswith("self_attn.q_proj.weight"):
        weight = unpermute_rotary(weight, self.hf_config["num_attention_heads"])
      elif name.endswith("self_attn.k_proj.weight"):
        weight = unpermute_rotary(weight, self.hf_config["num_key_value_heads"])
    return weight


def open_checkpoint(path: str):
  """A GGUF file or a Hugging Face safetensors directory, by what the path is."""
  if not os.path.exists(path):
    raise UserError(f"{path}: no such path")
  if os.path.isdir(path):
    return SafetensorsCheckpoint(path)
  if path.endswith(".gguf"):
    return GGUFCheckpoint(path)
  raise UserError(f"{path}: expected a Hugging Face checkpoint directory or a .gguf file")
