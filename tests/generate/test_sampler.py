"""Fused sampler: greedy parity with transformers (SmolLM2's is in tests/models/test_smollm2.py),
log-prob parity with teacher forcing, top-k / top-p support, stop tokens, bounded compilations,
and sharded sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_models
from prerl_jax import sharding
from prerl_jax.models.loading import load_model
from prerl_jax.generate.sampler import Sampler, SamplingConfig, _categorical, prompt_batch
from kernel_marks import needs_cpu_kernels
from sampler_checks import BUCKETS, PAD, STOP, _allowed, _gather, _prompts, \
    _teacher_forced_logp

KERNELS = ["xla", pytest.param("cpu", marks=needs_cpu_kernels)]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_transformers_tiny(tiny, family, kernels):
  hf_model, model = tiny[family]
  config = SamplingConfig(max_new_tokens=32, pad_id=PAD, stop_ids=(STOP,), greedy=True,
                          prompt_buckets=BUCKETS)
  tokens, mask = prompt_batch(_prompts((5, 9, 3, 12)), config)
  out = Sampler(model, kernels=kernels).sample(nnx.state(model), tokens, mask,
                                                   jax.random.key(0), config)
  expected = tiny_models.hf_greedy(hf_model, tokens, mask, 32, (STOP,), PAD)
  np.testing.assert_array_equal(np.asarray(out.tokens_NxM), expected)
  assert len(np.unique(expected)) > 3  # The rows are not one repeated token.


@pytest.mark.parametrize("kernels", KERNELS)
def test_logprobs_match_teacher_forcing_with_groups(tiny, kernels):
  _, model = tiny["qwen3"]
  config = SamplingConfig(max_new_tokens=12, pad_id=PAD, stop_ids=(STOP, 5), temperature=0.7,
                          n=3, prompt_buckets=BUCKETS)
  tokens, mask = prompt_batch(_prompts((4, 10)), config)
  out = Sampler(model, kernels=kernels).sample(nnx.state(model), tokens, mask,
                                                   jax.random.key(1), config)
  assert out.tokens_NxM.shape == (6, 12)
  np.testing.assert_array_equal(out.prompt_tokens_NxP, np.repeat(tokens, 3, axis=0))
  expected = _gather(_teacher_forced_logp(model, out, 0.7), out.tokens_NxM)
  response = np.asarray(out.response_mask_NxM)
  assert np.abs(np.asarray(out.logprobs_NxM) - expected)[response].max() <= 1e-4
  assert np.all(np.asarray(out.logprobs_NxM)[~response] == 0)
  assert len({tuple(r) for r in np.asarray(out.tokens_NxM)[:3]}) > 1  # The group differs.


@pytest.mark.parametrize("kernels", KERNELS)
def test_multi_segment_decode_matches_teacher_forcing(tiny, kernels):
  """140 new tokens run as 2 decode segments (2 generated cache blocks after the prompt's)."""
  _, model = tiny["llama"]
  config = SamplingConfig(max_new_tokens=140, pad_id=PAD, temperature=1.0, n=2,
                          prompt_buckets=BUCKETS)
  tokens, mask = prompt_batch(_prompts((5, 9)), config)
  out = Sampler(model, kernels=kernels).sample(nnx.state(model), tokens, mask,
                                                   jax.random.key(4), config)
  assert np.asarray(out.lengths_N).tolist() == [140] * 4
  expected = _gather(_teacher_forced_logp(model, out, 1.0), out.tokens_NxM)
  assert np.abs(np.asarray(out.logprobs_NxM) - expected).max() <= 1e-4


def test_blockwise_draws_follow_softmax():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 700)).astype(np.float32) * 2  # Not a multiple of the block.
  logits[1, 5:] = -np.inf
  keys = jax.random.split(jax.random.key(0), 200_000)
  draws, logsumexp = jax.jit(jax.vmap(lambda k: _categorical(k, jnp.asarray(logits))))(keys)
  draws = np.asarray(draws)
  np.testing.assert_allclose(np.asarray(logsumexp[0]),
                             np.asarray(jax.nn.logsumexp(logits, axis=-1)), rtol=1e-6)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  for row in range(3):
    frequency = np.bincount(draws[:, row], minlength=700) / len(keys)
    assert np.abs(frequency - probs[row]).max() < 0.005  # 5 standard errors at p = 0.8.
    assert frequency[probs[row] == 0].sum() == 0


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (8, 0.5)])
def test_top_k_top_p_stay_in_allowed_set(tiny, top_k, top_p):
  _, model = tiny["llama"]
  config = SamplingConfig(max_new_tokens=6, pad_id=PAD, temperature=1.5, top_k=top_k,
                          top_p=top_p, n=64, prompt_buckets=BUCKETS)
  tokens, mask = prompt_batch(_prompts((3, 7)), config)
  out = Sampler(model).sample(nnx.state(model), tokens, mask, jax.random.key(2), config)
  logp = _teacher_forced_logp(model, out, 1.5)
  allowed = _allowed(logp, top_k, top_p)
  inside = _gather(allowed, out.tokens_NxM)
  assert inside.all(), f"{(~inside).sum()} of {inside.size} draws outside the allowed set"
  assert allowed.sum(-1).max() < 100 and len(np.unique(out.tokens_NxM)) > 3
  np.testing.assert_allclose(out.logprobs_NxM, _gather(logp, out.tokens_NxM), atol=1e-4)


