"""The abstract state of a run on a target's mesh: sharded ShapeDtypeStructs, sizes, bytes per chip.

Nothing is allocated: the dry run's programs are traced from these (dry_run.py).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from prerl_jax import sharding
from prerl_jax.aot import targets as targets_lib
from prerl_jax.generate import sampler as sampler_lib
from prerl_jax.models import presets
from prerl_jax.models.config import ModelConfig
from prerl_jax.models.decoder import Decoder
from prerl_jax.rl import train_step
from prerl_jax.rl.schedule import schedule_from_config
from prerl_jax.sharding import per_device_bytes


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def model_config_for(config: ml_collections.ConfigDict,
                     target: targets_lib.Target | None = None) -> ModelConfig:
  """The run's ModelConfig from its preset's shape (model.name), with its dtypes, remat and
  attention backend as planned for the target (the report's model.attention): `auto` is splash
  on a TPU; on a GPU `auto` and `cudnn` are planned as chunked, as cuDNN builds its kernel on
  a real device (neither XLA:GPU's deviceless compile nor simulated CPU devices can)."""
  model = config.model
  backend = model.attention
  if target is not None and backend in ("auto", "cudnn"):
    backend = "splash" if target.compiler == "tpu" and backend == "auto" else "chunked"
  return presets.preset_model_config(model.name, param_dtype=model.param_dtype,
                                     dtype=model.dtype, remat=model.remat, attention=backend)


def make_target_mesh(target: targets_lib.Target, mesh_sizes: dict | None):
  """The run's mesh over the target's chips (all fsdp unless `mesh_sizes` says otherwise)."""
  sizes = mesh_sizes or {"fsdp": target.chips}
  mesh = sharding.make_mesh(**sizes, devices=targets_lib.target_devices(target))
  if mesh.size != target.chips:
    raise ValueError(f"--mesh={sizes} has {mesh.size} devices; target {target.name} has "
                     f"{target.chips} chips")
  return mesh


@dataclasses.dataclass(frozen=True)
class StepShapes:
  """The abstract (sharded ShapeDtypeStruct) state of a run and its sizes."""

  model: ModelConfig
  mesh: jax.sharding.Mesh
  state: train_step.TrainState
  graphdef: object
  optimizer: object
  rows: int
  prompt_width: int
  bytes: dict

  @property
  def compute_weights_bytes(self) -> float:
    """Bytes per chip of the whole model in its compute dtype, split over the tensor axis only."""
    elements = sum(math.prod(p.shape) for p in jax.tree.leaves(self.state.params))
    return elements * self.model.compute_dtype.itemsize / self.mesh.shape["tensor"]


def step_shapes(config: ml_collections.ConfigDict, mesh, model_config: ModelConfig) -> StepShapes:
  """Abstract train state, sizes and per-chip state bytes of `config` on `mesh`."""
  rollout, optim = config.rollout, config.optim
  rows = rollout.prompts_per_step * rollout.group_size
  batch_devices = sharding.batch_devices(mesh)
  if rollout.prompts_per_step % batch_devices:
    raise ValueError(f"rollout.prompts_per_step={rollout.prompts_per_step} is not divisible by "
                     f"the {batch_devices} devices of the data and fsdp mesh axes")
  abstract_model = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model)
  optimizer = train_step.make_optimizer(optim.learning_rate, optim.weight_decay, optim.grad_clip,
                                        optim.b1, optim.b2)
  with_reference = any(p.objective.kl_spaces for p in schedule_from_config(config.objective).phases)
  state = train_step.TrainState(
      params=abstract_params, opt_state=jax.eval_shape(optimizer.init, abstract_params),
      step=jax.ShapeDtypeStruct((), jnp.int32), rng=jax.eval_shape(jax.random.key, 0),
      skipped=jax.ShapeDtypeStruct((), jnp.int32),
      reference=abstract_params if with_reference else None)
  state = _with_shardings(state, train_step.train_state_shardings(state, mesh))
  grads = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding), state.params)
  width = sampler_lib.SamplingConfig(max_new_tokens=1, pad_id=0).bucket(
      config.data.max_prompt_length)
  bytes_ = {"params": per_device_bytes(state.params),
            "opt_state": per_device_bytes(state.opt_state),
            "reference": per_device_bytes(state.reference),
            "gradients": per_device_bytes(grads)}
  return StepShapes(model=model_config, mesh=mesh, state=state, graphdef=graphdef,
                    optimizer=optimizer, rows=rows, prompt_width=width, bytes=bytes_)
