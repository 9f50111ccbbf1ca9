"""Bad checkpoints raise errors that name the tensor or file; nothing is half-loaded."""

import json
import logging
import os
import re
import struct

import gguf
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import tiny_models
from prerl_jax.errors import UserError
from prerl_jax.models import checkpoint_readers
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


def _rewrite_config(directory, change):
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  change(config)
  with open(path, "w") as f:
    json.dump(config, f)


def _state(model) -> dict:
  return {path: np.asarray(value.get_value()) for path, value in nnx.to_flat_state(
      nnx.state(model))}


def _assert_first_layer_of(small, full):
  """`small` (one layer) holds layer 0 of `full` (two layers) and the same other weights."""
  small, full = _state(small), _state(full)
  assert small.keys() == full.keys()
  for path, value in small.items():
    expected = full[path][:1] if path[0] == "layers" else full[path]
    np.testing.assert_array_equal(value, expected, err_msg=str(path))


def test_layers_beyond_the_config_are_named_unless_allowed(checkpoint, caplog):
  def add_rotary_buffers(tensors):  # Known non-weights: neither listed nor counted.
    for layer in range(2):
      tensors[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
  _rewrite_tensors(checkpoint, add_rotary_buffers)
  full, _ = load_model(checkpoint, with_tokenizer=False)
  _rewrite_config(checkpoint, lambda c: c.update(num_hidden_layers=1))
  with pytest.raises(UserError, match=r"config\.json describes a model that does not use 9 of the "
                     r"checkpoint's tensors: \S*model\.safetensors: model\.layers\.1\.\* "
                     r"\(9 tensors\)\. .*allow_unused_weights"):
    load_model(checkpoint, with_tokenizer=False)
  with caplog.at_level(logging.WARNING):
    small, _ = load_model(checkpoint, with_tokenizer=False, allow_unused_weights=True)
  [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert "9 of the checkpoint's tensors" in record.message
  assert record.message.endswith("model.safetensors: model.layers.1.* (9 tensors)")
  _assert_first_layer_of(small, full)


def test_a_tensor_the_config_has_no_place_for_is_named_over_its_layers(checkpoint):
  # Biases in a Llama checkpoint whose config says attention_bias=false would be dropped.
  def add_biases(tensors):
    for layer in range(2):
      tensors[f"model.layers.{layer}.self_attn.q_proj.bias"] = np.ones(64, np.float32)
    tensors["model.layers.0.self_attn.k_proj.bias"] = np.ones(32, np.float32)
  _rewrite_tensors(checkpoint, add_biases)
  with pytest.raises(UserError, match=r"does not use 3 of the checkpoint's tensors: \S*: "
                     r"model\.layers\.0\.self_attn\.k_proj\.bias, "
                     r"model\.layers\.0-1\.self_attn\.q_proj\.bias \(2 tensors\)\. "):
    load_model(checkpoint, with_tokenizer=False)


def test_rotary_buffers_and_a_tied_head_equal_to_the_embedding_are_not_unused(tmp_path, caplog):
  directory = tiny_models.save_hf_model("qwen2", tmp_path)  # Ties lm_head to the embedding.
  reference, _ = load_model(directory, with_tokenizer=False)
  def add_buffers(tensors):
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    tensors["model.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    for layer in range(2):
      tensors[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
  _rewrite_tensors(directory, add_buffers)
  with caplog.at_level(logging.WARNING):
    model, _ = load_model(directory, with_tokenizer=False)
  assert not [r for r in caplog.records if r.levelno == logging.WARNING]
  expected = _state(reference)
  for path, value in _state(model).items():
    np.testing.assert_array_equal(value, expected[path], err_msg=str(path))

  def change_head(tensors):
    tensors["lm_head.weight"][5, 7] += 1.0
  _rewrite_tensors(directory, change_head)
  with pytest.raises(UserError, match=r"does not use 1 of the checkpoint's tensors: \S*: "
                     r"lm_head\.weight \(lm_head\.weight differs from the embedding that "
                     r"tie_word_embeddings uses\)"):
    load_model(directory, with_tokenizer=False)


def _write_gguf(path, tensors: dict, block_count: int):
  """A qwen2 GGUF file (float32) of Hugging Face tensors, its metadata saying block_count."""
  gguf_names = {hf: g for g, hf in checkpoint_readers._GGUF_GLOBAL_NAMES.items()}
  writer = gguf.GGUFWriter(str(path), "qwen2")
  writer.add_block_count(block_count)
  writer.add_embedding_length(64)
  writer.add_feed_forward_length(96)
  writer.add_head_count(4)
  writer.add_head_count_kv(2)
  for name, value in tensors.items():
    if name.startswith("model.layers."):
      _, _, layer, rest = name.split(".", 3)
      [short] = [g for g, hf in checkpoint_readers._GGUF_LAYER_NAMES.items() if hf == rest]
      name = f"blk.{layer}.{short}"
    writer.add_tensor(gguf_names.get(name, name), np.ascontiguousarray(value, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_gguf_blocks_beyond_its_metadata_are_named_unless_allowed(tmp_path):
  directory = tiny_models.save_hf_model("qwen2", tmp_path / "hf")
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  _write_gguf(tmp_path / "two.gguf", tensors, block_count=2)
  full, _ = load_model(str(tmp_path / "two.gguf"), with_tokenizer=False)
  _write_gguf(tmp_path / "one.gguf", tensors, block_count=1)
  with pytest.raises(UserError, match=r"one\.gguf describes a model that does not use 12 of the "
                     r"checkpoint's tensors: \S*one\.gguf: blk\.1\.\* \(12 tensors\)"):
    load_model(str(tmp_path / "one.gguf"), with_tokenizer=False)
  small, _ = load_model(str(tmp_path / "one.gguf"), with_tokenizer=False,
                        allow_unused_weights=True)
  _assert_first_layer_of(small, full)


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


@pytest.mark.parametrize("text, kind", [("[1, 2]", "array"), ('"llama"', "string"),
                                        ("7", "number"), ("null", "null")])
def test_config_json_that_is_not_an_object_names_its_path(checkpoint, text, kind):
  with open(os.path.join(checkpoint, "config.json"), "w") as f:
    f.write(text)
  with pytest.raises(UserError, match=rf"{re.escape(checkpoint)}/config\.json: expected a JSON "
                     rf"object \({{\.\.\.}}\), found a JSON {kind}$"):
    load_model(checkpoint, with_tokenizer=False)


def test_bad_safetensors_index_names_it(checkpoint):
  index = os.path.join(checkpoint, "model.safetensors.index.json")
  for text, match in [('["model.safetensors"]', "found a JSON array"),
                      ('{"weight_map": ["model.safetensors"]}', '"weight_map" object'),
                      ('{"weight_map": {"x": "other.safetensors"}}',
                       "lists 'other.safetensors', which is not in")]:
    with open(index, "w") as f:
      f.write(text)
    with pytest.raises(UserError, match=rf"index\.json: .*{re.escape(match)}"):
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
