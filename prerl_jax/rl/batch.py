"""RolloutBatch: the sampled responses of one RL step, as the update and the scorers read them."""

import flax.struct
import jax
import numpy as np

from prerl_jax.data import padding


@flax.struct.dataclass
class RolloutBatch:
  """B = num_prompts * group_size responses, each group's responses consecutive; all arrays have
  the batch as their first axis.

  prompt_tokens    (B, P) int32    left-padded prompt ids (every row with at least one real token)
  prompt_mask      (B, P) bool
  response_tokens  (B, R) int32    right-padded sampled ids (the stop token included)
  response_mask    (B, R) bool
  sampler_logp     (B, R) float32  the sampler's log-softmax(logits / temperature) of each
                                   sampled token (conditional space; feeds the mismatch metrics)
  rewards          (B,)   float32
  old_logp         {space: (B, R) float32} or None: the behaviour policy's log-probs for several
                                   updates per rollout; None means on-policy (ratio == 1).
  """

  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  response_tokens: jax.Array
  response_mask: jax.Array
  sampler_logp: jax.Array
  rewards: jax.Array
  old_logp: dict | None = None

  @property
  def num_rows(self) -> int:
    return self.response_tokens.shape[0]

  def rows(self, start: int, stop: int) -> "RolloutBatch":
    """Rows start..stop-1 (rewards included)."""
    return jax.tree.map(lambda x: x[start:stop], self)


def rollout_batch(prompt_tokens_BxP, prompt_lengths_B, response_tokens_BxR, response_lengths_B,
                  sampler_logp_BxR=None, rewards_B=None, *,
                  response_width: int | None = None) -> RolloutBatch:
  """The one builder of a RolloutBatch (host numpy arrays) from left-padded prompts, right-padded
  responses and their lengths.

  response_width: keep only the first response_width response columns (default: all).
  sampler_logp_BxR and rewards_B default to zeros (scoring needs neither).
  """
  prompt_tokens_BxP = np.asarray(prompt_tokens_BxP, np.int32)
  response_tokens_BxR = np.asarray(response_tokens_BxR, np.int32)
  rows, width = response_tokens_BxR.shape
  width = width if response_width is None else response_width
  prompt_lengths_B = np.asarray(prompt_lengths_B)
  response_lengths_B = np.asarray(response_lengths_B)
  for name, lengths, limit in (("prompt", prompt_lengths_B, prompt_tokens_BxP.shape[1]),
                               ("response", response_lengths_B, width)):
    if lengths.shape != (rows,) or lengths.min(initial=1) < (name == "prompt") or \
        lengths.max(initial=0) > limit:
      raise ValueError(f"{name} lengths {lengths.tolist()} must be {rows} values in "
                       f"[{int(name == 'prompt')}, {limit}]")
  if sampler_logp_BxR is None:
    sampler_logp_BxR = np.zeros((rows, width), np.float32)
  if rewards_B is None:
    rewards_B = np.zeros((rows,), np.float32)
  return RolloutBatch(
      prompt_tokens=prompt_tokens_BxP,
      prompt_mask=padding.left_mask(prompt_lengths_B, prompt_tokens_BxP.shape[1]),
      response_tokens=response_tokens_BxR[:, :width],
      response_mask=padding.right_mask(response_lengths_B, width),
      sampler_logp=np.asarray(sampler_logp_BxR, np.float32)[:, :width],
      rewards=np.asarray(rewards_B, np.float32))


def from_token_lists(prompts, responses, pad_id: int) -> RolloutBatch:
  """A RolloutBatch of prompt and response token lists (zero rewards and sampler log-probs)."""
  prompt_tokens, _ = padding.left_pad(prompts, pad_id)
  response_tokens, _ = padding.right_pad(responses, pad_id)
  return rollout_batch(prompt_tokens, [len(p) for p in prompts], response_tokens,
                       [len(r) for r in responses])


def from_samples(out, rewards_B=None, response_width: int | None = None) -> RolloutBatch:
  """A RolloutBatch of a host copy of the sampler's `SampleOutput` and the responses' rewards."""
  return rollout_batch(out.prompt_tokens_NxP, np.asarray(out.prompt_mask_NxP).sum(axis=1),
                       out.tokens_NxM, out.lengths_N, out.logprobs_NxM, rewards_B,
                       response_width=response_width)
