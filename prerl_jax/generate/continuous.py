"""Continuous-batching sampler over a page-pool KV cache (`page_pool`).

A fixed number of decode rows run a jitted chunk of up to `chunk_steps` decode steps (the
occupied rows, at the narrowest of a quarter, half or all of the rows that holds them); between
chunks the host retires the rows whose sequence stopped, frees their pages, and admits queued
prompts into free rows, until every sample is done. A prompt is admitted with all of its
remaining samples: its first `length - 1` tokens are prefilled once (in chunks of at most
`prefill_chunk` tokens) into pages that all of its samples list, and each sample then decodes
from the prompt's last token in pages of its own. Pages are taken as rows need them; when the
pool runs out, the most recently admitted prompt is put back at the head of the queue and its
pages freed (it is sampled again later, with the same result).

Under a mesh with S batch shards (the data and fsdp axes), every shard has `PoolConfig.rows`
rows and a pool part of its own (`page_pool`); a prompt's samples all run in one shard (its
prompt pages are shared), the one with the most free rows (then pages, then the lowest index)
among those that can hold it, so S times the rows decode at once and a step samples S times as
many prompts per wave. Prompts admitted together are prefilled together, one per shard per call.

Results do not depend on scheduling: sample s of prompt i is sequence i * n + s, and its t-th
token is drawn with `fold_in(fold_in(key, sequence), t)`, so the same key gives the same tokens
whatever the row count, shard count, chunk size, pool size or admission order (up to float
rounding of different batch shapes). Every scheduling decision is taken from host copies of the
chunks' results, which are the same on every host of a multi-host run, by `schedule.Scheduler`,
which the dry run also runs over given response lengths without a model (`schedule.Simulation`).

`sample` returns the `SampleOutput` of `Sampler.sample` (the same log-prob convention); the draws
differ from the static sampler's, which keys by step only.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from prerl_jax import sharding
from prerl_jax.generate import page_pool, pool_budget, schedule
from prerl_jax.generate.paged_attention import gather_attention
from prerl_jax.generate.paged_forward import compute_weights, paged_forward
from prerl_jax.generate.sampler import SampleOutput, SamplingConfig, choose_tokens, \
    resolve_kernels
from prerl_jax.kernels.cpu import paged_decode as cpu_paged_decode
from prerl_jax.kernels.tpu import paged_attention as tpu_attention
from prerl_jax.models.decoder import Decoder


@dataclasses.dataclass(frozen=True)
class PoolConfig:
  """Size and pace of the continuous sampler.

  rows: live decode rows per batch shard. pages: pool pages per batch shard (its scratch page
  included); None sizes the pool from `kv_cache_gib` (GiB per shard, or "auto": from the HBM left
  on the first `sample` call, `pool_budget.sized_pool`), or else gives every row room for its
  longest sequence. chunk_steps: decode steps per host round trip. prefill_chunk: most prompt
  tokens per prefill call.
  """

  rows: int = 64
  page_size: int = 16
  pages: int | None = None
  kv_cache_gib: float | str | None = None
  chunk_steps: int = 16
  prefill_chunk: int = 512

  def __post_init__(self):
    checks = (("rows", self.rows >= 1), ("page_size", self.page_size >= 1),
              ("pages", self.pages is None or self.pages >= 2),
              ("kv_cache_gib", self.kv_cache_gib in (None, "auto") or self.kv_cache_gib > 0),
              ("chunk_steps", self.chunk_steps >= 1), ("prefill_chunk", self.prefill_chunk >= 1))
    for key, ok in checks:
      if not ok:
        raise ValueError(f"PoolConfig.{key}={getattr(self, key)!r} is out of range")

  @classmethod
  def from_rollout(cls, rollout) -> "PoolConfig":
    """The pool of a run config's `rollout` section (live_rows, page_size, kv_cache_gib with 0
    for room for every row, chunk_steps)."""
    return cls(rows=rollout.live_rows, page_size=rollout.page_size,
               kv_cache_gib=rollout.kv_cache_gib or None, chunk_steps=rollout.chunk_steps)

  def pool_pages(self, model_config, pages_per_sequence: int) -> int:
    """Pages per batch shard."""
    if self.pages is not None:
      return self.pages
    if self.kv_cache_gib == "auto":
      raise ValueError("PoolConfig.kv_cache_gib='auto' is sized by pool_budget.sized_pool")
    if self.kv_cache_gib is not None:
      return page_pool.pages_for_memory(model_config, self.kv_cache_gib, self.page_size)
    return self.rows * pages_per_sequence + 1


@struct.dataclass
class RowState:
  """The decode rows: the token each feeds next at `position`, how many tokens its sequence has
  sampled (`count`) out of `limit`, its sequence id, whether it is decoding, its page table."""

  token_R: jax.Array
  position_R: jax.Array
  count_R: jax.Array
  limit_R: jax.Array
  sequence_R: jax.Array
  live_R: jax.Array
  page_table_RxP: jax.Array


def _prefill_program(graphdef, state, kv_pages, tokens_SxT, start_S, count_S, page_table_SxP,
                     attention, mesh, rules):
  """The pool with `count_S[s]` prompt tokens of row s written from position `start_S[s]` (a row
  per batch shard; a row with count 0 writes nothing)."""
  model: Decoder = nnx.merge(graphdef, state)
  offsets_T = jnp.arange(tokens_SxT.shape[1])
  _, kv_pages = paged_forward(model, compute_weights(model), kv_pages, tokens_SxT,
                              start_S[:, None] + offsets_T, offsets_T < count_S[:, None],
                              page_table_SxP, attention, mesh, rules)
  return kv_pages


class DecodeCode(NamedTuple):
  """How `_decode_program` runs a decode step. `pack(model)` lays the weights out once per
  `sample` call (its own program, outside the decode chunks); `step(model, packed)` returns the
  step `(kv_pages, token_R, position_R, live_R, page_table_RxP) -> (logits_RxV, kv_pages)`."""

  pack: Callable
  step: Callable


def xla_code(attention, mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES) -> DecodeCode:
  """The decode step as `paged_forward` (layers under scan) with `attention`, then
  `model.logits`; nothing packed outside."""

  def step(model: Decoder, packed):
    weights = compute_weights(model)

    def logits(kv_pages, token_R, position_R, live_R, page_table_RxP):
      hidden_Rx1xD, kv_pages = paged_forward(model, weights, kv_pages, token_R[:, None],
                                             position_R[:, None], live_R[:, None],
                                             page_table_RxP, attention, mesh, rules)
      return model.logits(hidden_Rx1xD)[:, 0], kv_pages

    return logits

  return DecodeCode(pack=lambda model: (), step=step)


CPU_CODE = DecodeCode(cpu_paged_decode.pack, cpu_paged_decode.step)


def _decode_program(graphdef, state, packed, kv_pages, rows: RowState, key,
                    config: SamplingConfig, steps: int, code: DecodeCode):
  """Up to `steps` decode steps of every live row; returns (pool, rows, tokens_RxK,
  logprobs_RxK) with the tokens each row sampled in its first columns. `packed` is
  `code.pack(model)`."""
  model: Decoder = nnx.merge(graphdef, state)
  num_rows = rows.token_R.shape[0]
  stop_ids = jnp.asarray(config.stop_ids or (-1,), jnp.int32)
  logits = code.step(model, packed)

  def choose(logits_V, sequence, count):
    token, logprob = choose_tokens(logits_V[None], jax.random.fold_in(
        jax.random.fold_in(key, sequence), count), config)
    return token[0], logprob[0]

  def body(loop):
    step, kv_pages, rows, tokens_RxK, logprobs_RxK = loop
    logits_RxV, kv_pages = logits(kv_pages, rows.token_R, rows.position_R, rows.live_R,
                                  rows.page_table_RxP)
    token_R, logprob_R = jax.vmap(choose)(logits_RxV, rows.sequence_R, rows.count_R)
    live_R = rows.live_R
    tokens_RxK = tokens_RxK.at[:, step].set(jnp.where(live_R, token_R, config.pad_id))
    logprobs_RxK = logprobs_RxK.at[:, step].set(jnp.where(live_R, logprob_R, 0.0))
    count_R = rows.count_R + live_R
    stopped_R = jnp.isin(token_R, stop_ids) | (count_R >= rows.limit_R)
    rows = rows.replace(token_R=jnp.where(live_R, token_R, rows.token_R),
                        position_R=rows.position_R + live_R, count_R=count_R,
                        live_R=live_R & ~stopped_R)
    return step + 1, kv_pages, rows, tokens_RxK, logprobs_RxK

  def cond(loop):
    return (loop[0] < steps) & jnp.any(loop[2].live_R)

  loop = (jnp.int32(0), kv_pages, rows, jnp.full((num_rows, steps), config.pad_id, jnp.int32),
          jnp.zeros((num_rows, steps), jnp.float32))
  _, kv_pages, rows, tokens_RxK, logprobs_RxK = jax.lax.while_loop(cond, body, loop)
  return kv_pages, rows, tokens_RxK, logprobs_RxK


def pages_per_sequence(pool: PoolConfig, prompt_width: int, max_new_tokens: int) -> int:
  """Page-table length: the pages of a sequence of the longest prompt and response."""
  return -(-(prompt_width + max_new_tokens) // pool.page_size)


def abstract_pool(pool: PoolConfig, model_config, prompt_width: int, max_new_tokens: int,
                  mesh: Mesh | None = None,
                  rules=sharding.DEFAULT_RULES) -> jax.ShapeDtypeStruct:
  """The pool a `ContinuousSampler.sample` call takes for prompts of `prompt_width` tokens, as a
  ShapeDtypeStruct (sharded as `page_pool.pool_sharding` under a mesh)."""
  pages = pool.pool_pages(model_config, pages_per_sequence(pool, prompt_width, max_new_tokens))
  shape = page_pool.pool_shape(model_config, pages, pool.page_size,
                               page_pool.shards(mesh, rules))
  placed = {} if mesh is None else {"sharding": page_pool.pool_sharding(shape, mesh, rules)}
  return jax.ShapeDtypeStruct(shape, model_config.compute_dtype, **placed)


def default_attention(mesh: Mesh | None = None):
  """The paged attention for the devices in use: the TPU kernel on TPU, else the XLA gather."""
  devices = jax.devices() if mesh is None else list(mesh.devices.flat)
  if devices[0].platform == "tpu":
    return tpu_attention.ragged_attention
  return gather_attention


class ContinuousSampler:
  """Samples like `Sampler.sample`, with continuous batching over a page pool (module docstring).

  `attention` computes the prefill's attention over pages, and the decode's under
  kernels="xla", on one shard's rows and pages: `gather_attention` (XLA, any backend) or
  `prerl_jax.kernels.tpu.paged_attention.ragged_attention`; by default
  `default_attention(mesh)`. `kernels` picks the decode step's code as `Sampler(kernels=...)`
  does: "xla" (`paged_forward`, layers under scan) or "cpu" (`cpu_paged_decode`: the C++ kernels
  for one float32 CPU device, layers unrolled over weights packed once per `sample` call);
  "auto" takes "cpu" where it applies. `self.kernels` is the choice.

  `sample` reads the parameters as they are placed: the trainer's (cast to the compute dtype in
  every program), or their rollout copy (`rollout_weights`) on the copy's mesh, which is then
  `mesh` (a replicated copy leaves the decode no weight to gather).
  """

  def __init__(self, model: Decoder, pool: PoolConfig = PoolConfig(), mesh: Mesh | None = None,
               rules=sharding.DEFAULT_RULES, attention=None, kernels: str = "auto"):
    attention = attention or default_attention(mesh)
    self.graphdef, _ = nnx.split(model)
    self.model_config = model.config
    self.pool = pool
    self.mesh, self.rules = mesh, rules
    self.shards = page_pool.shards(mesh, rules)
    self.kernels = resolve_kernels(kernels, model.config.compute_dtype, mesh, "ContinuousSampler")
    code = CPU_CODE if self.kernels == "cpu" else xla_code(attention, mesh, rules)
    self._prefill = jax.jit(sharding.traced_on(mesh, functools.partial(
        _prefill_program, self.graphdef, attention=attention, mesh=mesh, rules=rules)),
        donate_argnums=(1,))
    self._pack = jax.jit(lambda state: code.pack(nnx.merge(self.graphdef, state)))
    self._decode = jax.jit(sharding.traced_on(mesh, functools.partial(
        _decode_program, self.graphdef, code=code)), static_argnums=(5, 6), donate_argnums=(2,))
    self._copy = jax.jit(functools.partial(page_pool.copy_pages, mesh=mesh, rules=rules),
                         donate_argnums=(0,))

  def place(self, tree):
    """Host arrays on the devices, their first axis (a row per shard row) over the batch axes."""
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, tree)
    return sharding.shard_batch(tree, self.mesh, self.rules)

  def sample(self, state, prompt_tokens_BxP, prompt_mask_BxP, key, config: SamplingConfig,
             max_new_tokens_B=None) -> SampleOutput:
    """`config.n` samples per prompt (rows i*n .. i*n+n-1 for prompt i); `max_new_tokens_B`
    optionally caps each prompt's responses below `config.max_new_tokens`."""
    tokens_BxP, mask_BxP = sharding.to_host((prompt_tokens_BxP, prompt_mask_BxP))
    mask_BxP = mask_BxP.astype(bool)
    batch, width = tokens_BxP.shape
    if mask_BxP.shape != (batch, width):
      raise ValueError(f"prompt_mask_BxP has shape {mask_BxP.shape}, expected {(batch, width)} "
                       "like prompt_tokens_BxP")
    limits = np.full(batch, config.max_new_tokens) if max_new_tokens_B is None else np.asarray(
        max_new_tokens_B)
    if limits.shape != (batch,) or limits.min() < 1 or limits.max() > config.max_new_tokens:
      raise ValueError(f"max_new_tokens_B must hold {batch} values in [1, "
                       f"{config.max_new_tokens}] (SamplingConfig.max_new_tokens)")
    if config.n > self.pool.rows:
      raise ValueError(f"SamplingConfig.n={config.n} samples of a prompt do not fit in "
                       f"PoolConfig.rows={self.pool.rows} decode rows")
    groups = []
    for i in range(batch):
      prompt = tokens_BxP[i][mask_BxP[i]].tolist()
      if not prompt:
        raise ValueError(f"prompt {i} is empty")
      sequences = list(range(i * config.n, (i + 1) * config.n))
      groups.append(schedule.Group(prompt, sequences, int(limits[i])))
    self.pool = pool_budget.sized_pool(self, state, key, config, width)  # Once, where needed.
    run = _Run(self, state, key, config, width, groups)
    run.run()
    return run.output(tokens_BxP, mask_BxP)

  def trace(self, state, key, config: SamplingConfig, prompt_width: int) -> dict:
    """{"prefill": ..., "decode": ...}: the two programs `sample` runs, traced without running.

    state and key may be abstract (`jax.ShapeDtypeStruct`s with shardings), so a dry run compiles
    them ahead of time. The pool is the one `sample` would take for prompts of `prompt_width`
    tokens; prefill writes one chunk of `PoolConfig.prefill_chunk` tokens of a prompt per batch
    shard; decode runs `PoolConfig.chunk_steps` steps of every live row (its one while_loop).
    """
    pool, shards = self.pool, self.shards
    per_sequence = pages_per_sequence(pool, prompt_width, config.max_new_tokens)
    kv_pages = abstract_pool(pool, self.model_config, prompt_width, config.max_new_tokens,
                             self.mesh, self.rules)

    def array(shape, dtype=jnp.int32):
      placed = {} if self.mesh is None else {
          "sharding": sharding.batch_sharding(self.mesh, len(shape), self.rules)}
      return jax.ShapeDtypeStruct(shape, dtype, **placed)

    per_row = array((shards * pool.rows,))
    rows = RowState(token_R=per_row, position_R=per_row, count_R=per_row, limit_R=per_row,
                    sequence_R=per_row, live_R=array((shards * pool.rows,), jnp.bool_),
                    page_table_RxP=array((shards * pool.rows, per_sequence)))
    return {
        "prefill": self._prefill.trace(state, kv_pages, array((shards, pool.prefill_chunk)),
                                       array((shards,)), array((shards,)),
                                       array((shards, per_sequence))),
        "decode": self._decode.trace(state, jax.eval_shape(self._pack, state), kv_pages, rows,
                                     key, config, pool.chunk_steps),
    }

  def empty_pool(self, pages: int):
    """A zero-filled pool of `pages` pages per shard. A `sample` call makes its own and drops it
    when it returns, so that the update that follows has the memory."""
    return page_pool.empty_pool(self.model_config, pages, self.pool.page_size, self.mesh,
                                self.rules)


