"""The engine sizes its page pool on its first sample call: from the device's HBM (faked here on
CPU) for kv_cache_gib=auto, checking an explicit size; the default pool where HBM is unknown."""

import jax
import numpy as np
import pytest
from flax import nnx

from prerl_jax.errors import UserError
from prerl_jax.generate import pool_budget
from prerl_jax.generate.continuous import ContinuousSampler, PoolConfig
from prerl_jax.generate.sampler import SamplingConfig, prompt_batch
from prerl_jax.models.config import ModelConfig
from prerl_jax.models.loading import random_model

GIB = 2**30
TINY = ModelConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=2, num_kv_heads=1, head_dim=16)
CONFIG = SamplingConfig(max_new_tokens=12, pad_id=0, stop_ids=(3,), temperature=0.9, n=2,
                        prompt_buckets=(8,))
PROMPTS = [[5, 9, 2], [7, 1, 4, 6, 8], [11, 2]]
# A page: 2 layers x 4 slots x (k, v of 1 kv head) x 16, float32.
PAGE = 2 * 4 * 2 * 16 * 4


@pytest.fixture(scope="module")
def model():
  return random_model(TINY)


def sample(model, pool: PoolConfig, in_use: float | None = None, hbm: float = 2 * GIB,
           monkeypatch=None):
  """(the sampler after one sample call, its output); `in_use`: fake the device's memory."""
  if in_use is not None:
    monkeypatch.setattr(pool_budget, "device_hbm_and_in_use", lambda mesh: (hbm, in_use))
  sampler = ContinuousSampler(model, pool, kernels="xla")
  tokens, mask = prompt_batch(PROMPTS, CONFIG)
  out = sampler.sample(nnx.state(model), tokens, mask, jax.random.key(1), CONFIG)
  return sampler, out


@pytest.fixture(scope="module")
def reference_tokens(model):
  """The tokens the default pool samples: the same whatever size the pool has."""
  _, out = sample(model, PoolConfig(rows=4, page_size=4))
  return np.asarray(out.tokens_NxM)


def test_auto_without_a_memory_limit_is_the_default_pool(model, reference_tokens):
  sampler, out = sample(model, PoolConfig(rows=4, page_size=4, kv_cache_gib="auto"))
  assert (sampler.pool.kv_cache_gib, sampler.pool.pages) == (None, None)
  np.testing.assert_array_equal(out.tokens_NxM, reference_tokens)


def test_auto_takes_the_hbm_left_once(model, reference_tokens, monkeypatch):
  pool = PoolConfig(rows=4, page_size=4, kv_cache_gib="auto")
  weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
  probe = ContinuousSampler(model, pool, kernels="xla")
  programs = pool_budget.sampler_program_bytes(probe, nnx.state(model), jax.random.key(1),
                                               CONFIG, prompt_width=8)
  assert 0 < programs < 2**20
  # HBM 2 GiB, 0.5 GiB in use (the weights among it), the programs, 1 GiB + 5% of 2 GiB margin.
  free = 2 * GIB - 0.5 * GIB - programs - (GIB + 0.1 * GIB)
  sampler, out = sample(model, pool, in_use=0.5 * GIB, monkeypatch=monkeypatch)
  assert sampler.pool.pages == int(free // PAGE) == pool_budget.pool_pages(
      pool_budget.Budget(2 * GIB, 0.5 * GIB - weights, weights, programs), TINY, 4)
  np.testing.assert_array_equal(out.tokens_NxM, reference_tokens)
  # Sized once: a later call (even with less memory free) keeps the pool and its programs.
  monkeypatch.setattr(pool_budget, "device_hbm_and_in_use", lambda mesh: (2 * GIB, 2 * GIB))
  tokens, mask = prompt_batch(PROMPTS, CONFIG)
  sampler.sample(nnx.state(model), tokens, mask, jax.random.key(2), CONFIG)
  assert sampler.pool.pages == int(free // PAGE)


def test_an_explicit_pool_that_cannot_fit_fails_naming_the_key_and_numbers(model, monkeypatch):
  with pytest.raises(UserError, match=r"rollout.kv_cache_gib=0.5: its pool takes 0.50 GiB per "
                     r"chip, more than the HBM 2.00 - resident state 0.40 - rollout weights 0.00 "
                     r"- sampler program 0.00 - margin 1.10 = 0.50 GiB per chip left for it; "
                     r"lower it, or set it to auto"):
    sample(model, PoolConfig(rows=4, page_size=4, kv_cache_gib=0.5), in_use=0.4 * GIB,
           monkeypatch=monkeypatch)
  sampler, _ = sample(model, PoolConfig(rows=4, page_size=4, kv_cache_gib=0.25), in_use=0.4 * GIB,
                      monkeypatch=monkeypatch)
  assert sampler.pool.pages == int(0.25 * GIB // PAGE)
