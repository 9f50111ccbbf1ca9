"""Blockwise causal attention in pure JAX: an online softmax over key blocks and a custom VJP
that recomputes each block's probabilities, so memory grows with T x block, never T x T.

The same rule as `prerl_jax.models.attention` (causal, same segment id, and on the query's
branch where branch ids are given). Keys are padded to a whole number of blocks with segment id
-1, which no query carries. The ids travel as one pair `ids` = (segment_ids_BxT, branch_ids_BxT
or None).
"""

import functools

import jax
import jax.numpy as jnp

from prerl_jax.models import attention_masks

BLOCK = 512  # keys per block


def _blocks(x_BxSx, block):
  """[B, S, ...] -> [S / block, B, block, ...] (the scan axis first)."""
  return jnp.moveaxis(x_BxSx.reshape(x_BxSx.shape[0], -1, block, *x_BxSx.shape[2:]), 1, 0)


def _block_scores(q_BxKxGxTxH, k_BxCxKxH, ids_q, ids_k, start, scale):
  """Scaled float32 scores [B, K, G, T, C] of one key block and which of them are allowed."""
  scores = jnp.einsum("bkgth,bckh->bkgtc", q_BxKxGxTxH, k_BxCxKxH,
                      preferred_element_type=jnp.float32) * scale
  (seg_q_BxT, branch_q_BxT), (seg_k_BxC, branch_k_BxC) = ids_q, ids_k
  t = jnp.arange(seg_q_BxT.shape[1])
  c = start + jnp.arange(seg_k_BxC.shape[1])
  allowed = (c[None, :] <= t[:, None])[None] & (seg_q_BxT[:, :, None] == seg_k_BxC[:, None, :])
  if branch_q_BxT is not None:
    allowed &= attention_masks.branch_allowed(branch_q_BxT, branch_k_BxC)
  return scores, allowed[:, None, None]


def _prepare(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, ids, block):
  """Queries grouped by kv head [B, K, G, T, H]; keys, values and key ids padded and cut into
  blocks along a leading scan axis."""
  length = q_BxTxNxH.shape[1]
  q = _group(q_BxTxNxH, k_BxTxKxH.shape[2])
  pad = -length % block
  k = jnp.pad(k_BxTxKxH, ((0, 0), (0, pad), (0, 0), (0, 0)))
  v = jnp.pad(v_BxTxKxH, ((0, 0), (0, pad), (0, 0), (0, 0)))
  segment_ids_BxT, branch_ids_BxT = ids
  seg_k = _blocks(jnp.pad(segment_ids_BxT, ((0, 0), (0, pad)), constant_values=-1), block)
  branch_k = None if branch_ids_BxT is None else _blocks(
      jnp.pad(branch_ids_BxT, ((0, 0), (0, pad))), block)
  starts = jnp.arange(0, length + pad, block)
  return q, (_blocks(k, block), _blocks(v, block), (seg_k, branch_k), starts)


def _forward(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, ids, block):
  """Output [B, T, N, H] and the softmax log-normalizer [B, K, G, T] (float32)."""
  q, key_blocks = _prepare(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, ids, block)
  scale = q.shape[-1] ** -0.5

  def step(carry, blk):
    m, l, acc = carry
    k, v, ids_k, start = blk
    scores, allowed = _block_scores(q, k, ids, ids_k, start, scale)
    m_new = jnp.maximum(m, jnp.max(jnp.where(allowed, scores, -jnp.inf), axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.where(allowed, jnp.exp(scores - m_safe[..., None]), 0.0)
    correction = jnp.exp(m - m_safe)
    l = l * correction + p.sum(-1)
    acc = acc * correction[..., None] + jnp.einsum(
        "bkgtc,bckh->bkgth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (m_new, l, acc), None

  stats = q.shape[:-1]
  init = (jnp.full(stats, -jnp.inf), jnp.zeros(stats), jnp.zeros(q.shape, jnp.float32))
  (m, l, acc), _ = jax.lax.scan(step, init, key_blocks)
  out = (acc / l[..., None]).astype(q_BxTxNxH.dtype)
  return _ungroup(out), m + jnp.log(l)


def _group(x_BxTxNxH, num_kv):
  """[B, T, N, H] -> [B, K, G, T, H]: heads grouped by the kv head they share."""
  batch, length, num_heads, head_dim = x_BxTxNxH.shape
  return x_BxTxNxH.reshape(batch, length, num_kv, num_heads // num_kv, head_dim).transpose(
      0, 2, 3, 1, 4)


def _ungroup(x_BxKxGxTxH):
  """[B, K, G, T, H] -> [B, T, N, H]."""
  batch, num_kv, group, length, head_dim = x_BxKxGxTxH.shape
  return x_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_kv * group, head_dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, ids, block):
  return _forward(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, ids, block)[0]


def _attention_fwd(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, ids, block):
  out, lse = _forward(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, ids, block)
  return out, (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, ids, out, lse)


def _attention_bwd(block, residuals, d_out_BxTxNxH):
  """Flash-attention backward: per key block, recompute p = exp(s - lse), then dv = p^T do,
  ds = p * (do v^T - rowsum(do * out)), dq += ds k, dk = ds^T q."""
  q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, ids, out, lse = residuals
  q, key_blocks = _prepare(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, ids, block)
  d_out, out_g = (_group(x, k_BxTxKxH.shape[2]) for x in (d_out_BxTxNxH, out))
  scale = q.shape[-1] ** -0.5
  delta = jnp.sum(d_out.astype(jnp.float32) * out_g.astype(jnp.float32), axis=-1)

  def step(dq, blk):
    k, v, ids_k, start = blk
    scores, allowed = _block_scores(q, k, ids, ids_k, start, scale)
    p = jnp.where(allowed, jnp.exp(scores - lse[..., None]), 0.0)
    dv = jnp.einsum("bkgtc,bkgth->bckh", p.astype(d_out.dtype), d_out,
                    preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkgth,bckh->bkgtc", d_out, v, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None]) * scale
    dq = dq + jnp.einsum("bkgtc,bckh->bkgth", ds.astype(k.dtype), k,
                         preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkgtc,bkgth->bckh", ds.astype(q.dtype), q,
                    preferred_element_type=jnp.float32)
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), key_blocks)
  length = q_BxTxNxH.shape[1]

  def unblock(x_NxBxCxKxH, like):
    x = jnp.moveaxis(x_NxBxCxKxH, 0, 1).reshape(like.shape[0], -1, *like.shape[2:])
    return x[:, :length].astype(like.dtype)

  return (_ungroup(dq).astype(q_BxTxNxH.dtype), unblock(dk, k_BxTxKxH),
          unblock(dv, v_BxTxKxH), jax.tree.map(lambda _: None, ids))


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, block: int = BLOCK,
              branch_ids_BxT=None):
  """Causal grouped-query attention within segments (and branches, where given), blockwise over
  keys; [B, T, N, H]."""
  block = min(block, q_BxTxNxH.shape[1])
  return _attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, (segment_ids_BxT, branch_ids_BxT), block)
