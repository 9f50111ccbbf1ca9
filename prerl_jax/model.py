"""Flax NNX causal decoder for the Llama, Qwen2 and Qwen3 families, with an optional KV cache.

Per-layer weights are stacked along a leading `layers` axis and the layers run under
`lax.scan`, so compile time does not grow with depth. Every parameter carries its logical axis
names (`Param(..., logical_axes=...)`), which `prerl_jax.sharding` maps to mesh axes.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from prerl_jax import rope
from prerl_jax.model_config import ModelConfig

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
CACHE_AXES = ("layers", "batch", "kv_heads", "cache_length", "head_dim")


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


def init_kv_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> dict:
  """Zeroed KV cache {'k', 'v'}: [layers, batch, kv_heads, length, head_dim].

  Heads come before slots so that decode attention reads each head's keys and values in place,
  without transposing the cache.
  """
  shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)
  dtype = dtype or config.compute_dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _attention(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, allowed_BxTxS):
  """Grouped-query attention with a boolean mask; softmax in float32."""
  batch, length, num_heads, head_dim = q_BxTxNxH.shape
  num_kv = k_BxKxSxH.shape[1]
  q = q_BxTxNxH.reshape(batch, length, num_kv, num_heads // num_kv, head_dim)
  scores = jnp.einsum("btkgh,bksh->bkgts", q, k_BxKxSxH,
                      preferred_element_type=jnp.float32) * head_dim**-0.5
  scores = jnp.where(allowed_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxH.dtype)
  out = jnp.einsum("bkgts,bksh->btkgh", probs, v_BxKxSxH)
  return out.reshape(batch, length, num_heads, head_dim)


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

  def __call__(self, tokens_BxT, positions_BxT, key_mask_BxS, cache=None, cache_index=0):
    """Runs the decoder over T new tokens.

    Args:
      tokens_BxT: token ids.
      positions_BxT: rotary positions of the tokens (explicit, so left padding and a restarted
        `[BOS] + response` layout both work).
      key_mask_BxS: which key slots hold real tokens. Without a cache S == T; with a cache the
        new tokens are written at slots `cache_index + arange(T)` and attention reads only the
        first S cache slots (S may be less than the cache length, to skip slots not yet filled;
        it must cover the new tokens' slots).
      cache: optional KV cache from `init_kv_cache`.
      cache_index: first cache slot of the new tokens (a scalar, shared by the batch).

    Returns:
      (hidden_BxTxD after the final norm, updated cache or None). A query attends to key slots
      at or before its own slot that `key_mask_BxS` marks valid.
    """
    config = self.config
    dtype = config.compute_dtype
    inv_freq = rope.inverse_frequencies(config)
    length = tokens_BxT.shape[1]
    query_slots = cache_index + jnp.arange(length)
    key_slots = jnp.arange(key_mask_BxS.shape[1])
    allowed_BxTxS = key_mask_BxS[:, None, :] & (key_slots[None, None, :]
                                                <= query_slots[None, :, None])
    x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dtype)

    def layer(carry, scanned):
      x, cache = carry
      weights, index = scanned
      w = jax.tree.map(lambda p: p.astype(dtype), weights)
      h = rms_norm(x, w["attn_norm"], config.rms_norm_eps)
      q = jnp.einsum("btd,dnh->btnh", h, w["wq"])
      k = jnp.einsum("btd,dkh->btkh", h, w["wk"])
      v = jnp.einsum("btd,dkh->btkh", h, w["wv"])
      if config.attention_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
      if config.qk_norm:
        q = rms_norm(q, w["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], config.rms_norm_eps)
      q = rope.apply_rope(q, positions_BxT, inv_freq)
      k = rope.apply_rope(k, positions_BxT, inv_freq).transpose(0, 2, 1, 3)
      v = v.transpose(0, 2, 1, 3)
      if cache is not None:
        # The whole cache is a loop carry, updated in place at (layer, cache_index).
        cache = {name: jax.lax.dynamic_update_slice(
            cache[name], new[None].astype(cache[name].dtype), (index, 0, 0, cache_index, 0))
                 for name, new in (("k", k), ("v", v))}
        window = key_mask_BxS.shape[1]
        k, v = (jax.lax.dynamic_slice_in_dim(cache[name][index], 0, window, axis=2)
                for name in ("k", "v"))
      attended = _attention(q, k.astype(dtype), v.astype(dtype), allowed_BxTxS)
      x = x + jnp.einsum("btnh,nhd->btd", attended, w["wo"])
      h = rms_norm(x, w["mlp_norm"], config.rms_norm_eps)
      gate = jnp.einsum("btd,df->btf", h, w["w_gate"])
      up = jnp.einsum("btd,df->btf", h, w["w_up"])
      x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, w["w_down"])
      return (x, cache), None

    if config.remat:
      layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
    weights = {name: p[...] for name, p in self.layers.items()}
    (x, cache), _ = jax.lax.scan(layer, (x, cache), (weights, jnp.arange(config.num_layers)))
    return rms_norm(x, self.final_norm[...], config.rms_norm_eps), cache

  def logits(self, hidden_BxTxD: jnp.ndarray) -> jnp.ndarray:
    """Vocabulary logits (float32) of final hidden states."""
    dtype = self.config.compute_dtype
    if self.config.tie_word_embeddings:
      head = self.embed[...].astype(dtype).T
    else:
      head = self.lm_head[...].astype(dtype)
    return jnp.einsum("btd,dv->btv", hidden_BxTxD.astype(dtype), head,
                      preferred_element_type=jnp.float32)


def positions_from_mask(mask_BxT: jnp.ndarray) -> jnp.ndarray:
  """Rotary positions counting only real tokens (left padding gets position 0)."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1, 0)


def forward_logits(model: Decoder, tokens_BxT, mask_BxT) -> jnp.ndarray:
  """Float32 logits of a left-padded batch (positions counted over real tokens)."""
  mask_BxT = jnp.asarray(mask_BxT, bool)
  hidden, _ = model(jnp.asarray(tokens_BxT), positions_from_mask(mask_BxT), mask_BxT)
  return model.logits(hidden)
