"""Export of a Decoder's weights to a Hugging Face directory that transformers loads."""

import json
import os

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from prerl_jax.models.decoder import Decoder
from prerl_jax.sharding import to_host
from prerl_jax.models.weight_names import tensor_mappings


def export_hf(model: Decoder, out_dir: str, tokenizer=None) -> str:
  """Writes config.json, model.safetensors (float32) and the tokenizer; returns out_dir.

  On several hosts every process must call this (arrays are gathered); only process 0 writes.
  """
  config = model.config
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  tensors = {}
  for mapping in tensor_mappings(config):
    value = to_host(flat[mapping.path].get_value()).astype(np.float32)
    slices = list(value) if mapping.stacked else [value]
    for name, slice_ in zip(mapping.hf_names, slices):
      tensors[name] = mapping.to_hf(slice_)
  if jax.process_index() != 0:
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config.to_hf_dict(), f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return out_dir
