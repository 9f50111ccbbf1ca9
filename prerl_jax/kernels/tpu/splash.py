"""Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) for `model.attention=splash`.

Mosaic kernels cannot be partitioned automatically, so the kernel runs under `shard_map` over
the mesh in context (`jax.set_mesh`): rows split over the batch axes, heads over `tensor` when
both query and kv heads divide it. The mask is causal and-ed with segment ids (packing, left
padding), and grouped-query attention uses the kernel's native kv-head sharing. Off TPU the
kernel runs in Pallas interpret mode (tests on CPU).
"""

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from prerl_jax import sharding

BLOCK = 512  # query and key block of the forward and backward kernels (multiples of 128)


def block_sizes(length: int) -> splash.BlockSizes:
  """Blocks of min(BLOCK, length) for every kernel (length is a multiple of 128)."""
  b = math.gcd(BLOCK, length)
  return splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def _local_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, interpret):
  """The kernel on one device's rows and heads; the length is padded to a multiple of 128 with
  segment 0 (padding at the end, which no earlier token sees)."""
  length, num_heads, head_dim = q_BxTxNxH.shape[1:]
  pad = -length % 128
  padded = length + pad

  def heads_first(x):
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  q, k, v = heads_first(q_BxTxNxH * head_dim**-0.5), heads_first(k_BxTxKxH), heads_first(v_BxTxKxH)
  segments = jnp.pad(segment_ids_BxT, ((0, 0), (0, pad)))
  mask = splash.MultiHeadMask([splash.CausalMask((padded, padded))] * num_heads)
  kernel = splash.make_splash_mha(mask, block_sizes=block_sizes(padded), head_shards=1,
                                  q_seq_shards=1, interpret=interpret)
  out = jax.vmap(kernel)(q, k, v, splash.SegmentIds(segments, segments))
  return out.transpose(0, 2, 1, 3)[:, :length]


def attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT):
  """Causal grouped-query attention within segments by the splash kernel; [B, T, N, H]."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  interpret = (device.platform if device is not None else jax.default_backend()) != "tpu"

  def local(q, k, v, segments):
    return _local_attention(q, k, v, segments, interpret)

  if mesh.empty and not interpret and jax.device_count() > 1:
    raise ValueError("model.attention=splash on several TPU chips needs the mesh in context: "
                     "trace under jax.set_mesh(mesh)")
  if mesh.empty:
    return local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
  batch = sharding.logical_to_spec(("batch",), segment_ids_BxT.shape[:1], mesh)[0]
  num_heads, num_kv = q_BxTxNxH.shape[2], k_BxTxKxH.shape[2]
  heads = sharding.logical_to_spec(("kv_heads",), (math.gcd(num_heads, num_kv),), mesh)[0]
  qkv = PartitionSpec(batch, None, heads, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(batch, None)),
                       out_specs=qkv, check_vma=False)(
                           q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
