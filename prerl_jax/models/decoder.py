"""Flax NNX causal decoder for the Llama, Qwen2 and Qwen3 families.

Per-layer weights are stacked along a leading `layers` axis and the layers run under
`lax.scan`, so compile time does not grow with depth. One-token decoding over a KV cache is in
`prerl_jax.generate.decode`; it shares `decoder_layer` with the full forward. Every parameter carries its
logical axis names (`Param(..., logical_axes=...)`), which `prerl_jax.sharding` maps to mesh axes.
"""

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from prerl_jax import sharding
from prerl_jax.models import attention, remat, rope
from prerl_jax.models.config import ModelConfig

# Logical axes of every parameter; the model is built from this table and sharding reads it.
LAYER_AXES = {
    "attn_norm": ("layers", "norm"),
    "wq": ("layers", "embed", "heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "bq": ("layers", "heads", "head_dim"),
    "bk": ("layers", "kv_heads", "head_dim"),
    "bv": ("layers", "kv_heads", "head_dim"),
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
    "mlp_norm": ("layers", "norm"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}
# The residual stream between layers: rows over the batch axes, the model dimension whole (kept
# so at each layer's ends: `sharding.constrain`).
ACTIVATION_AXES = ("batch", "length", None)
# How many leading axes of each product's weight it contracts (the rest are its outputs).
INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
# Per-layer KV cache blocks (prerl_jax.generate.decode). Keys are kept transposed (head_dim before slots)
# so the score product contracts the second-minor axis of both operands, as the value product does.
CACHE_AXES = {"k": ("batch", "kv_heads", "head_dim", "cache_length"),
              "v": ("batch", "kv_heads", "cache_length", "head_dim")}


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Shapes of the stacked per-layer parameters that this config has."""
  c = config
  shapes = {
      "attn_norm": (c.hidden_size,),
      "wq": (c.hidden_size, c.num_heads, c.head_dim),
      "wk": (c.hidden_size, c.num_kv_heads, c.head_dim),
      "wv": (c.hidden_size, c.num_kv_heads, c.head_dim),
      "wo": (c.num_heads, c.head_dim, c.hidden_size),
      "mlp_norm": (c.hidden_size,),
      "w_gate": (c.hidden_size, c.intermediate_size),
      "w_up": (c.hidden_size, c.intermediate_size),
      "w_down": (c.intermediate_size, c.hidden_size),
  }
  if c.attention_bias:
    shapes.update(bq=(c.num_heads, c.head_dim), bk=(c.num_kv_heads, c.head_dim),
                  bv=(c.num_kv_heads, c.head_dim))
  if c.qk_norm:
    shapes.update(q_norm=(c.head_dim,), k_norm=(c.head_dim,))
  return {name: (c.num_layers,) + shape for name, shape in shapes.items()}


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
  """RMSNorm computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def dense(x_BxTxF, w, residual=None):
  """x times a weight whose leading axes multiply to x's last axis; the result has w's other
  axes (w is merged to [F, outputs] first: with two contracting axes XLA:CPU transposed the
  whole wo weight on every decode step, 6.6 ms per step for SmolLM2). `residual`, where given, is
  added to the product."""
  inputs = x_BxTxF.shape[-1]
  split = next(i for i in range(1, w.ndim + 1) if math.prod(w.shape[:i]) == inputs)
  out = jnp.einsum("btf,fo->bto", x_BxTxF, w.reshape(inputs, -1))
  out = out.reshape(*out.shape[:2], *w.shape[split:])
  return out if residual is None else residual + out


def gated_dense(x_BxTxD, w_gate, w_up):
  """The MLP's gated product silu(x @ w_gate) * (x @ w_up)."""
  return jax.nn.silu(dense(x_BxTxD, w_gate)) * dense(x_BxTxD, w_up)


class LayerOps(NamedTuple):
  """How `decoder_layer` computes its weight products and norms: XLA's (the defaults), or the
  sampler's CPU kernels (`cpu_matmul.matmul`, `cpu_matmul.gated_matmul`, `cpu_norm.rms_norm`)."""
  product: Callable = dense  # product(x, w, residual=None)
  gated_product: Callable = gated_dense  # gated_product(x, w_gate, w_up)
  norm: Callable = rms_norm  # norm(x, weight, eps)


def decoder_layer(config: ModelConfig, x_BxTxD, w: dict, rotation, attend,
                  ops: LayerOps = LayerOps()):
  """One pre-norm decoder layer on one layer's weights `w` (in the compute dtype).

  `ops` computes the weight products and norms (`LayerOps`: XLA's, or the CPU kernels over
  packed weights).

  `rotation` is `rope.rotation(positions_BxT, ...)` of the layer's tokens, or None where `attend`
  rotates the queries and keys itself (the CPU decode kernel does).

  `attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)` does the attention for the new tokens' queries, keys
  and values against whatever cache it keeps, and returns (attended_BxTxNxH, aux); the layer
  returns (x_BxTxD, aux). Under a mesh, x enters and leaves split by rows (`ACTIVATION_AXES`).
  """
  eps = config.rms_norm_eps
  x_BxTxD = sharding.constrain(x_BxTxD, ACTIVATION_AXES)
  h = ops.norm(x_BxTxD, w["attn_norm"], eps)
  q, k, v = ops.product(h, w["wq"]), ops.product(h, w["wk"]), ops.product(h, w["wv"])
  if config.attention_bias:
    q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
  if config.qk_norm:
    q, k = ops.norm(q, w["q_norm"], eps), ops.norm(k, w["k_norm"], eps)
  if rotation is not None:
    q, k = rope.apply_rotation(q, rotation), rope.apply_rotation(k, rotation)
  attended, aux = attend(q, k, v)
  x = ops.product(attended.reshape(*attended.shape[:2], -1), w["wo"], residual=x_BxTxD)
  h = ops.norm(x, w["mlp_norm"], eps)
  gated = ops.gated_product(h, w["w_gate"], w["w_up"])
  return sharding.constrain(ops.product(gated, w["w_down"], residual=x), ACTIVATION_AXES), aux


class Decoder(nnx.Module):
  """Token ids and positions in, final hidden states out; `logits` maps hidden to vocabulary."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = config.weight_dtype
    normal = jax.nn.initializers.normal(0.02)

    def param(name, shape, axes):
      if name.endswith("norm"):
        value = jnp.ones(shape, dtype)
      elif name in ("bq", "bk", "bv"):
        value = jnp.zeros(shape, dtype)
      else:
        value = normal(rngs.params(), shape, dtype)
      return nnx.Param(value, logical_axes=axes)

    self.embed = param("embed", (config.vocab_size, config.hidden_size), ("vocab", "embed"))
    self.layers = nnx.Dict({name: param(name, shape, LAYER_AXES[name])
                            for name, shape in layer_shapes(config).items()})
    self.final_norm = param("final_norm", (config.hidden_size,), ("norm",))
    if not config.tie_word_embeddings:
      self.lm_head = param("lm_head", (config.hidden_size, config.vocab_size), ("embed", "vocab"))

  def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT, return_kv: bool = False,
               branch_ids_BxT=None):
    """Runs the decoder over a batch of token sequences (causal attention, layers under scan).

    Args:
      tokens_BxT: token ids.
      positions_BxT: rotary positions of the tokens (explicit, so left padding, a restarted
        `[BOS] + response` layout and packed rows all work).
      segment_ids_BxT: int32 segment of each token; a token attends to the tokens at or before
        it in the same segment, and 0 is padding, which no real token sees. A boolean key mask
        (left padding) is the one-segment case: True is segment 1, False padding.
      return_kv: also return every layer's keys [layers, B, kv_heads, head_dim, T] and values
        [layers, B, kv_heads, T, head_dim] (the sampler's prefill).
      branch_ids_BxT: optional int32 branch of each token within its segment: a token sees the
        earlier tokens of branch 0 (a shared prefix) and of its own branch
        (`prerl_jax.models.attention_masks`).

    Returns:
      (hidden_BxTxD after the final norm, (keys, values) or None).
    """
    config = self.config
    segment_ids_BxT = jnp.asarray(segment_ids_BxT).astype(jnp.int32)
    x = self.embed_tokens(tokens_BxT)
    rotation = rope.rotation(positions_BxT, rope.inverse_frequencies(config))

    def attend(q, k_BxTxKxH, v_BxTxKxH):
      attended = attention.attend(q, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, config.attention,
                                  branch_ids_BxT)
      if not return_kv:
        return attended, None
      return attended, (k_BxTxKxH.transpose(0, 2, 3, 1), v_BxTxKxH.transpose(0, 2, 1, 3))

    def layer(x, weights):
      w = jax.tree.map(lambda p: p.astype(config.compute_dtype), weights)
      return decoder_layer(config, x, w, rotation, attend)

    weights = {name: p[...] for name, p in self.layers.items()}
    x, kv = jax.lax.scan(remat.remat_layer(layer, config.remat), x, weights)
    return self.normalize_output(x), kv

  def embed_tokens(self, tokens_BxT) -> jnp.ndarray:
    """Token embeddings [B, T, D] in the compute dtype (the input of the first layer)."""
    return jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.config.compute_dtype)

  def normalize_output(self, x_BxTxD) -> jnp.ndarray:
    """The final norm applied to the last layer's output (the input of `logits`)."""
    return rms_norm(x_BxTxD, self.final_norm[...], self.config.rms_norm_eps)

  def layer_weights(self) -> list[dict]:
    """Each layer's weights as separate arrays in the compute dtype (the decode loop's layout).

    Indexing the stacked weights inside a scan makes XLA:CPU copy every layer's weights on every
    decode step; taking them apart once, outside the loop, reads them in place.
    """
    dtype = self.config.compute_dtype
    return [{name: p[...][i].astype(dtype) for name, p in self.layers.items()}
            for i in range(self.config.num_layers)]

  def head(self) -> jnp.ndarray:
    """The output projection [D, vocab] in the compute dtype (the embedding when tied)."""
    dtype = self.config.compute_dtype
    if self.config.tie_word_embeddings:
      return self.embed[...].astype(dtype).T
    return self.lm_head[...].astype(dtype)

  def logits(self, hidden_BxTxD: jnp.ndarray, head_DxV: jnp.ndarray | None = None) -> jnp.ndarray:
    """Vocabulary logits (float32) of final hidden states; `head_DxV`: `head()` as the caller
    already placed it (scoring gathers it once for all its chunks)."""
    head_DxV = self.head() if head_DxV is None else head_DxV
    return jnp.einsum("btd,dv->btv", hidden_BxTxD.astype(head_DxV.dtype), head_DxV,
                      preferred_element_type=jnp.float32)


def positions_from_mask(mask_BxT: jnp.ndarray) -> jnp.ndarray:
  """Rotary positions counting only real tokens (left padding gets position 0)."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1, 0)


def forward_logits(model: Decoder, tokens_BxT, mask_BxT) -> jnp.ndarray:
  """Float32 logits of a left-padded batch (positions counted over real tokens)."""
  mask_BxT = jnp.asarray(mask_BxT, bool)
  hidden, _ = model(jnp.asarray(tokens_BxT), positions_from_mask(mask_BxT), mask_BxT)
  return model.logits(hidden)
