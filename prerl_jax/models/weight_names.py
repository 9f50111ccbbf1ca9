"""The correspondence between our stacked parameters and Hugging Face tensor names and layouts.

Hugging Face stores a linear layer as [out, in]; we store [in..., out...] (for example `wq` as
[embed, heads, head_dim]) with a leading `layers` axis for per-layer weights.
"""

import collections
import dataclasses
import math
import re

import numpy as np

from prerl_jax.models.decoder import layer_shapes
from prerl_jax.models.config import ModelConfig

# Tensors checkpoints carry beside the weights, rebuilt from the config, so not read: rotary
# inverse frequencies (older transformers saved `model.layers.{i}.self_attn.rotary_emb.inv_freq`
# or `model.rotary_emb.inv_freq`). A tied `lm_head.weight` equal to the embedding counts as read.
NON_WEIGHT_TENSORS = re.compile(r"(.+\.)?rotary_emb\.inv_freq")
_LAYER_TENSOR = re.compile(r"(.*(?:layers|blk))\.(\d+)\.(.+)")  # HF or GGUF: prefix, layer, rest.

# Our per-layer name: (Hugging Face suffix after `model.layers.{i}.`, input axes of a linear or 0).
# Biases are stored per head ([heads, head_dim]) and flattened in Hugging Face files.
LAYER_TENSORS = {
    "attn_norm": ("input_layernorm.weight", 0),
    "wq": ("self_attn.q_proj.weight", 1),
    "wk": ("self_attn.k_proj.weight", 1),
    "wv": ("self_attn.v_proj.weight", 1),
    "bq": ("self_attn.q_proj.bias", 0),
    "bk": ("self_attn.k_proj.bias", 0),
    "bv": ("self_attn.v_proj.bias", 0),
    "q_norm": ("self_attn.q_norm.weight", 0),
    "k_norm": ("self_attn.k_norm.weight", 0),
    "wo": ("self_attn.o_proj.weight", 2),
    "mlp_norm": ("post_attention_layernorm.weight", 0),
    "w_gate": ("mlp.gate_proj.weight", 1),
    "w_up": ("mlp.up_proj.weight", 1),
    "w_down": ("mlp.down_proj.weight", 1),
}


@dataclasses.dataclass(frozen=True)
class TensorMapping:
  """One parameter of ours and the Hugging Face tensors (one per layer, or one) it is made of."""

  path: tuple[str, ...]  # Path in the model state, e.g. ("layers", "wq").
  hf_names: tuple[str, ...]
  shape: tuple[int, ...]  # Our full shape (with the layers axis for per-layer weights).
  input_axes: int  # Leading axes (after layers) that form a linear layer's input; 0 otherwise.
  flat: bool = False  # Stored as one flat vector by Hugging Face (q/k/v biases).

  @property
  def stacked(self) -> bool:
    return self.path[0] == "layers"

  @property
  def slice_shape(self) -> tuple[int, ...]:
    return self.shape[1:] if self.stacked else self.shape

  @property
  def hf_shape(self) -> tuple[int, ...]:
    """Shape of each Hugging Face tensor."""
    shape = self.slice_shape
    if self.input_axes:
      return (math.prod(shape[self.input_axes:]), math.prod(shape[:self.input_axes]))
    return (math.prod(shape),) if self.flat else shape

  def to_ours(self, hf_tensor: np.ndarray) -> np.ndarray:
    if self.input_axes:
      return hf_tensor.T.reshape(self.slice_shape)
    return hf_tensor.reshape(self.slice_shape)

  def to_hf(self, slice_: np.ndarray) -> np.ndarray:
    if self.input_axes:
      return np.ascontiguousarray(
          slice_.reshape(math.prod(self.slice_shape[:self.input_axes]), -1).T)
    return slice_.reshape(self.hf_shape)


def tensor_mappings(config: ModelConfig) -> list[TensorMapping]:
  """Every parameter of a model with this config, with its Hugging Face source tensors."""
  mappings = [TensorMapping(("embed",), ("model.embed_tokens.weight",),
                            (config.vocab_size, config.hidden_size), 0)]
  for name, shape in layer_shapes(config).items():
    suffix, input_axes = LAYER_TENSORS[name]
    names = tuple(f"model.layers.{i}.{suffix}" for i in range(config.num_layers))
    mappings.append(TensorMapping(("layers", name), names, shape, input_axes,
                                  flat=name in ("bq", "bk", "bv")))
  mappings.append(TensorMapping(("final_norm",), ("model.norm.weight",),
                                (config.hidden_size,), 0))
  if not config.tie_word_embeddings:
    mappings.append(TensorMapping(("lm_head",), ("lm_head.weight",),
                                  (config.hidden_size, config.vocab_size), 1))
  return mappings


def _ranges(indices) -> str:
  """Integers as ranges: [0, 1, 2, 5] -> '0-2,5'."""
  runs = []
  for index in sorted(indices):
    if runs and index == runs[-1][1] + 1:
      runs[-1][1] = index
    else:
      runs.append([index, index])
  return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _tensors(count: int) -> str:
  return f"{count} tensor" + ("s" if count > 1 else "")


def grouped_names(names, file_names) -> str:
  """`names` (tensors of one file whose names are `file_names`) as one short line.

  A layer whose every tensor is among them reads `model.layers.1-3.* (27 tensors)`; a tensor
  over several layers `model.layers.0-35.self_attn.q_proj.bias (36 tensors)`; others as named.
  """
  per_layer = collections.Counter()
  for name in file_names:
    if match := _LAYER_TENSOR.fullmatch(name):
      per_layer[match[1], int(match[2])] += 1
  layers, others = collections.defaultdict(set), []
  for name in names:
    if match := _LAYER_TENSOR.fullmatch(name):
      layers[match[1], int(match[2])].add(match[3])
    else:
      others.append(name)
  whole, partial = collections.defaultdict(list), collections.defaultdict(list)
  for (prefix, index), rests in layers.items():
    if len(rests) == per_layer[prefix, index]:
      whole[prefix].append(index)
    else:
      for rest in rests:
        partial[prefix, rest].append(index)
  parts = [f"{prefix}.{_ranges(indices)}.* "
           f"({_tensors(sum(per_layer[prefix, i] for i in indices))})"
           for prefix, indices in sorted(whole.items())]
  parts += [f"{prefix}.{_ranges(indices)}.{rest}" + (f" ({_tensors(len(indices))})"
                                                     if len(indices) > 1 else "")
            for (prefix, rest), indices in sorted(partial.items())]
  return ", ".join(parts + sorted(others))
