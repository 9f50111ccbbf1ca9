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
chunks' results, which are the same on every host of a multi-host run.

`sample` returns the `SampleOutput` of `Sampler.sample` (the same log-prob convention); the draws
differ from the static sampler's, which keys by step only.
"""

import bisect
import collections
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
from prerl_jax.generate import page_pool
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
  included); None sizes the pool from `kv_cache_gib` (per shard), or else gives every row room for
  its longest sequence. chunk_steps: decode steps per host round trip. prefill_chunk: most prompt
  tokens per prefill call.
  """

  rows: int = 64
  page_size: int = 16
  pages: int | None = None
  kv_cache_gib: float | None = None
  chunk_steps: int = 16
  prefill_chunk: int = 512

  def __post_init__(self):
    checks = (("rows", self.rows >= 1), ("page_size", self.page_size >= 1),
              ("pages", self.pages is None or self.pages >= 2),
              ("kv_cache_gib", self.kv_cache_gib is None or self.kv_cache_gib > 0),
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


def _decode_widths(rows: int) -> tuple[int, ...]:
  """The row counts a decode chunk is compiled for: a quarter, half and all of the rows (a
  chunk runs the narrowest that holds the occupied rows, so a long tail of responses decodes
  without the finished rows' work)."""
  return tuple(sorted({-(-rows // parts) for parts in (4, 2, 1)}))


def _prefill_widths(prefill_chunk: int) -> tuple[int, ...]:
  """The token widths a prefill call is compiled for: powers of two from 16, then the chunk."""
  widths = [w for w in (2**i for i in range(4, 31)) if w < prefill_chunk]
  return tuple(widths) + (prefill_chunk,)


@dataclasses.dataclass
class _Group:
  """A prompt, the samples of it still to be sampled, and the shard it runs in once admitted."""
  prompt: list[int]
  sequences: list[int]
  limit: int
  shard: int = 0


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
    self._prefill = jax.jit(functools.partial(_prefill_program, self.graphdef,
                                              attention=attention, mesh=mesh, rules=rules),
                            donate_argnums=(1,))
    self._pack = jax.jit(lambda state: code.pack(nnx.merge(self.graphdef, state)))
    self._decode = jax.jit(functools.partial(_decode_program, self.graphdef, code=code),
                           static_argnums=(5, 6), donate_argnums=(2,))
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
      groups.append(_Group(prompt, list(range(i * config.n, (i + 1) * config.n)), int(limits[i])))
    run = _Run(self, state, key, config, width, groups)
    run.until_done()
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


class _Run:
  """The host side of one `ContinuousSampler.sample` call: queue, rows, pages, results.

  Row g is row g % rows of batch shard g // rows (`PoolConfig.rows` per shard); its pages come
  from that shard's allocator and its page table holds their local indices."""

  def __init__(self, sampler: ContinuousSampler, state, key, config: SamplingConfig,
               prompt_width: int, groups: list[_Group]):
    self.sampler, self.state, self.key, self.config = sampler, state, key, config
    pool = sampler.pool
    self.page_size, self.steps = pool.page_size, pool.chunk_steps
    self.pages_per_sequence = pages_per_sequence(pool, prompt_width, config.max_new_tokens)
    pages = pool.pool_pages(sampler.model_config, self.pages_per_sequence)
    self.shard_rows, self.shards = pool.rows, sampler.shards
    self.allocators = [page_pool.PageAllocator(pages) for _ in range(self.shards)]
    self.kv_pages = sampler.empty_pool(pages)
    self.packed = sampler._pack(state)
    self.queue = collections.deque(groups)
    rows = self.shards * pool.rows
    self.rows = dict(token_R=np.zeros(rows, np.int32), position_R=np.zeros(rows, np.int32),
                     count_R=np.zeros(rows, np.int32), limit_R=np.ones(rows, np.int32),
                     sequence_R=np.zeros(rows, np.int32), live_R=np.zeros(rows, bool),
                     page_table_RxP=np.zeros((rows, self.pages_per_sequence), np.int32))
    self.row_pages = [[] for _ in range(rows)]  # Pages each row holds, in position order.
    self.row_group: list[_Group | None] = [None] * rows
    self.admitted: list[_Group] = []  # Live groups, oldest first.
    total = sum(len(g.sequences) for g in groups)
    self.tokens = [[] for _ in range(total)]
    self.logprobs = [[] for _ in range(total)]
    self.widths = _prefill_widths(pool.prefill_chunk)
    self.decode_widths = _decode_widths(pool.rows)

  def until_done(self):
    while self.queue or self.admitted:
      self._admit()
      if not self.admitted:
        raise self._pool_too_small(self.queue[0])
      self._reserve_chunk_pages()
      self._decode_chunk()

  def _pool_too_small(self, group: _Group) -> MemoryError:
    return MemoryError(
        f"the page pool ({self.allocators[0].pages} pages of {self.page_size} slots per shard) "
        f"cannot hold the {len(group.sequences)} samples of one {len(group.prompt)}-token "
        "prompt; raise PoolConfig.pages or rollout.kv_cache_gib")

  def _shard_rows(self, shard: int) -> range:
    return range(shard * self.shard_rows, (shard + 1) * self.shard_rows)

  def _missing_pages(self) -> list[dict[int, int]]:
    """Per shard, {live row: how many more pages it needs to hold every position its next chunk
    writes}."""
    rows, missing = self.rows, [{} for _ in range(self.shards)]
    for row, group in enumerate(self.row_group):
      if group is not None:
        steps = min(self.steps, rows["limit_R"][row] - rows["count_R"][row])
        needed = -(-(rows["position_R"][row] + steps) // self.page_size)
        missing[row // self.shard_rows][row] = max(needed - len(self.row_pages[row]), 0)
    return missing

  def _admit(self):
    """Admits queued groups, in order, while a shard has their rows and first chunk's pages free
    (after the pages its live rows' next chunk needs), then prefills them."""
    reserved = [sum(m.values()) for m in self._missing_pages()]
    admitted = []  # (shard, group, its rows)
    while self.queue:
      group = self.queue[0]
      prefix = len(group.prompt) - 1
      shared = prefix // self.page_size
      own = -(-(prefix + min(self.steps, group.limit)) // self.page_size) - shared
      needed = shared + own * len(group.sequences)
      choices = []
      for shard, allocator in enumerate(self.allocators):
        free_rows = [r for r in self._shard_rows(shard) if self.row_group[r] is None]
        free_pages = allocator.free_pages - reserved[shard]
        if len(free_rows) >= len(group.sequences) and needed <= free_pages:
          choices.append((-len(free_rows), -free_pages, shard, free_rows))
      if not choices:
        break
      _, _, shard, free_rows = min(choices)
      self.queue.popleft()
      allocator = self.allocators[shard]
      shared_pages = allocator.allocate(shared)
      allocator.share(shared_pages * (len(group.sequences) - 1))
      for row, sequence in zip(free_rows, group.sequences):
        self.row_pages[row] = shared_pages + allocator.allocate(own)
        self.row_group[row] = group
        self._set_row(row, token=group.prompt[-1], position=prefix, count=0, limit=group.limit,
                      sequence=sequence, live=True)
      self.admitted.append(group)
      group.shard = shard
      admitted.append((shard, group, free_rows[:len(group.sequences)]))
    if admitted:
      self._prefill(admitted)

  def _set_row(self, row, **values):
    for name, value in values.items():
      self.rows[f"{name}_R"][row] = value
    table = self.rows["page_table_RxP"]
    table[row] = page_pool.SCRATCH_PAGE
    table[row, :len(self.row_pages[row])] = self.row_pages[row]

  def _prefill(self, admitted):
    """Writes the admitted prompts' first tokens into their pages, one prompt per shard per call
    (chunk by chunk), then gives each sample but the first its own copy of a prompt's partly
    filled last page."""
    per_shard = [[(g, rows) for s, g, rows in admitted if s == shard]
                 for shard in range(self.shards)]
    chunk = self.widths[-1]
    for wave in range(max(map(len, per_shard))):
      items = [queue[wave] if wave < len(queue) else None for queue in per_shard]
      longest = max(len(g.prompt) - 1 for g, _ in filter(None, items))
      for start in range(0, longest, chunk):
        parts = [[] if item is None else item[0].prompt[:-1][start:start + chunk]
                 for item in items]
        width = self.widths[bisect.bisect_left(self.widths, max(map(len, parts)))]
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

  def _reserve_chunk_pages(self):
    """Gives every live row the pages its next chunk writes, putting a shard's newest groups back
    in the queue while its pool part is short."""
    while True:
      missing = self._missing_pages()
      short = [shard for shard in range(self.shards)
               if sum(missing[shard].values()) > self.allocators[shard].free_pages]
      if not short:
        break
      in_shard = [g for g in self.admitted if g.shard == short[0]]
      if len(in_shard) == 1:
        group = in_shard[0]
        raise self._pool_too_small(group)
      self._preempt(in_shard[-1])
    for shard_missing in missing:
      for row, count in shard_missing.items():
        if count > 0:
          self.row_pages[row] += self.allocators[row // self.shard_rows].allocate(count)
          self._set_row(row)

  def _preempt(self, group: _Group):
    """Frees a group's rows and pages and queues its unfinished samples first."""
    self.admitted.remove(group)
    for row in range(len(self.row_group)):
      if self.row_group[row] is group:
        sequence = self.rows["sequence_R"][row]
        self.tokens[sequence], self.logprobs[sequence] = [], []
        self._free_row(row)
    self.queue.appendleft(group)

  def _free_row(self, row: int):
    self.release_pages(row // self.shard_rows, self.row_pages[row])
    self.row_pages[row], self.row_group[row] = [], None
    self._set_row(row, live=False)

  def release_pages(self, shard: int, pages) -> list[int]:
    """Releases a row's hold on its pages of `shard`; returns the pages that became free."""
    return self.allocators[shard].release(pages)

  def _decode_chunk(self):
    """One decode chunk of the occupied rows: each shard's run as the first rows of the
    narrowest decode width that holds the fullest shard's (free rows, which are not live, fill
    the rest)."""
    occupied = [[r for r in self._shard_rows(shard) if self.row_group[r] is not None]
                for shard in range(self.shards)]
    width = min(w for w in self.decode_widths if w >= max(map(len, occupied)))
    index = []
    for shard, rows in enumerate(occupied):
      free = [r for r in self._shard_rows(shard) if self.row_group[r] is None]
      index += rows + free[:width - len(rows)]
    index = np.asarray(index)
    rows = RowState(**self.sampler.place({name: value[index] for name, value in self.rows.items()}))
    self.kv_pages, rows, tokens_RxK, logprobs_RxK = self.sampler._decode(
        self.state, self.packed, self.kv_pages, rows, self.key, self.config, self.steps)
    tokens_RxK, logprobs_RxK = sharding.to_host((tokens_RxK, logprobs_RxK))
    before = self.rows["count_R"].copy()
    fields = {f.name: getattr(rows, f.name) for f in dataclasses.fields(rows)}
    for name, value in sharding.to_host(fields).items():
      self.rows[name][index] = value
    for column, row in enumerate(index):
      group = self.row_group[row]
      if group is None:
        continue
      sequence, emitted = self.rows["sequence_R"][row], self.rows["count_R"][row] - before[row]
      self.tokens[sequence] += tokens_RxK[column, :emitted].tolist()
      self.logprobs[sequence] += logprobs_RxK[column, :emitted].tolist()
      if not self.rows["live_R"][row]:
        group.sequences.remove(sequence)
        self._free_row(row)
        if not group.sequences:
          self.admitted.remove(group)

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
