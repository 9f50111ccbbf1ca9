"""Rematerialization policies for the decoder layer (`model.remat`): what the backward pass keeps
from each layer's forward and what it recomputes.

- `none`: keep every intermediate (fastest, most memory).
- `full`: keep only each layer's input; recompute the layer in the backward pass.
- `save_dots`: keep the weight products' outputs (matmuls without batch dimensions: never the
  T x T attention scores); recompute norms, activations and attention.
- `offload`: as `full`, with each layer's input moved to host memory (`pinned_host`) between
  the forward and the backward pass (MaxText's offloading policies).
"""

import jax
from jax.ad_checkpoint import checkpoint_name

POLICIES = ("none", "full", "save_dots", "offload")
LAYER_INPUT = "decoder_layer_input"


def check_policy(name, source: str = "model.remat") -> str:
  """The policy name, or a ValueError naming `source` and the choices."""
  if name not in POLICIES:
    raise ValueError(f"{source}={name!r}: expected one of {', '.join(POLICIES)}")
  return name


def remat_layer(layer, policy: str):
  """`layer(x, weights) -> (x, aux)` wrapped for the backward pass under `policy`."""
  check_policy(policy)
  if policy == "none":
    return layer
  if policy == "full":
    return jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
  if policy == "save_dots":
    return jax.checkpoint(layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

  def named_input(x, weights):
    return layer(checkpoint_name(x, LAYER_INPUT), weights)

  offload = jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
      offload_src="device", offload_dst="pinned_host")
  return jax.checkpoint(named_input, policy=offload)
