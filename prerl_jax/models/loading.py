"""Loading a Decoder from a preset, a Hugging Face directory or a GGUF file, optionally sharded.

Every tensor is checked (present, right shape) before any is placed, and for NaN and Inf as it
is read, so a bad checkpoint raises an error naming the tensor and file and nothing half-loaded
is returned. With a mesh, each parameter is assembled on the host one at a time and each device
receives only its shard.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prerl_jax.models import presets
from prerl_jax import sharding
from prerl_jax.errors import UserError
from prerl_jax.models.checkpoint_readers import open_checkpoint
from prerl_jax.models.decoder import Decoder
from prerl_jax.models.config import ModelConfig
from prerl_jax.models.tokenizer import load_tokenizer
from prerl_jax.models.weight_names import TensorMapping, tensor_mappings


def _check_tensors(checkpoint, mappings: list[TensorMapping]):
  for mapping in mappings:
    for name in mapping.hf_names:
      if name not in checkpoint.names:
        raise UserError(f"{checkpoint.config_source}: checkpoint is missing tensor {name!r}")
      if tuple(checkpoint.shape(name)) != mapping.hf_shape:
        raise UserError(f"{checkpoint.where(name)}: tensor {name!r} has shape "
                        f"{tuple(checkpoint.shape(name))}, expected {mapping.hf_shape}")


def _read_float32(checkpoint, name: str, check_finite: bool) -> np.ndarray:
  """A checkpoint tensor as float32; with check_finite, an error naming it if it holds NaN/Inf."""
  value = np.asarray(checkpoint.read(name), np.float32)
  if check_finite and not np.isfinite(value).all():
    raise UserError(f"{checkpoint.where(name)}: tensor {name!r} holds "
                    f"{np.isnan(value).sum()} NaN and {np.isinf(value).sum()} Inf values "
                    "(check_finite=False skips this check)")
  return value


def _host_value(checkpoint, mapping: TensorMapping, dtype, check_finite: bool) -> np.ndarray:
  slices = [mapping.to_ours(_read_float32(checkpoint, n, check_finite)).astype(dtype)
            for n in mapping.hf_names]
  return np.stack(slices) if mapping.stacked else slices[0]


def _place(value: np.ndarray, target) -> jax.Array:
  return jax.make_array_from_callback(value.shape, target, lambda index: value[index])


def model_config_of(checkpoint_path: str, **overrides) -> ModelConfig:
  """The ModelConfig of a checkpoint, without reading its tensors."""
  checkpoint = open_checkpoint(checkpoint_path)
  return ModelConfig.from_hf_dict(checkpoint.hf_config, source=checkpoint.config_source,
                                  **overrides)


def load_model(name_or_path: str, *, path: str | None = None, mesh: Mesh | None = None,
               rules=sharding.DEFAULT_RULES, with_tokenizer: bool = True,
               check_finite: bool = True, **config_overrides) -> tuple[Decoder, object]:
  """Loads (model, tokenizer) from a preset name or a checkpoint path.

  Args:
    name_or_path: a preset (`smollm2-135m`, `qwen3-4b`, ...) or a Hugging Face directory or
      .gguf file.
    path: the local checkpoint for presets that are not bundled.
    mesh: place parameters sharded over this mesh by `rules`; default the first device.
    with_tokenizer: also load the tokenizer of the same checkpoint (else None is returned).
    check_finite: fail on a tensor holding NaN or Inf (False saves a pass over huge checkpoints).
    **config_overrides: ModelConfig fields such as `param_dtype`, `dtype`, `remat`.
  """
  checkpoint_path, family = presets.resolve(name_or_path, path)
  checkpoint = open_checkpoint(checkpoint_path)
  config = ModelConfig.from_hf_dict(checkpoint.hf_config, source=checkpoint.config_source,
                                    **config_overrides)
  if family is not None and config.model_type != family:
    raise UserError(f"{checkpoint.config_source}: preset {name_or_path!r} expects a "
                    f"{family} checkpoint, this one is {config.model_type}")
  mappings = tensor_mappings(config)
  _check_tensors(checkpoint, mappings)

  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  if mesh is not None:
    shardings = sharding.state_shardings(abstract_state, mesh, rules)
  else:
    device = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("d",)), PartitionSpec())
    shardings = jax.tree.map(lambda _: device, abstract_state)
  flat_shardings = dict(nnx.to_flat_state(shardings))
  dtype = jnp.dtype(config.param_dtype)
  values = {}
  for mapping in mappings:
    target = flat_shardings[mapping.path].get_value()
    values[mapping.path] = _place(_host_value(checkpoint, mapping, dtype, check_finite), target)
  pure = {}
  for path, value in values.items():
    node = pure
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  nnx.replace_by_pure_dict(abstract_state, pure)
  model = nnx.merge(graphdef, abstract_state)
  tokenizer = load_tokenizer(checkpoint_path) if with_tokenizer else None
  return model, tokenizer


def random_model(config: ModelConfig, seed: int = 0, mesh: Mesh | None = None,
                 rules=sharding.DEFAULT_RULES) -> Decoder:
  """A randomly initialised Decoder, created directly in its sharded layout when given a mesh."""
  if mesh is None:
    return Decoder(config, rngs=nnx.Rngs(seed))
  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(seed)))
  shardings = sharding.state_shardings(nnx.state(abstract), mesh, rules)

  @jax.jit
  def create():
    state = nnx.state(Decoder(config, rngs=nnx.Rngs(seed)))
    return jax.lax.with_sharding_constraint(state, shardings)

  return nnx.merge(nnx.graphdef(abstract), create())
