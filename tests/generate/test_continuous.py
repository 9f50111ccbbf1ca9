"""Continuous-batching sampler: greedy parity with transformers, the same samples whatever the
row count and chunk size, log-probs equal to teacher forcing, pages reused and never read after
they are freed, and batches larger than the pool."""

import jax
import numpy as np
import pytest
from flax import nnx

import tiny_models
from kernel_marks import needs_cpu_kernels
from prerl_jax import sharding
from prerl_jax.generate import continuous
from prerl_jax.generate.continuous import ContinuousSampler, PoolConfig
from prerl_jax.generate.sampler import SamplingConfig, prompt_batch
from prerl_jax.kernels.cpu import library as cpu_kernels
from prerl_jax.models.loading import load_model
from sampler_checks import BUCKETS, PAD, STOP, _allowed, _gather, _prompts, \
    _teacher_forced_logp

# Ten stop ids: about one draw in thirteen stops a tiny model's row, so lengths vary.
STOPS = (STOP, 5, 7, 11, 13, 17, 19, 23, 29, 31)


def _sample(model, prompts, config, key=0, kernels="auto", **pool):
  tokens, mask = prompt_batch(prompts, config)
  return ContinuousSampler(model, PoolConfig(**pool), kernels=kernels).sample(
      nnx.state(model), tokens, mask, jax.random.key(key), config)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_transformers(tiny, family):
  hf_model, model = tiny[family]
  config = SamplingConfig(max_new_tokens=24, pad_id=PAD, stop_ids=(STOP,), greedy=True,
                          prompt_buckets=BUCKETS)
  prompts = _prompts((5, 9, 3, 12))
  out = _sample(model, prompts, config, rows=3, page_size=4, chunk_steps=5)
  tokens, mask = prompt_batch(prompts, config)
  expected = tiny_models.hf_greedy(hf_model, tokens, mask, 24, (STOP,), PAD)
  np.testing.assert_array_equal(out.tokens_NxM, expected)
  assert len(np.unique(expected)) > 3


def test_samples_do_not_depend_on_rows_or_chunk_steps(tiny):
  """Rows 2, 8 and 64 and chunks of 1 and 16 steps sample the same tokens (log-probs within
  1e-5), which are the teacher-forced log-probs within 1e-4."""
  _, model = tiny["qwen3"]
  config = SamplingConfig(max_new_tokens=20, pad_id=PAD, stop_ids=STOPS, temperature=0.9, n=2,
                          prompt_buckets=BUCKETS)
  prompts = _prompts((6, 1, 13, 4, 9), seed=1)
  runs = [_sample(model, prompts, config, key=3, rows=rows, page_size=4, chunk_steps=steps)
          for rows, steps in ((64, 16), (2, 1), (8, 16), (64, 1))]
  first = runs[0]
  lengths = np.asarray(first.lengths_N)
  assert lengths.min() < 10 and lengths.max() == 20  # Rows retire at different chunks.
  for out in runs[1:]:
    np.testing.assert_array_equal(out.tokens_NxM, first.tokens_NxM)
    np.testing.assert_array_equal(out.lengths_N, first.lengths_N)
    np.testing.assert_allclose(out.logprobs_NxM, first.logprobs_NxM, atol=1e-5)
  expected = _gather(_teacher_forced_logp(model, first, 0.9), first.tokens_NxM)
  response = np.asarray(first.response_mask_NxM)
  assert np.abs(first.logprobs_NxM - expected)[response].max() <= 1e-4
  assert np.all(first.logprobs_NxM[~response] == 0)
  np.testing.assert_array_equal(first.truncated_N, ~np.isin(
      first.tokens_NxM[np.arange(len(lengths)), lengths - 1], STOPS))