class _Run(schedule.Scheduler):
  """One `ContinuousSampler.sample` call: the scheduler's decisions (`schedule.Scheduler`) run
  on the devices, and the tokens and log-probs each sequence sampled."""

  def __init__(self, sampler: ContinuousSampler, state, key, config: SamplingConfig,
               prompt_width: int, groups: list[schedule.Group]):
    pool = sampler.pool
    per_sequence = pages_per_sequence(pool, prompt_width, config.max_new_tokens)
    pages = pool.pool_pages(sampler.model_config, per_sequence)
    super().__init__(groups, sampler.shards, pool.rows, pages, pool.page_size, pool.chunk_steps,
                     per_sequence)
    self.sampler, self.state, self.key, self.config = sampler, state, key, config
    self.kv_pages = sampler.empty_pool(pages)
    self.packed = sampler._pack(state)
    total = sum(len(g.sequences) for g in groups)
    self.tokens = [[] for _ in range(total)]
    self.logprobs = [[] for _ in range(total)]
    self.widths = schedule.prefill_widths(pool.prefill_chunk)

  def _prefill(self, admitted):
    """Writes the admitted prompts' first tokens into their pages, one prompt per shard per call
    (chunk by chunk), then gives each sample but the first its own copy of a prompt's partly
    filled last page."""
    for items, start, parts, width in schedule.prefill_calls(admitted, self.shards, self.widths):
      tokens = np.full((self.shards, width), self.config.pad_id, np.int32)
      tables = np.full((self.shards, self.pages_per_sequence), page_pool.SCRATCH_PAGE, np.int32)
      for shard, (part, item) in enumerate(zip(parts, items)):
        tokens[shard, :len(part)] = part
        if item is not None:
          tables[shard] = self.rows["page_table_RxP"][item[1][0]]
      counts = np.asarray([len(part) for part in parts], np.int32)
      self.kv_pages = self.sampler._prefill(
          self.state, self.kv_pages, *self.sampler.place(
              (tokens, np.full(self.shards, start, np.int32), counts, tables)))
    sources = [[] for _ in range(self.shards)]  # Per shard: the pages copied, and where to.
    destinations = [[] for _ in range(self.shards)]
    for shard, group, rows in admitted:
      shared = (len(group.prompt) - 1) // self.page_size
      if (len(group.prompt) - 1) % self.page_size and len(rows) > 1:
        sources[shard] += [self.row_pages[rows[0]][shared]] * (len(rows) - 1)
        destinations[shard] += [self.row_pages[r][shared] for r in rows[1:]]
    most = max(map(len, sources))
    if most:
      width = 2**math.ceil(math.log2(most))  # Fewer copy programs.
      pad = lambda pages: pages + [page_pool.SCRATCH_PAGE] * (width - len(pages))
      self.kv_pages = self.sampler._copy(self.kv_pages, *self.sampler.place(
          (np.asarray([pad(p) for p in sources], np.int32),
           np.asarray([pad(p) for p in destinations], np.int32))))

  def _preempt(self, group: schedule.Group):
    """Drops what the group's unfinished samples sampled, then puts it back in the queue."""
    for sequence in group.sequences:
      self.tokens[sequence], self.logprobs[sequence] = [], []
    super()._preempt(group)

  def _decode_chunk(self, index: np.ndarray) -> dict[str, np.ndarray]:
    """One decode chunk of `rows[index]` (each shard's block of rows runs in that shard);
    appends what each occupied row sampled to its sequence."""
    chunk_rows = {name: values[index] for name, values in self.rows.items()}
    rows = RowState(**self.sampler.place(chunk_rows))
    self.kv_pages, rows, tokens_RxK, logprobs_RxK = self.sampler._decode(
        self.state, self.packed, self.kv_pages, rows, self.key, self.config, self.steps)
    tokens_RxK, logprobs_RxK = sharding.to_host((tokens_RxK, logprobs_RxK))
    fields = sharding.to_host({f.name: getattr(rows, f.name) for f in dataclasses.fields(rows)})
    for column, row in enumerate(index):
      if self.row_group[row] is not None:
        sequence = self.rows["sequence_R"][row]
        emitted = fields["count_R"][column] - self.rows["count_R"][row]
        self.tokens[sequence] += tokens_RxK[column, :emitted].tolist()
        self.logprobs[sequence] += logprobs_RxK[column, :emitted].tolist()
    return fields

  def output(self, tokens_BxP, mask_BxP) -> SampleOutput:
    config, total = self.config, len(self.tokens)
    tokens_NxM = np.full((total, config.max_new_tokens), config.pad_id, np.int32)
    logprobs_NxM = np.zeros((total, config.max_new_tokens), np.float32)
    lengths_N = np.array([len(t) for t in self.tokens], np.int32)
    for sequence, (tokens, logprobs) in enumerate(zip(self.tokens, self.logprobs)):
      tokens_NxM[sequence, :len(tokens)] = tokens
      logprobs_NxM[sequence, :len(logprobs)] = logprobs
    truncated_N = np.array([not tokens or tokens[-1] not in config.stop_ids
                            for tokens in self.tokens])
    return SampleOutput(tokens_NxM=tokens_NxM, lengths_N=lengths_N, logprobs_NxM=logprobs_NxM,
                        truncated_N=truncated_N,
                        prompt_tokens_NxP=np.repeat(tokens_BxP, config.n, axis=0),
                        prompt_mask_NxP=np.repeat(mask_BxP, config.n, axis=0))
