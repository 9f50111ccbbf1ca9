"""Full-sequence attention (training, scoring, prefill) behind one switch: `model.attention`.

Every backend computes causal grouped-query attention within segments: a token attends to the
tokens at or before it that carry the same segment id. Segment 0 is padding: no real token sees
it (padding tokens attend among themselves, so every row has a key and no softmax is empty).
Left padding is the one-segment case (ids 1 for real tokens, 0 for padding); packed rows carry
one id per sequence.

Optional branch ids share a prefix inside a segment (packed rows that score a prompt once for all
of its responses): a token sees a key of its segment when the key's branch is 0 (the shared
prefix) or its own. `xla` and `chunked` take them (`BRANCH_BACKENDS`); the TPU and GPU kernels
do not.

Backends: `xla` (the reference: the full score matrix), `chunked` (blockwise, online softmax,
memory T x block; `prerl_jax.models.chunked_attention`), `splash` (TPU Pallas kernel;
`prerl_jax.kernels.tpu.splash`), `cudnn` (GPU fused kernel; `prerl_jax.kernels.gpu.cudnn`), and
`auto`, which picks one per platform and logs the choice once.
"""

import logging

import jax
import jax.numpy as jnp

from prerl_jax.kernels.gpu import cudnn
from prerl_jax.kernels.tpu import splash
from prerl_jax.models import attention_masks, chunked_attention

BACKENDS = ("auto", "xla", "chunked", "splash", "cudnn")
BRANCH_BACKENDS = ("xla", "chunked")
# On CPU, `auto` uses `xla` up to this many tokens and `chunked` beyond (memory grows as T^2).
CPU_CHUNKED_FROM = 2048

_logged = set()


def log_once(message: str) -> None:
  """Logs a backend choice or fallback once per process."""
  if message not in _logged:
    _logged.add(message)
    logging.info(message)


def check_backend(name: str, source: str = "model.attention") -> str:
  """The backend name, or a ValueError naming `source` and the choices."""
  if name not in BACKENDS:
    raise ValueError(f"{source}={name!r}: expected one of {', '.join(BACKENDS)}")
  return name


def supports_branches(name: str) -> bool:
  """Whether backend `name` (`auto` resolved for this platform) takes branch ids."""
  if name == "auto":
    return jax.default_backend() not in ("tpu", "gpu")
  return name in BRANCH_BACKENDS


def xla_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, branch_ids_BxT=None):
  """The reference: the full [T, T] score matrix per head, scores and softmax in float32."""
  batch, length, num_heads, head_dim = q_BxTxNxH.shape
  num_kv = k_BxTxKxH.shape[2]
  q = q_BxTxNxH.reshape(batch, length, num_kv, num_heads // num_kv, head_dim)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k_BxTxKxH, preferred_element_type=jnp.float32)
  scores = jnp.where(attention_masks.allowed_mask(segment_ids_BxT, branch_ids_BxT)[:, None, None],
                     scores * head_dim**-0.5,
                     jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxTxKxH.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxTxKxH)
  return out.reshape(batch, length, num_heads, head_dim)


def resolve(name: str, length: int, dtype) -> str:
  """The concrete backend that `name` means here: `auto` picks by platform (and, on CPU, by
  sequence length); logged once."""
  if name != "auto":
    return name
  platform = jax.default_backend()
  if platform == "tpu":
    # Splash runs under shard_map over the mesh in context; without one it cannot be
    # partitioned over several chips.
    without_mesh = jax.sharding.get_abstract_mesh().empty and jax.device_count() > 1
    chosen = "chunked" if without_mesh else "splash"
  elif platform == "gpu":
    chosen = "cudnn"
  else:
    chosen = "chunked" if length >= CPU_CHUNKED_FROM else "xla"
  note = " (splash needs the mesh in context: jax.set_mesh)" if platform == "tpu" and (
      chosen == "chunked") else ""
  log_once(f"model.attention=auto: {chosen} on {platform} (T={length}, "
           f"{jnp.dtype(dtype).name}){note}")
  return chosen


def attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, backend: str = "auto",
           branch_ids_BxT=None):
  """Causal grouped-query attention within segments (and branches, where given) with the named
  backend; [B, T, N, H]."""
  backend = resolve(check_backend(backend), q_BxTxNxH.shape[1], q_BxTxNxH.dtype)
  segment_ids_BxT = segment_ids_BxT.astype(jnp.int32)
  if branch_ids_BxT is not None:
    if backend not in BRANCH_BACKENDS:
      raise ValueError(f"model.attention={backend!r} cannot share a prompt between responses "
                       f"(branch ids); use one of {', '.join(BRANCH_BACKENDS)} or "
                       "optim.share_prompts=False")
    branch_ids_BxT = branch_ids_BxT.astype(jnp.int32)
    if backend == "xla":
      return xla_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, branch_ids_BxT)
    return chunked_attention.attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT,
                                       branch_ids_BxT=branch_ids_BxT)
  if backend == "xla":
    return xla_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
  if backend == "splash":
    return splash.attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
  if backend == "cudnn":
    reason = cudnn.unsupported_reason(q_BxTxNxH)
    if reason is None:
      return cudnn.attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
    log_once(f"model.attention=cudnn falls back to chunked: {reason}")
  return chunked_attention.attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
