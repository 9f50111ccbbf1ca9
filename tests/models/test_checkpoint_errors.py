"""Bad checkpoints raise errors that name the tensor or file; nothing is half-loaded."""

import json
import os
import re
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tiny_models
from prerl_jax.errors import UserError
from prerl_jax.models.loading import load_model
from prerl_jax.models.tokenizer import load_tokenizer
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


@pytest.mark.parametrize("bad_value, counts", [(float("nan"), "1 NaN and 0 Inf"),
                                               (float("-inf"), "0 NaN and 1 Inf")])
def test_non_finite_tensor_is_named_unless_the_check_is_skipped(checkpoint, bad_value, counts):
  def poison(tensors):
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = bad_value
  _rewrite_tensors(checkpoint, poison)
  with pytest.raises(UserError, match=r"model\.safetensors: tensor "
                     rf"'model\.layers\.1\.mlp\.down_proj\.weight' holds {counts} values"):
    load_model(checkpoint, with_tokenizer=False)
  model, _ = load_model(checkpoint, with_tokenizer=False, check_finite=False)
  assert not np.isfinite(np.asarray(model.layers["w_down"][...])).all()


def test_config_json_that_is_not_json_names_its_path(checkpoint):
  with open(os.path.join(checkpoint, "config.json"), "w") as f:
    f.write('{"model_type": "llama",')
  with pytest.raises(UserError, match=r"config\.json: not valid JSON"):
    load_model(checkpoint, with_tokenizer=False)


def test_safetensors_header_that_is_not_json_names_the_file(checkpoint):
  header = b'{"oops": [1, 2'
  with open(os.path.join(checkpoint, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header)
  with pytest.raises(UserError, match=r"model\.safetensors \(safetensors header\): not valid JSON"):
    load_model(checkpoint, with_tokenizer=False)


def test_directory_without_tokenizer_files_says_so(checkpoint):
  with pytest.raises(UserError, match=rf"{re.escape(checkpoint)}: no tokenizer files"):
    load_tokenizer(checkpoint)


def test_preset_with_a_path_that_does_not_exist_says_no_such_path(tmp_path):
  with pytest.raises(UserError, match=r"nowhere: no such path"):
    load_model("qwen3-4b", path=str(tmp_path / "nowhere"))
