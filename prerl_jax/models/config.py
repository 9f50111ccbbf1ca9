"""Decoder hyperparameters, read from and written to Hugging Face `config.json` dictionaries."""

import dataclasses
import json

import jax.numpy as jnp

from prerl_jax.models import attention, remat

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama / Qwen2 / Qwen3 decoder. Hashable, so usable as a static arg."""

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, object], ...] | None = None  # Sorted (key, value) pairs.
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # Qwen2: bias on q/k/v projections.
  qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k.
  max_position_embeddings: int = 2048
  param_dtype: str = "float32"
  dtype: str = "float32"  # Compute dtype; bfloat16 on GPU/TPU.
  remat: str = "none"  # What the backward pass recomputes per layer: prerl_jax.models.remat.
  attention: str = "auto"  # Full-sequence attention backend: prerl_jax.models.attention.

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"Unsupported architecture model_type={self.model_type!r}; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    remat.check_policy(self.remat)
    attention.check_backend(self.attention)
    rope_type = self.rope_scaling_dict.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"Unsupported rope_scaling type {rope_type!r}; supported: "
                       f"{', '.join(SUPPORTED_ROPE_TYPES)}")

  @property
  def rope_scaling_dict(self) -> dict:
    return dict(self.rope_scaling or ())

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf_dict(cls, hf: dict, source: str = "config.json", **overrides) -> "ModelConfig":
    """Builds a config from a Hugging Face config dictionary; `source` names it in errors."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      archs = hf.get("architectures")
      raise ValueError(f"{source}: unsupported architecture model_type={model_type!r} "
                       f"(architectures={archs}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
      num_heads = hf["num_attention_heads"]
      hidden = hf["hidden_size"]
      scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
      theta = hf.get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
      if scaling:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        scaling.setdefault("rope_type", scaling.pop("type", "default"))
        if scaling["rope_type"] == "default" and len(scaling) == 1:
          scaling = None
      config = dict(
          model_type=model_type,
          vocab_size=hf["vocab_size"],
          hidden_size=hidden,
          intermediate_size=hf["intermediate_size"],
          num_layers=hf["num_hidden_layers"],
          num_heads=num_heads,
          num_kv_heads=hf.get("num_key_value_heads") or num_heads,
          head_dim=hf.get("head_dim") or hidden // num_heads,
          rope_theta=float(theta),
          rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
          rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
          tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
          attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
          qk_norm=model_type == "qwen3",
          max_position_embeddings=hf.get("max_position_embeddings", 2048),
      )
    except KeyError as e:
      raise ValueError(f"{source}: missing key {e.args[0]!r}") from None
    config.update(overrides)
    return cls(**config)

  @classmethod
  def from_hf_file(cls, path: str, **overrides) -> "ModelConfig":
    with open(path) as f:
      return cls.from_hf_dict(json.load(f), source=path, **overrides)

  def to_hf_dict(self) -> dict:
    """The Hugging Face config.json dictionary that transformers loads back to this model."""
    hf = dict(
        architectures=[_ARCHITECTURES[self.model_type]],
        model_type=self.model_type,
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim,
        rope_theta=self.rope_theta,
        rope_scaling=self.rope_scaling_dict or None,
        rms_norm_eps=self.rms_norm_eps,
        tie_word_embeddings=self.tie_word_embeddings,
        max_position_embeddings=self.max_position_embeddings,
        hidden_act="silu",
        torch_dtype="float32",
    )
    if self.model_type in ("llama", "qwen3"):
      hf["attention_bias"] = self.attention_bias
    return hf
