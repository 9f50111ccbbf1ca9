"""Fixtures of the sampler tests: the tiny random model families."""

import pytest

import tiny_models
from prerl_jax.models.loading import load_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
  """{family: (hf_model, our model)} for the tiny random families."""
  models = {}
  for family in ("llama", "qwen2", "qwen3"):
    hf_model = tiny_models.build_hf_model(family)
    folder = tmp_path_factory.mktemp(family)
    hf_model.save_pretrained(str(folder))
    models[family] = (hf_model, load_model(str(folder), with_tokenizer=False)[0])
  return models
