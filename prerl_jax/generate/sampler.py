"""Fused sampler: one jitted program that prefills left-padded prompts and decodes in a while_loop.

The KV cache is allocated inside the program and kept as per-layer blocks (`prerl_jax.generate.decode`):
one prompt block per layer, holding each prompt's keys and values once, and one block per decode
segment, written in place by that segment's while_loop; the caller passes no cache.

Prompt lengths are left-padded up to a bucket (`SamplingConfig.prompt_buckets`, by default powers
of two from 64 to 4096), so a training run compiles at most one program per bucket for a fixed
prompt batch size and config. Each prompt is prefilled once and its cache is not copied: its
last logits are repeated `n` times and rows `i*n .. i*n+n-1` are the samples of prompt `i`, which
attend to prompt `i`'s block together.

Log-prob convention: `SampleOutput.logprobs_NxM` holds `log_softmax(logits / temperature)` of the
sampled token, taken BEFORE top-k / top-p truncation (as verl does), so a trainer reproduces it
by dividing its logits by the same temperature. With `top_k=0, top_p=1` (the RL setting) that is
exactly the distribution sampled from. Greedy decoding records `log_softmax(logits)`.

The decode loop's code (`Sampler(kernels=...)`): "xla" is `decode.write_and_attend` and
`model.LayerOps()`; "cpu" is the same computation in C++ FFI kernels for one float32 CPU device
(`cpu_attention.write_and_attend`; `cpu_matmul.matmul` and `gated_matmul` over weights packed
once per call, for the layers' products, their residual adds and MLP gates, and the logits;
`cpu_norm.rms_norm`); "auto" (the default) takes "cpu" where it applies and the kernels build,
else "xla". The prefill runs XLA's code in both.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from prerl_jax.kernels.cpu import attention as cpu_attention
from prerl_jax.kernels.cpu import library as cpu_kernels
from prerl_jax.kernels.cpu import matmul as cpu_matmul
from prerl_jax.kernels.cpu import norm as cpu_norm
from prerl_jax.data import padding
from prerl_jax.models import rope
from prerl_jax import sharding
from prerl_jax.generate.decode import block_shapes, block_sharding, decode_step, write_and_attend
from prerl_jax.models.decoder import Decoder, LayerOps, positions_from_mask
from prerl_jax.models.tokenizer import stop_token_ids

# A decode of M new tokens runs as min(4, M // 64) (at least 1) while_loops, each writing its own
# cache block and attending only over the blocks filled so far; short decodes use one loop and
# compile faster.
MAX_DECODE_SEGMENTS = 4
SEGMENT_MIN_STEPS = 64


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Per-call sampling settings. Hashable: it is a static argument of the sampling program."""

  max_new_tokens: int
  pad_id: int
  stop_ids: tuple[int, ...] = ()
  temperature: float = 1.0
  top_k: int = 0  # 0: no top-k truncation.
  top_p: float = 1.0  # 1: no nucleus truncation.
  greedy: bool = False
  n: int = 1  # Samples per prompt.
  prompt_buckets: tuple[int, ...] = padding.PROMPT_BUCKETS

  def __post_init__(self):
    object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
    object.__setattr__(self, "prompt_buckets", tuple(int(b) for b in self.prompt_buckets))
    checks = (
        ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
        ("temperature", self.greedy or self.temperature > 0, "must be > 0 unless greedy"),
        ("top_k", self.top_k >= 0, "must be >= 0 (0 disables top-k)"),
        ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
        ("n", self.n >= 1, "must be >= 1"),
        ("prompt_buckets", bool(self.prompt_buckets) and all(
            a < b for a, b in zip((0,) + self.prompt_buckets, self.prompt_buckets)),
         "must be positive and strictly increasing"),
    )
    for key, ok, rule in checks:
      if not ok:
        raise ValueError(f"SamplingConfig.{key}={getattr(self, key)!r} {rule}")

  @classmethod
  def from_tokenizer(cls, tokenizer, max_new_tokens: int, **settings) -> "SamplingConfig":
    """A config whose stop ids and pad id come from the tokenizer (eos and `<|im_end|>`)."""
    settings.setdefault("stop_ids", stop_token_ids(tokenizer))
    settings.setdefault("pad_id", tokenizer.pad_token_id)
    return cls(max_new_tokens=max_new_tokens, **settings)

  def bucket(self, prompt_length: int) -> int:
    """The smallest prompt bucket that holds a prompt of this many tokens."""
    return padding.bucket(prompt_length, self.prompt_buckets, "prompt bucket",
                          "SamplingConfig.prompt_buckets")


