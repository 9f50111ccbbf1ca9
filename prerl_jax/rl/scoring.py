"""Per-token log-probs and entropies of response tokens, in post-train or pre-train space.

One function scores both spaces; the static `conditional` picks the layout:

  conditional=True   [prompt][response]: log P(y|x). Prompts left-padded, responses right-padded,
                     positions and attention from the masks.
  conditional=False  [BOS][response]: log P(y). The prompt is absent, positions start at 0.

The batch is a `prerl_jax.rl.batch.RolloutBatch`; the marginal BOS is an argument
(`prerl_jax.models.tokenizer.chat_turn_start_id` gives the reference's choice, `<|im_start|>`).

Log-probs are of softmax(logits / temperature), as the sampler records them before top-k/top-p.
The vocabulary projection runs in chunks along the response under `jax.checkpoint`, so neither
the forward nor the backward pass holds more than one chunk's [B, chunk, V] float32 logits.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from prerl_jax import sharding
from prerl_jax.models.decoder import Decoder, positions_from_mask
from prerl_jax.rl.batch import RolloutBatch
from prerl_jax.rl.packing import PackedBatch

DEFAULT_CHUNK_SIZE = 128


def token_logprobs(model: Decoder, hidden_BxRxD, targets_BxR, temperature=1.0,
                   chunk_size: int | None = DEFAULT_CHUNK_SIZE):
  """(logp_BxR, entropy_BxR) of `targets_BxR` under softmax(model.logits(hidden) / temperature).

  chunk_size: response positions per vocabulary chunk (None: one chunk of the whole length).
  """
  batch, length, width = hidden_BxRxD.shape
  chunk = length if chunk_size is None else min(chunk_size, length)
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length
  hidden_BxLxD = jnp.pad(hidden_BxRxD, ((0, 0), (0, pad), (0, 0)))
  targets_BxL = jnp.pad(targets_BxR, ((0, 0), (0, pad)))
  hidden_NxBxCxD = hidden_BxLxD.reshape(batch, num_chunks, chunk, width).swapaxes(0, 1)
  targets_NxBxC = targets_BxL.reshape(batch, num_chunks, chunk).swapaxes(0, 1)
  # The head whole over the batch axes once, before the chunks (under fsdp it is gathered once
  # per call, not once per chunk, and its gradient reduced once).
  head_DxV = sharding.constrain(model.head(), (None, "vocab"))

  @jax.checkpoint
  def one_chunk(args):
    hidden_BxCxD, targets_BxC = args
    logits_BxCxV = model.logits(hidden_BxCxD, head_DxV) / temperature
    logsumexp_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logits_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    probs_BxCxV = jnp.exp(logits_BxCxV - logsumexp_BxC[..., None])
    entropy_BxC = logsumexp_BxC - jnp.sum(probs_BxCxV * logits_BxCxV, axis=-1)
    return target_logits_BxC - logsumexp_BxC, entropy_BxC

  logp_NxBxC, entropy_NxBxC = jax.lax.map(one_chunk, (hidden_NxBxCxD, targets_NxBxC))

  def unchunk(x_NxBxC):
    return x_NxBxC.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]

  return unchunk(logp_NxBxC), unchunk(entropy_NxBxC)


def _context(batch: RolloutBatch, conditional: bool, bos_id):
  """The tokens before the response, and their mask: the prompt, or a single BOS."""
  if conditional:
    return jnp.asarray(batch.prompt_tokens), jnp.asarray(batch.prompt_mask, bool)
  if bos_id is None:
    raise ValueError("marginal scoring needs a BOS id: pass bos_id= "
                     "(tokenizer.chat_turn_start_id gives the reference's <|im_start|>)")
  bos_B = jnp.broadcast_to(jnp.asarray(bos_id, jnp.int32), (batch.num_rows,))
  return bos_B[:, None], jnp.ones((batch.num_rows, 1), bool)


def response_logprobs(model: Decoder, batch: RolloutBatch, conditional: bool, temperature=1.0,
                      bos_id=None, chunk_size: int | None = DEFAULT_CHUNK_SIZE):
  """(logp_BxR, entropy_BxR) of the response tokens, 0 at response padding.

  conditional: True scores log P(y|x) (`[prompt][response]`), False log P(y)
    (`[BOS][response]`, positions from 0). Every prompt row needs at least one real token.
  bos_id: the marginal BOS (an int, () or (B,)); unused when conditional.
  """
  context_BxC, context_mask_BxC = _context(batch, conditional, bos_id)
  response_BxR = jnp.asarray(batch.response_tokens, jnp.int32)
  response_mask_BxR = jnp.asarray(batch.response_mask, bool)
  # The last response token predicts nothing, so it is not fed.
  tokens_BxT = jnp.concatenate([context_BxC.astype(jnp.int32), response_BxR[:, :-1]], axis=1)
  mask_BxT = jnp.concatenate([context_mask_BxC, response_mask_BxR[:, :-1]], axis=1)
  hidden_BxTxD, _ = model(tokens_BxT, positions_from_mask(mask_BxT), mask_BxT)
  hidden_BxRxD = hidden_BxTxD[:, context_BxC.shape[1] - 1:]
  logp_BxR, entropy_BxR = token_logprobs(model, hidden_BxRxD, response_BxR, temperature,
                                         chunk_size)
  return jnp.where(response_mask_BxR, logp_BxR, 0.0), jnp.where(response_mask_BxR, entropy_BxR,
                                                                 0.0)


def packed_response_logprobs(model: Decoder, micro: PackedBatch, space: str, temperature=1.0,
                             chunk_size: int | None = DEFAULT_CHUNK_SIZE):
  """(logp_SxR, entropy_SxR) of one packed micro-batch's response slots in `space`, 0 at padding.

  `micro` is a PackedBatch without its micro-batch axis (one element of the scan). The vocabulary
  projection runs on the micro-batch's response tokens only.
  """
  rows = micro.spaces[space]
  hidden_KxLxD, _ = model(rows.tokens, rows.positions, rows.segment_ids,
                          branch_ids_BxT=rows.branch_ids)
  # The flat tokens as one row per batch shard of the mesh in context, pinned there: each chip
  # projects its own tokens (else XLA splits the projection over the model dimension, as the
  # head is split under fsdp, and all-reduces every chunk's logits).
  num_tokens = micro.token_target.shape[0]
  shards = sharding.context_batch_shards(num_tokens)
  hidden_PxQxD = sharding.constrain(
      hidden_KxLxD[rows.token_row, rows.predict_col].reshape(shards, num_tokens // shards, -1),
      ("batch", None, None))
  logp_PxQ, entropy_PxQ = token_logprobs(model, hidden_PxQxD,
                                         micro.token_target.reshape(shards, -1), temperature,
                                         chunk_size)
  slots_SxR = jnp.zeros(micro.response_mask.shape, jnp.float32)

  def to_slots(values_PxQ):
    return slots_SxR.at[micro.token_slot, micro.token_offset].set(values_PxQ.reshape(-1),
                                                                  mode="drop")

  return to_slots(logp_PxQ), to_slots(entropy_PxQ)


@functools.partial(nnx.jit, static_argnames=("conditional", "chunk_size"))
def score(model: Decoder, batch: RolloutBatch, conditional: bool, temperature=1.0, bos_id=None,
          chunk_size: int | None = DEFAULT_CHUNK_SIZE):
  """Jitted `response_logprobs` (conditional and chunk_size are static)."""
  return response_logprobs(model, batch, conditional, temperature, bos_id, chunk_size)
