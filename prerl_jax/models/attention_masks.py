"""Which keys a query may attend to: causal, within its segment, and on its branch where branch
ids share a prefix (the rule every attention backend implements; `prerl_jax.models.attention`)."""

import jax.numpy as jnp


def branch_allowed(branch_q_BxT, branch_k_BxS) -> jnp.ndarray:
  """[B, T, S] booleans: key s is on query t's branch (the shared prefix, branch 0, or its own)."""
  return (branch_k_BxS[:, None, :] == 0) | (branch_q_BxT[:, :, None] == branch_k_BxS[:, None, :])


def allowed_mask(segment_ids_BxT, branch_ids_BxT=None) -> jnp.ndarray:
  """[B, T, T] booleans: query t may attend to key s (s <= t, same segment, on its branch)."""
  slots = jnp.arange(segment_ids_BxT.shape[1])
  causal = slots[None, :] <= slots[:, None]
  allowed = causal[None] & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
  if branch_ids_BxT is not None:
    allowed &= branch_allowed(branch_ids_BxT, branch_ids_BxT)
  return allowed