@struct.dataclass
class SampleOutput:
  """Sampled responses (N = prompts * n rows; rows i*n .. i*n+n-1 belong to prompt i).

  Attributes:
    tokens_NxM: response ids, right-padded with the pad id (a stop token, when emitted, is the
      last real token of its response).
    lengths_N: response lengths in tokens, the stop token included.
    logprobs_NxM: log-prob of each sampled token (see the module docstring); 0 at padding.
    truncated_N: True where no stop token came within `max_new_tokens`.
    prompt_tokens_NxP, prompt_mask_NxP: the left-padded prompts, repeated n times, so
      `[prompt][response]` rows can be scored by the trainer without host bookkeeping.
  """

  tokens_NxM: jax.Array
  lengths_N: jax.Array
  logprobs_NxM: jax.Array
  truncated_N: jax.Array
  prompt_tokens_NxP: jax.Array
  prompt_mask_NxP: jax.Array

  @property
  def response_mask_NxM(self) -> jax.Array:
    return jnp.arange(self.tokens_NxM.shape[1]) < self.lengths_N[:, None]


def prompt_batch(prompts: Sequence[Sequence[int]], config: SamplingConfig,
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_BxP int32, mask_BxP bool): prompts left-padded with the pad id to their bucket."""
  if not prompts:
    raise ValueError("prompt_batch needs at least one prompt")
  for row, ids in enumerate(prompts):
    if not len(ids):
      raise ValueError(f"prompt {row} is empty")
  return padding.left_pad(prompts, config.pad_id, config.bucket(max(map(len, prompts))))


# Sampling picks a block of this many vocabulary entries, then a token inside it.
SAMPLE_BLOCK = 256


def _categorical(key, logits_NxV) -> tuple[jax.Array, jax.Array]:
  """One draw per row from softmax(logits_NxV), and logsumexp(logits_NxV) per row.

  Gumbel-max over blocks, then inside the block: a block is drawn with probability equal to its
  total mass (Gumbel-max over the blocks' logsumexp), then a token inside it (Gumbel-max over its
  logits): exactly the categorical distribution, with 2 * sqrt(V)-ish Gumbel draws per row
  instead of V (`jax.random.categorical` drew 64 x 49152 Gumbels per SmolLM2 decode step: 29 ms
  of a 100 ms roofline on the 2-core CPU). The row's logsumexp comes from the blocks' (saving a
  second exp over the vocabulary for the log-prob).
  Gumbel-max keeps draws stable under float noise: an inverse-CDF lookup tried first changed
  tokens between a 1-process and a 2-process run of the same model (near-uniform logits put
  cumulative-sum boundaries within rounding of the target).
  """
  rows, width = logits_NxV.shape
  block = min(SAMPLE_BLOCK, width)
  blocks = -(-width // block)
  logits_NxV = jnp.pad(logits_NxV, ((0, 0), (0, blocks * block - width)),
                       constant_values=-jnp.inf)
  logits_NxBxC = logits_NxV.reshape(rows, blocks, block)
  block_key, token_key = jax.random.split(key)
  block_lse_NxB = jax.nn.logsumexp(logits_NxBxC, axis=-1)
  block_N = jnp.argmax(block_lse_NxB + jax.random.gumbel(block_key, (rows, blocks)), axis=-1)
  inside_NxC = jnp.take_along_axis(logits_NxBxC, block_N[:, None, None], axis=1)[:, 0]
  index_N = jnp.argmax(inside_NxC + jax.random.gumbel(token_key, (rows, block)), axis=-1)
  token_N = (block_N * block + index_N).astype(jnp.int32)
  return token_N, jax.nn.logsumexp(block_lse_NxB, axis=-1)


def choose_tokens(logits_NxV, key, config: SamplingConfig):
  """(next token, its log-prob under the convention of the module docstring)."""
  if config.greedy:
    scaled_NxV = logits_NxV
    token_N = jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
    logsumexp_N = jax.nn.logsumexp(logits_NxV, axis=-1)
  else:
    scaled_NxV = logits_NxV / config.temperature
    if config.top_k or config.top_p < 1:
      vocab = logits_NxV.shape[-1]
      values_NxK, indices_NxK = jax.lax.top_k(scaled_NxV, min(config.top_k or vocab, vocab))
      if config.top_p < 1:
        probs_NxK = jax.nn.softmax(values_NxK, axis=-1)
        mass_before_NxK = jnp.cumsum(probs_NxK, axis=-1) - probs_NxK
        values_NxK = jnp.where(mass_before_NxK < config.top_p, values_NxK, -jnp.inf)
      choice_N, _ = _categorical(key, values_NxK)
      token_N = jnp.take_along_axis(indices_NxK, choice_N[:, None], axis=-1)[:, 0]
      logsumexp_N = jax.nn.logsumexp(scaled_NxV, axis=-1)
    else:
      token_N, logsumexp_N = _categorical(key, scaled_NxV)
  chosen_N = jnp.take_along_axis(scaled_NxV, token_N[:, None], axis=-1)[:, 0]
  return token_N, chosen_N - logsumexp_N


def decode_segments(max_new_tokens: int) -> list[tuple[int, int]]:
  """(first_step, end_step) of each decode while_loop; each writes its own cache block.

  Decode step t >= 1 feeds the token sampled at t - 1 (step 0 samples from the prefill's logits).
  The steps are split into segments so early steps attend over fewer slots.
  """
  segments = max(1, min(MAX_DECODE_SEGMENTS, max_new_tokens // SEGMENT_MIN_STEPS))
  bounds = np.linspace(1, max_new_tokens, segments + 1).round().astype(int)
  return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _sample_program(graphdef, state, prompt_tokens_BxP, prompt_mask_BxP, key,
                    config: SamplingConfig, mesh, rules, kernels):
  """Prefill, then decode until every row has stopped or `max_new_tokens` are sampled."""
  model: Decoder = nnx.merge(graphdef, state)
  batch, _ = prompt_tokens_BxP.shape
  max_new, n = config.max_new_tokens, config.n
  rows = batch * n

  def constrain(name, array):
    if mesh is None:
      return array
    return jax.lax.with_sharding_constraint(array, block_sharding(name, array.shape, mesh, rules))

  hidden_BxPxD, (keys, values) = model(prompt_tokens_BxP, positions_from_mask(prompt_mask_BxP),
                                       prompt_mask_BxP, return_kv=True)
  # Batch-sharded prefill keys and values keep the prefill itself split over the batch (without
  # this the partitioner replicated the prefill activations: 17 GiB more per device for
  # Qwen3-4B on 64 devices in the dry run).
  keys, values = constrain("k", keys), constrain("v", values)
  last_logits_BxV = model.logits(hidden_BxPxD[:, -1:])[:, 0]
  # The prompt block of every layer: each prompt once, shared by its n samples.
  prompt_blocks = [(keys[i], values[i], prompt_mask_BxP) for i in range(model.config.num_layers)]
  layer_weights = model.layer_weights()
  if kernels == "cpu":
    layer_weights = [cpu_matmul.pack_layer(w) for w in layer_weights]
    head = cpu_matmul.pack(model.head())
    attention, logits = cpu_attention.write_and_attend, lambda h: cpu_matmul.matmul(h, head)
    ops = LayerOps(cpu_matmul.matmul, cpu_matmul.gated_matmul, cpu_norm.rms_norm)
  else:
    attention, logits, ops = write_and_attend, model.logits, LayerOps()

  repeat = lambda x: jnp.repeat(x, n, axis=0)
  prompt_lengths_N = repeat(prompt_mask_BxP.sum(axis=1, dtype=jnp.int32))
  # Rotary angles of every decode step's token, computed once (step t >= 1 feeds position
  # prompt_length + t - 1); a step slices its column.
  rotations = rope.rotation(prompt_lengths_N[:, None] + jnp.arange(max_new) - 1,
                            rope.inverse_frequencies(model.config))
  stop_ids = jnp.asarray(config.stop_ids or (-1,), jnp.int32)

  def emit(step, logits_NxV, carry):
    tokens_NxM, logprobs_NxM, lengths_N, done_N = carry
    token_N, logprob_N = choose_tokens(logits_NxV, jax.random.fold_in(key, step), config)
    token_N = jnp.where(done_N, config.pad_id, token_N)
    logprob_N = jnp.where(done_N, 0.0, logprob_N)
    tokens_NxM = jax.lax.dynamic_update_slice(tokens_NxM, token_N[:, None], (0, step))
    logprobs_NxM = jax.lax.dynamic_update_slice(logprobs_NxM, logprob_N[:, None], (0, step))
    lengths_N = lengths_N + (~done_N).astype(jnp.int32)
    done_N = done_N | jnp.isin(token_N, stop_ids)
    return token_N, (tokens_NxM, logprobs_NxM, lengths_N, done_N)

  outputs = (jnp.full((rows, max_new), config.pad_id, jnp.int32),
             jnp.zeros((rows, max_new), jnp.float32), jnp.zeros((rows,), jnp.int32),
             jnp.zeros((rows,), bool))
  token_N, outputs = emit(0, repeat(last_logits_BxV), outputs)

  def decode(first_step, end_step, token_N, earlier_blocks, outputs):
    """Decode steps first_step .. end_step - 1 into a new block of end_step - first_step slots."""
    width = end_step - first_step
    shapes = block_shapes(model.config, rows, width)
    block = [tuple(constrain(name, jnp.zeros(shapes[name], model.config.compute_dtype))
                   for name in ("k", "v")) for _ in range(model.config.num_layers)]

    def cond(loop):
      step, _, _, outputs = loop
      return (step < end_step) & ~jnp.all(outputs[3])

    def body(loop):
      step, token_N, block, outputs = loop
      offset = step - first_step
      filled_C = jnp.arange(width) <= offset
      cache = [blocks + [(k, v, filled_C)] for blocks, (k, v) in zip(earlier_blocks, block)]
      rotation = tuple(jax.lax.dynamic_slice_in_dim(r, step, 1, axis=1) for r in rotations)
      hidden_Nx1xD, cache = decode_step(model, layer_weights, cache, token_N, rotation,
                                        offset, attention, ops)
      block = [blocks[-1][:2] for blocks in cache]
      token_N, outputs = emit(step, logits(hidden_Nx1xD)[:, 0], outputs)
      return step + 1, token_N, block, outputs

    _, token_N, block, outputs = jax.lax.while_loop(
        cond, body, (jnp.int32(first_step), token_N, block, outputs))
    all_filled = jnp.ones((width,), bool)
    return token_N, [blocks + [(k, v, all_filled)]
                     for blocks, (k, v) in zip(earlier_blocks, block)], outputs

  cache = [[block] for block in prompt_blocks]
  for first_step, end_step in decode_segments(max_new):
    token_N, cache, outputs = decode(first_step, end_step, token_N, cache, outputs)
  tokens_NxM, logprobs_NxM, lengths_N, done_N = outputs
  return SampleOutput(tokens_NxM=tokens_NxM, lengths_N=lengths_N, logprobs_NxM=logprobs_NxM,
                      truncated_N=~done_N, prompt_tokens_NxP=repeat(prompt_tokens_BxP),
                      prompt_mask_NxP=repeat(prompt_mask_BxP))


KERNEL_CHOICES = ("auto", "xla", "cpu")


def resolve_kernels(choice: str, compute_dtype, mesh: Mesh | None, owner: str = "Sampler") -> str:
  """The decode code `owner(kernels=choice)` runs, "xla" or "cpu" (module docstring)."""
  if choice not in KERNEL_CHOICES:
    raise ValueError(f"{owner} kernels={choice!r}: expected one of {KERNEL_CHOICES}")
  if choice == "xla":
    return choice
  devices = [jax.devices()[0]] if mesh is None else list(mesh.devices.flat)
  fits = (len(devices) == 1 and devices[0].platform == "cpu"
          and jnp.dtype(compute_dtype) == jnp.float32)
  if choice == "auto":
    return "cpu" if fits and cpu_kernels.unavailable_reason() is None else "xla"
  if not fits:
    raise ValueError(f"{owner} kernels='cpu' needs one CPU device and float32 compute, "
                     f"got {len(devices)} {devices[0].platform} device(s) and {compute_dtype}")
  reason = cpu_kernels.unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"{owner} kernels='cpu': {reason}")
  return choice


class Sampler:
  """Samples from a Decoder with one compiled program per (prompt bucket, batch size, config).

  Usage: `sampler = Sampler(model, mesh)`, then per step
  `sampler.sample(state, tokens_BxP, mask_BxP, key, config)` with `state = nnx.state(model)`
  (the current parameters) or its rollout copy (`rollout_weights`: on the copy's mesh, which
  is then the sampler's), and prompts from `prompt_batch`. Under a mesh the prompt batch is
  split over the `data` and `fsdp` axes; the parameters are read as they are placed.
  `kernels` is "auto", "xla" or "cpu" (module docstring); `self.kernels` is the choice.
  """

  def __init__(self, model: Decoder, mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES,
               kernels: str = "auto"):
    self.graphdef = nnx.graphdef(model)
    self.model_config = model.config
    self.mesh = mesh
    self.rules = rules
    self.kernels = resolve_kernels(kernels, model.config.compute_dtype, mesh)
    program = functools.partial(_sample_program, self.graphdef, mesh=mesh, rules=rules,
                                kernels=self.kernels)
    static = (4,)  # config
    if mesh is None:
      self._program = jax.jit(program, static_argnums=static)
      self._batch_devices = 1
      return
    rows = sharding.batch_sharding(mesh, 1, rules)
    prompts = sharding.batch_sharding(mesh, 2, rules)
    self._batch_devices = sharding.batch_devices(mesh, rules)
    self._program = jax.jit(
        sharding.traced_on(mesh, program), static_argnums=static,
        in_shardings=(None, prompts, prompts, sharding.replicated(mesh)),  # State as placed.
        out_shardings=SampleOutput(tokens_NxM=prompts, lengths_N=rows, logprobs_NxM=prompts,
                                   truncated_N=rows, prompt_tokens_NxP=prompts,
                                   prompt_mask_NxP=prompts))

  def sample(self, state, prompt_tokens_BxP, prompt_mask_BxP, key,
             config: SamplingConfig) -> SampleOutput:
    """Samples `config.n` responses per prompt; see SampleOutput and the module docstring."""
    batch, width = np.shape(prompt_tokens_BxP)
    if np.shape(prompt_mask_BxP) != (batch, width):
      raise ValueError(f"prompt_mask_BxP has shape {np.shape(prompt_mask_BxP)}, expected "
                       f"{(batch, width)} like prompt_tokens_BxP")
    if width not in config.prompt_buckets:
      raise ValueError(f"prompt width {width} is not one of SamplingConfig.prompt_buckets "
                       f"{config.prompt_buckets}; build prompts with prompt_batch")
    if batch % self._batch_devices:
      raise ValueError(f"prompt batch {batch} is not divisible by the {self._batch_devices} "
                       "devices of the batch mesh axes")
    return self._program(state, jnp.asarray(prompt_tokens_BxP, jnp.int32),
                         jnp.asarray(prompt_mask_BxP, bool), key, config)

  def trace(self, state, prompt_tokens_BxP, prompt_mask_BxP, key,
            config: SamplingConfig) -> jax.stages.Traced:
    """The sampling program `sample` runs, traced for these inputs without running it.

    The inputs may be abstract (`jax.ShapeDtypeStruct`s, with shardings under a mesh), so a dry
    run compiles the program ahead of time: `.lower().compile()`; `.jaxpr` is its jaxpr. Its
    decode while_loops are `decode_segments(config.max_new_tokens)`, in order.
    """
    return self._program.trace(state, prompt_tokens_BxP, prompt_mask_BxP, key, config)

  def num_compiled(self) -> int:
    """How many sampling programs have been compiled so far."""
    return self._program._cache_size()