def test_stop_tokens_end_each_row_independently(tiny):
  _, model = tiny["qwen2"]
  probe = SamplingConfig(max_new_tokens=16, pad_id=PAD, greedy=True, prompt_buckets=BUCKETS)
  tokens, mask = prompt_batch(_prompts((6, 3, 11)), probe)
  sampler = Sampler(model)
  free = np.asarray(sampler.sample(nnx.state(model), tokens, mask, jax.random.key(0),
                                   probe).tokens_NxM)
  stops = (int(free[0, 3]), int(free[1, 9]))  # Tokens the greedy rows emit at known steps.
  config = SamplingConfig(max_new_tokens=16, pad_id=PAD, greedy=True, stop_ids=stops,
                          prompt_buckets=BUCKETS)
  out = sampler.sample(nnx.state(model), tokens, mask, jax.random.key(0), config)
  got = np.asarray(out.tokens_NxM)
  for row in range(3):
    hits = np.flatnonzero(np.isin(free[row], stops))
    length = hits[0] + 1 if len(hits) else 16
    assert out.lengths_N[row] == length
    assert bool(out.truncated_N[row]) == (len(hits) == 0)
    np.testing.assert_array_equal(got[row, :length], free[row, :length])
    assert np.all(got[row, length:] == PAD)
  assert int(out.lengths_N[0]) <= 4 and int(out.lengths_N[1]) <= 10


def test_compilations_bounded_by_buckets(tiny):
  _, model = tiny["llama"]
  config = SamplingConfig(max_new_tokens=4, pad_id=PAD, stop_ids=(STOP,),
                          prompt_buckets=BUCKETS)
  sampler = Sampler(model)
  rng = np.random.default_rng(3)
  widths = set()
  for call in range(20):
    tokens, mask = prompt_batch(_prompts(rng.integers(1, 33, 2), seed=call), config)
    widths.add(tokens.shape[1])
    sampler.sample(nnx.state(model), tokens, mask, jax.random.key(call), config)
  assert widths == set(BUCKETS)
  assert sampler.num_compiled() == len(BUCKETS)
  with pytest.raises(ValueError, match="largest prompt bucket 32"):
    prompt_batch(_prompts((33,)), config)


def test_sharded_greedy_matches_single_device(tiny, tmp_path):
  _, model = tiny["qwen3"]
  config = SamplingConfig(max_new_tokens=10, pad_id=PAD, stop_ids=(STOP,), greedy=True, n=2,
                          prompt_buckets=BUCKETS)
  tokens, mask = prompt_batch(_prompts((5, 9, 3, 12, 1, 7, 8, 2)), config)
  single = Sampler(model).sample(nnx.state(model), tokens, mask, jax.random.key(0), config)
  mesh = sharding.make_mesh(2, 2, 2)
  folder = tiny_models.save_hf_model("qwen3", tmp_path)
  sharded_model, _ = load_model(folder, mesh=mesh, with_tokenizer=False)
  out = Sampler(sharded_model, mesh).sample(nnx.state(sharded_model), tokens, mask,
                                            jax.random.key(0), config)
  assert len(out.tokens_NxM.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(out.tokens_NxM), np.asarray(single.tokens_NxM))
  np.testing.assert_allclose(np.asarray(out.logprobs_NxM), np.asarray(single.logprobs_NxM),
                             atol=1e-5)
