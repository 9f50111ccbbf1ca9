"""Bad checkpoints raise errors that name the tensor or file; nothing is half-loaded."""

import json
import os

import pytest
from safetensors.numpy import load_file, save_file

import tiny_models
from prerl_jax.models.loading import load_model
from prerl_jax.models.presets import smollm2_gguf_path


@pytest.fixture()
def checkpoint(tmp_path):
  return tiny_models.save_hf_model("llama", tmp_path)


def _rewrite_tensors(directory, change):
  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  change(tensors)
  save_file(tensors, path)


def test_missing_tensor_is_named(checkpoint):
  _rewrite_tensors(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    load_model(checkpoint, with_tokenizer=False)


def test_wrong_shape_is_named(checkpoint):
  def shrink(tensors):
    tensors["model.layers.0.self_attn.k_proj.weight"] = (
        tensors["model.layers.0.self_attn.k_proj.weight"][:16])
  _rewrite_tensors(checkpoint, shrink)
  with pytest.raises(ValueError, match=r"k_proj\.weight' has shape \(16, 64\), expected \(32, 64\)"):
    load_model(checkpoint, with_tokenizer=False)


def test_unsupported_architecture_is_named(checkpoint):
  config_path = os.path.join(checkpoint, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  config["model_type"] = "gpt_neox"
  with open(config_path, "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="config.json: unsupported architecture.*gpt_neox"):
    load_model(checkpoint, with_tokenizer=False)


def test_unsupported_rope_scaling_is_named(checkpoint):
  config_path = os.path.join(checkpoint, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  config["rope_scaling"] = {"rope_type": "longrope", "factor": 4.0}
  with open(config_path, "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="Unsupported rope_scaling type 'longrope'"):
    load_model(checkpoint, with_tokenizer=False)


def test_truncated_gguf_is_named(tmp_path):
  truncated = tmp_path / "truncated.gguf"
  with open(smollm2_gguf_path(), "rb") as source, open(truncated, "wb") as out:
    out.write(source.read(40_000_000))
  with pytest.raises(ValueError, match="truncated.gguf"):
    load_model(str(truncated), with_tokenizer=False)


def test_preset_without_path_says_what_to_pass():
  with pytest.raises(ValueError, match="qwen3-4b.*path="):
    load_model("qwen3-4b")