@needs_cpu_kernels
@pytest.mark.parametrize("greedy", [True, False])
def test_cpu_kernels_sample_what_xla_samples(tiny, greedy):
  """The CPU decode (C++ kernels, layers unrolled over packed weights, paged attention kernel)
  samples the XLA decode's tokens, with log-probs within 1e-5, on a pool small enough that
  pages are freed and reused and rows retire mid-chunk."""
  _, model = tiny["qwen3"]
  config = SamplingConfig(max_new_tokens=18, pad_id=PAD, stop_ids=STOPS, temperature=0.8, n=2,
                          greedy=greedy, prompt_buckets=BUCKETS)
  prompts = _prompts((6, 1, 13, 4, 9), seed=6)
  tokens, mask = prompt_batch(prompts, config)
  runs = {}
  for kernels in ("xla", "cpu"):
    sampler = ContinuousSampler(model, PoolConfig(rows=4, page_size=4, pages=16, chunk_steps=5),
                                kernels=kernels)
    runs[kernels] = sampler.sample(nnx.state(model), tokens, mask, jax.random.key(4), config)
    assert sampler._decode._cache_size() > 1  # Chunks ran at narrower widths than 4 rows.
  xla, cpu = runs["xla"], runs["cpu"]
  lengths = np.asarray(xla.lengths_N)
  assert lengths.max() == 18 and (greedy or lengths.min() < 10)
  np.testing.assert_array_equal(cpu.tokens_NxM, xla.tokens_NxM)
  np.testing.assert_array_equal(cpu.lengths_N, xla.lengths_N)
  np.testing.assert_allclose(cpu.logprobs_NxM, xla.logprobs_NxM, atol=1e-5)
  assert np.abs(np.asarray(xla.logprobs_NxM)).max() > 0.1


def test_kernel_choice(tiny):
  """"auto" takes the CPU kernels for one float32 CPU device (where they build) and XLA's code
  on a mesh; "cpu" on a mesh is refused, naming the sampler."""
  _, model = tiny["llama"]
  auto = "cpu" if cpu_kernels.unavailable_reason() is None else "xla"
  assert ContinuousSampler(model).kernels == auto
  assert ContinuousSampler(model, kernels="xla").kernels == "xla"
  mesh = sharding.make_mesh(2, 2, 2)
  assert ContinuousSampler(model, mesh=mesh).kernels == "xla"
  with pytest.raises(ValueError, match="ContinuousSampler kernels='cpu' needs one CPU device"):
    ContinuousSampler(model, mesh=mesh, kernels="cpu")


def test_top_k_top_p_stay_in_allowed_set(tiny):
  _, model = tiny["llama"]
  config = SamplingConfig(max_new_tokens=6, pad_id=PAD, temperature=1.5, top_k=8, top_p=0.5,
                          n=16, prompt_buckets=BUCKETS)
  out = _sample(model, _prompts((3, 7)), config, key=2, rows=16, chunk_steps=4)
  logp = _teacher_forced_logp(model, out, 1.5)
  assert _gather(_allowed(logp, 8, 0.5), out.tokens_NxM).all()
  assert len(np.unique(out.tokens_NxM)) > 3
  np.testing.assert_allclose(out.logprobs_NxM, _gather(logp, out.tokens_NxM), atol=1e-4)


def test_pages_are_reused_and_never_read_after_release(tiny, monkeypatch):
  """A pool of 20 pages of 4 slots (and the scratch page) samples 9 prompts x 2 samples of up to
  24 tokens, over three times its 80 slots: freed pages are filled with NaN at once, and the
  samples equal a large pool's. The pool runs short, so groups are also put back in the queue."""
  _, model = tiny["qwen2"]
  config = SamplingConfig(max_new_tokens=24, pad_id=PAD, stop_ids=STOPS, temperature=1.0, n=2,
                          prompt_buckets=BUCKETS)
  prompts = _prompts((7, 3, 12, 5, 9, 2, 14, 6, 10), seed=2)
  expected = _sample(model, prompts, config, key=5, rows=64, page_size=4)
  freed, preempted = [], []
  release, preempt = continuous._Run.release_pages, continuous._Run._preempt

  def poisoning_release(run, shard, pages):
    pages = release(run, shard, pages)
    freed.extend(pages)
    if pages:
      run.kv_pages = run.kv_pages.at[:, np.asarray(pages)].set(np.nan)
    return pages

  def counting_preempt(run, group):
    preempted.append(group)
    preempt(run, group)

  monkeypatch.setattr(continuous._Run, "release_pages", poisoning_release)
  monkeypatch.setattr(continuous._Run, "_preempt", counting_preempt)
  out = _sample(model, prompts, config, key=5, rows=6, page_size=4, pages=21, chunk_steps=4)
  assert int(np.sum(out.lengths_N)) + sum(map(len, prompts)) > 3 * 80
  assert len(freed) > 3 * 20 and preempted
  np.testing.assert_array_equal(out.tokens_NxM, expected.tokens_NxM)
  np.testing.assert_allclose(out.logprobs_NxM, expected.logprobs_NxM, atol=1e-5)


