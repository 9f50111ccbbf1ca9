"""Per-chip memory of one update micro-batch, compiled ahead of time for a TPU topology.

The program is the gradient of the mean response log-probability (the decoder under its
`model.attention` backend and `model.remat` policy, then the chunked vocabulary projection of
`prerl_jax.rl.scoring`) over `rows` sequences of `tokens` tokens, parameters and rows sharded
over an fsdp mesh of the topology's chips. libtpu compiles it on a CPU host
(JAX_PLATFORMS=cpu); XLA's memory analysis of the TPU program gives the per-chip figures.
"""

import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies

from prerl_jax import sharding
from prerl_jax.models.config import ModelConfig
from prerl_jax.models.decoder import Decoder
from prerl_jax.rl import scoring


def topology_mesh(topology: str, **axes):
  """A (data, fsdp, tensor) mesh over the chips of a libtpu topology such as 'v5p:2x2x2'."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  description = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  return sharding.make_mesh(**(axes or {"fsdp": -1}), devices=description.devices)


def compile_update(config: ModelConfig, mesh, rows: int, tokens: int):
  """The compiled gradient program of one micro-batch of `rows` x `tokens` on `mesh`."""
  graph, state = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
  shardings = sharding.state_shardings(state, mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
  row_sharding = sharding.batch_sharding(mesh, 2)
  batch = jax.ShapeDtypeStruct((rows, tokens), jnp.int32, sharding=row_sharding)

  def loss(params, tokens_BxT, positions_BxT, segment_ids_BxT):
    model = nnx.merge(graph, params)
    hidden, _ = model(tokens_BxT, positions_BxT, segment_ids_BxT)
    logp, _ = scoring.token_logprobs(model, hidden[:, :-1], tokens_BxT[:, 1:])
    return jnp.mean(logp)

  with jax.set_mesh(mesh):
    grad = jax.jit(jax.grad(loss), out_shardings=shardings)
    return grad.lower(params, batch, batch, batch).compile()


def per_chip_bytes(compiled) -> dict[str, int]:
  """Arguments, outputs, temporaries and their peak on one chip (XLA's memory analysis)."""
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - (
      m.alias_size_in_bytes)
  return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
          "temporaries": m.temp_size_in_bytes, "peak": peak}
