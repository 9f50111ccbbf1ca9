"""Loading a Decoder from a preset, a Hugging Face directory or a GGUF file, optionally sharded.

Every tensor is checked (present, right shape) before any is placed, and for NaN and Inf as it
is read, so a bad checkpoint raises an error naming the tensor and file and nothing half-loaded
is returned. Every tensor of the checkpoint must be read, or be a known non-weight
(weight_names.NON_WEIGHT_TENSORS): others, such as layers beyond the config's, fail in one error
naming them, unless allow_unused_weights asks for a deliberately truncated model. With a mesh,
each parameter is assembled on the host one at a time and each device receives only its shard.
"""

import logging

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
from prerl_jax.models.weight_names import (NON_WEIGHT_TENSORS, TensorMapping, grouped_names,
                                           tensor_mappings)

_ROWS_COMPARED = 4096  # Rows of two tensors held at once to compare them.


def _check_tensors(checkpoint, mappings: list[TensorMapping]):
  for mapping in mappings:
    for name in mapping.hf_names:
      if name not in checkpoint.names:
        raise UserError(f"{checkpoint.config_source}: checkpoint is missing tensor {name!r}")
      if tuple(checkpoint.shape(name)) != mapping.hf_shape:
        raise UserError(f"{checkpoint.where(name)}: tensor {name!r} has shape "
                        f"{tuple(checkpoint.shape(name))}, expected {mapping.hf_shape}")


def _same_values(checkpoint, name: str, other: str) -> bool:
  """Whether two checkpoint tensors hold the same shape and values, read a block at a time."""
  if checkpoint.shape(name) != checkpoint.shape(other):
    return False
  a, b = checkpoint.read(name), checkpoint.read(other)
  return all(np.array_equal(np.asarray(a[i:i + _ROWS_COMPARED], np.float32),
                            np.asarray(b[i:i + _ROWS_COMPARED], np.float32))
             for i in range(0, a.shape[0], _ROWS_COMPARED))


def _check_unused(checkpoint, config: ModelConfig, mappings: list[TensorMapping],
                  allow_unused: bool):
  """An error (a warning with allow_unused) naming the checkpoint's tensors the model ignores."""
  read = {name for mapping in mappings for name in mapping.hf_names}
  tied_head = config.tie_word_embeddings and "lm_head.weight" in checkpoint.names
  if tied_head and _same_values(checkpoint, "lm_head.weight", "model.embed_tokens.weight"):
    read.add("lm_head.weight")
  unused, file_names = {}, {}
  for file, name, hf_name in checkpoint.stored_tensors:
    if NON_WEIGHT_TENSORS.fullmatch(name):
      continue
    file_names.setdefault(file, []).append(name)
    if hf_name not in read:
      unused.setdefault(file, []).append(name)
  if not unused:
    return
  count = sum(len(names) for names in unused.values())
  listing = "; ".join(f"{file}: {grouped_names(names, file_names[file])}"
                      for file, names in unused.items())
  if tied_head and "lm_head.weight" not in read:
    listing += " (lm_head.weight differs from the embedding that tie_word_embeddings uses)"
  if allow_unused:
    logging.warning("Loading without %d of the checkpoint's tensors, unused by %s "
                    "(allow_unused_weights): %s", count, checkpoint.config_source, listing)
    return
  raise UserError(f"{checkpoint.config_source} describes a model that does not use {count} "
                  f"of the checkpoint's tensors: {listing}. Fix the config, or pass "
                  "allow_unused_weights=True (run config: model.allow_unused_weights=True) to "
                  "load without them")


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
               check_finite: bool = True, allow_unused_weights: bool = False,
               **config_overrides) -> tuple[Decoder, object]:
  """Loads (model, tokenizer) from a preset name or a checkpoint path.

  Args:
    name_or_path: a preset (`smollm2-135m`, `qwen3-4b`, ...) or a Hugging Face directory or
      .gguf file.
    path: the local checkpoint for presets that are not bundled.
    mesh: place parameters sharded over this mesh by `rules`; default the first device.
    with_tokenizer: also load the tokenizer of the same checkpoint (else None is returned).
    check_finite: fail on a tensor holding NaN or Inf (False saves a pass over huge checkpoints).
    allow_unused_weights: load a model smaller than its checkpoint (say, fewer layers than it
      holds), warning once, where by default a tensor the model does not read is an error.
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
  _check_unused(checkpoint, config, mappings, allow_unused_weights)

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
