"""The continuous sampler's decode step on one float32 CPU device, in the CPU kernels.

It computes what `paged_forward` and `model.logits` compute for one new token per row, with the
layers unrolled over `model.layer_weights()` (under `lax.scan` XLA:CPU copies every layer's
weights on every step), the products in `cpu_matmul` over weights packed once per `sample`
call, the norms in `cpu_norm` and the attention in `cpu_paged_attention`, which writes each
live row's keys and values into its page in place and reads only its filled slots.
"""

from flax import struct

from prerl_jax.kernels.cpu import matmul as cpu_matmul
from prerl_jax.kernels.cpu import norm as cpu_norm
from prerl_jax.kernels.cpu import paged_attention as cpu_paged_attention
from prerl_jax.models import rope
from prerl_jax.models.decoder import Decoder, LayerOps, decoder_layer

OPS = LayerOps(cpu_matmul.matmul, cpu_matmul.gated_matmul, cpu_norm.rms_norm)


@struct.dataclass
class PackedDecoder:
  """Each layer's weights with its products' weights packed (`cpu_matmul.pack_layer`), and the
  packed output projection."""

  layers: list[dict]
  head: cpu_matmul.PackedWeight


def pack(model: Decoder) -> PackedDecoder:
  """The weights `step` reads, packed (float32 weights only)."""
  return PackedDecoder(layers=[cpu_matmul.pack_layer(w) for w in model.layer_weights()],
                       head=cpu_matmul.pack(model.head()))


def step(model: Decoder, packed: PackedDecoder):
  """The decode step `(kv_pages, token_R, position_R, live_R, page_table_RxP) -> (logits_RxV,
  kv_pages)`: each row feeds its token at its position; rows that are not live write nothing
  (their logits are meaningless)."""
  config = model.config
  inverse_frequencies = rope.inverse_frequencies(config)

  def logits(kv_pages, token_R, position_R, live_R, page_table_RxP):
    x = model.embed_tokens(token_R[:, None])
    rotation = rope.rotation(position_R[:, None], inverse_frequencies)
    for layer, weights in enumerate(packed.layers):

      def attend(q, k, v, kv_pages=kv_pages, layer=layer):
        return cpu_paged_attention.write_and_attend(q, k, v, rotation, kv_pages, layer,
                                                    page_table_RxP, position_R, live_R)

      x, kv_pages = decoder_layer(config, x, weights, None, attend, OPS)
    hidden_Rx1xD = model.normalize_output(x)
    return cpu_matmul.matmul(hidden_Rx1xD, packed.head)[:, 0], kv_pages

  return logits

