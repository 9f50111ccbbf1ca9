#!/usr/bin/env bash
# GPU check for a lent GPU (one H100/H200, under 8 minutes): kernel and attention tests on cuda,
# the sampler's tokens/s at batch 256 against the HBM roofline, the train step's MFU for a
# Qwen3-1.7B-shaped model with random weights, and one RL step's time split.
#
#   bash launch/gpu_check.sh                 # full size, on the GPU
#   bash launch/gpu_check.sh --size=tiny     # a tiny model on the CPU: checks the script itself
#   bash launch/gpu_check.sh --no-install    # skip block 1 (everything already installed)
#
# Needs python3 and pip. Block 1 installs only what is missing; on a machine without internet
# point pip at local wheels first (PIP_FIND_LINKS=/wheels PIP_NO_INDEX=1).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=full
INSTALL=1
for arg in "$@"; do
  case "$arg" in
    --size=*) SIZE="${arg#--size=}" ;;
    --no-install) INSTALL=0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (use --size=full|tiny, --no-install)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

# ---- 1. Install what is missing (jax with CUDA 12, the project's imports, pytest, torch) ------
if [ "$INSTALL" = 1 ]; then
  MISSING=$("$PY" - "$SIZE" <<'PYEOF'
import importlib.util, sys
wanted = {"flax": "flax==0.12.8", "optax": "optax", "ml_collections": "ml-collections",
          "transformers": "transformers", "absl": "absl-py", "pytest": "pytest",
          "torch": "torch", "gguf": "gguf", "safetensors": "safetensors", "orbax": "orbax-checkpoint"}
missing = [spec for module, spec in wanted.items() if importlib.util.find_spec(module) is None]
try:
  import jax
  ok = jax.__version__ == "0.10.2" and (sys.argv[1] == "tiny" or jax.default_backend() == "gpu")
except Exception:
  ok = False
if not ok:
  missing.insert(0, "jax[cuda12]==0.10.2" if sys.argv[1] != "tiny" else "jax==0.10.2")
print(" ".join(missing))
PYEOF
)
  if [ -n "$MISSING" ]; then
    echo "== 1. installing: $MISSING"
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet $MISSING
  else
    echo "== 1. install: nothing missing"
  fi
fi

# ---- 2. Kernel and attention tests on the device -----------------------------------------------
if [ "$SIZE" = tiny ]; then PLATFORM=cpu; else PLATFORM=cuda; fi
export JAX_PLATFORMS="$PLATFORM"
echo "== 2. kernel and attention tests on $PLATFORM"
"$PY" -c "import jax; print('devices:', jax.devices())"
TESTS=()
for path in tests/kernels tests/generate/test_sampler.py tests/rl/test_scoring.py tests/models/test_model_parity.py; do
  [ -e "$path" ] && TESTS+=("$path")
done
# The C++ CPU kernels' tests (and the sampler's cpu-kernel variants) run on the CPU only; SmolLM2
# tests need its GGUF package. tiny: the tiny-model tests alone (seconds on a CPU).
SELECT="not cpu and not smollm2"
if [ "$SIZE" = tiny ]; then SELECT="tiny and $SELECT"; fi
# A test that needs 8 devices fails on one GPU: the summary names each failure.
# Parity tolerances are float32's: keep XLA from using TF32 for float32 matmuls on the GPU.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 "$PY" -m pytest -q -p no:cacheprovider -k "$SELECT" "${TESTS[@]}" 2>&1 | tail -25 || true

# ---- 3-5. Sampler, train step, RL step ----------------------------------------------------------
echo "== 3-5. sampler tokens/s, train-step MFU, RL step split ($SIZE)"
"$PY" launch/gpu_check.py --size="$SIZE"
echo "== gpu check done in $(( $(date +%s) - START )) s"