def test_batch_larger_than_pool_with_every_response_at_max_new_tokens(tiny):
  _, model = tiny["llama"]
  config = SamplingConfig(max_new_tokens=9, pad_id=PAD, temperature=1.0, n=3,
                          prompt_buckets=BUCKETS)
  out = _sample(model, _prompts((4, 8, 2, 11, 5, 6, 3)), config, rows=4, page_size=4,
                chunk_steps=3)
  assert out.tokens_NxM.shape == (21, 9)
  assert np.all(out.lengths_N == 9) and np.all(out.truncated_N)
  expected = _gather(_teacher_forced_logp(model, out, 1.0), out.tokens_NxM)
  assert np.abs(out.logprobs_NxM - expected).max() <= 1e-4


def test_pool_too_small_for_one_group_names_the_setting(tiny):
  _, model = tiny["llama"]
  config = SamplingConfig(max_new_tokens=16, pad_id=PAD, temperature=1.0, n=2,
                          prompt_buckets=BUCKETS)
  with pytest.raises(MemoryError, match="raise PoolConfig.pages or rollout.kv_cache_gib"):
    _sample(model, _prompts((9,)), config, rows=2, page_size=4, pages=6)
  with pytest.raises(ValueError, match="n=2 samples of a prompt do not fit in PoolConfig.rows=1"):
    _sample(model, _prompts((9,)), config, rows=1)


def test_rows_and_pages_split_over_batch_shards(tiny, tmp_path, monkeypatch):
  """On a (2, 2, 2) mesh: 4 batch shards of 4 rows, each with its own part of the pool (18 pages
  of 4 slots; kv heads over the tensor axis). 9 prompts x 2 samples spread over the shards, are
  prefilled several at a time, and overflow a shard's pages (groups go back to the queue); the
  samples are the single device's with one large pool."""
  _, model = tiny["qwen3"]
  config = SamplingConfig(max_new_tokens=24, pad_id=PAD, temperature=1.0, n=2,
                          prompt_buckets=BUCKETS)  # No stop ids: every response grows to 24.
  prompts = _prompts((7, 3, 12, 5, 9, 2, 14, 6, 10), seed=4)
  single = _sample(model, prompts, config, key=7, rows=64, page_size=4)
  mesh = sharding.make_mesh(2, 2, 2)
  sharded_model, _ = load_model(tiny_models.save_hf_model("qwen3", tmp_path), mesh=mesh,
                                with_tokenizer=False)
  prefilled, preempted = [], []
  prefill, preempt = continuous._Run._prefill, continuous._Run._preempt
  monkeypatch.setattr(continuous._Run, "_prefill", lambda run, admitted: (
      prefilled.append([shard for shard, _, _ in admitted]), prefill(run, admitted)))
  monkeypatch.setattr(continuous._Run, "_preempt", lambda run, group: (
      preempted.append(group.shard), preempt(run, group)))
  tokens, mask = prompt_batch(prompts, config)
  sampler = ContinuousSampler(sharded_model, PoolConfig(rows=4, page_size=4, pages=18,
                                                        chunk_steps=4), mesh)
  assert sampler.shards == 4
  out = sampler.sample(nnx.state(sharded_model), tokens, mask, jax.random.key(7), config)
  pool = sampler.empty_pool(18)
  assert pool.shape[1] == 4 * 18 and pool.sharding.spec[1] == ("data", "fsdp")
  assert pool.sharding.spec[3] == "tensor"
  assert set(sum(prefilled, [])) == {0, 1, 2, 3} and max(map(len, prefilled)) >= 4
  assert preempted
  np.testing.assert_array_equal(out.tokens_NxM, single.tokens_NxM)
  np.testing.assert_array_equal(out.lengths_N, single.lengths_N)
  np.testing.assert_allclose(out.logprobs_NxM, single.logprobs_NxM, atol=1e-5)
