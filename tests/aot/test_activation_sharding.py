"""Under fsdp the update gathers weights, never activations: the decoder pins its residual stream
to rows over the batch axes (`decoder.ACTIVATION_AXES`), which both XLA:GPU's and libtpu's
partitioners otherwise trade for all-reducing [rows, tokens, features] activations."""

import math
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from prerl_jax import sharding
from prerl_jax.aot import collectives, targets, update_peak
from prerl_jax.models.decoder import Decoder
from prerl_jax.rl import scoring
from test_dry_run import TINY

ROWS_PER_CHIP, TOKENS = 2, 64


def _update_collectives(target_name: str):
  """(collective instructions of the compiled TINY update, its traffic, rows, param bytes)."""
  target = targets.get_target(target_name)
  if target.compiler == "tpu":
    pytest.importorskip("libtpu", reason="libtpu compiles for TPU: pip install -e .[tpu-aot]")
  elif target.compiler != "xla-gpu":
    pytest.skip("XLA:GPU needs the CUDA plugin: pip install -e .[gpu-aot]")
  mesh = sharding.make_mesh(fsdp=-1, devices=targets.target_devices(target))
  rows = ROWS_PER_CHIP * mesh.size
  compiled = update_peak.compile_update(TINY, mesh, rows, TOKENS)
  text = compiled.as_text()
  module = collectives._parse(text)  # pylint: disable=protected-access
  found = [i for c in module.computations.values() for i in c.instructions.values()
           if i.opcode.removesuffix("-start") in collectives.TRAFFIC]
  state = nnx.state(nnx.eval_shape(lambda: Decoder(TINY, rngs=nnx.Rngs(0))))
  param_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
  return found, collectives.traffic(text), rows, param_bytes


@pytest.mark.parametrize("target_name", ["v5p-8", "h100x8"])
def test_the_update_gathers_weights_and_never_moves_activations(target_name):
  found, traffic, rows, param_bytes = _update_collectives(target_name)
  assert found, "an fsdp update with no collective: the mesh was not used"
  # No collective carries a [rows, tokens, features...] activation (the int32 token ids may be
  # gathered: 4 bytes a token).
  activation = re.compile(rf"(f32|bf16)\[{rows},({TOKENS}|{TOKENS - 1})(,\d+)+\]")
  activations = [f"{i.opcode} {i.shape}" for i in found if activation.search(i.shape)]
  assert not activations
  # What fsdp moves into a chip: each weight gathered for the forward and again for the backward
  # (rematerialized), in float32 at most, and the gradient reduced: at most 4 x the float32
  # parameters. TINY: (embed and head 2 x 128 x 64 + 2 layers x (q, k, v, o 12,288 + mlp 18,432
  # + norms 128) + final norm 64) x 4 bytes.
  assert param_bytes == (2 * 128 * 64 + 2 * (12_288 + 18_432 + 128) + 64) * 4 == 312_576
  assert 0 < traffic.total_bytes <= 4 * param_bytes


def _scoring_traffic(target_name: str, chunk_size: int):
  """Traffic of the gradient of `scoring.token_logprobs` (TINY's head split over fsdp) for 32
  response tokens per chip, in chunks of `chunk_size`."""
  target = targets.get_target(target_name)
  mesh = sharding.make_mesh(fsdp=-1, devices=targets.target_devices(target))
  graph, state = nnx.split(nnx.eval_shape(lambda: Decoder(TINY, rngs=nnx.Rngs(0))))
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, sharding.state_shardings(state, mesh))
  rows = sharding.batch_sharding(mesh, 3)
  hidden = jax.ShapeDtypeStruct((mesh.size, 32, TINY.hidden_size), jnp.float32, sharding=rows)
  tokens = jax.ShapeDtypeStruct((mesh.size, 32), jnp.int32, sharding=sharding.batch_sharding(
      mesh, 2))

  def loss(params, hidden, tokens):
    logp, _ = scoring.token_logprobs(nnx.merge(graph, params), hidden, tokens,
                                     chunk_size=chunk_size)
    return jnp.sum(logp)

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, hidden, tokens).compile()
  return collectives.traffic(compiled.as_text())


@pytest.mark.parametrize("target_name", ["v5p-8", "h100x8"])
def test_the_vocabulary_projection_gathers_the_head_once_whatever_the_chunks(target_name):
  target = targets.get_target(target_name)
  if target.compiler not in ("tpu", "xla-gpu"):
    pytest.skip("XLA:GPU needs the CUDA plugin: pip install -e .[gpu-aot]")
  one, eight = _scoring_traffic(target_name, 32), _scoring_traffic(target_name, 4)
  # Eight chunks move what one does: the head is gathered (and its gradient reduced) once per
  # call, never per chunk, and no chunk's logits are all-reduced.
  assert one.ops == eight.ops and one.total_bytes == eight.total_bytes > 0
  head_bytes = 128 * 64 * 4  # TINY's untied [64, 128] float32 head.
  assert eight.total_bytes <= 3 * head_bytes
