#!/usr/bin/env bash
# Sets up .venv with the project and its test extra, on a CPU-only machine without a multi-GB CUDA torch.
# Re-running it is cheap: an existing .venv is reused.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  # The CPU build of torch: taken from a local wheel or index where pip is configured with one; otherwise,
  # on a machine without a GPU, from PyTorch's CPU index (PyPI's default torch is a CUDA build).
  if command -v nvidia-smi >/dev/null || pip download -q --no-deps -d "$(mktemp -d)" --only-binary=:all: \
        "torch==2.13.0" --no-index 2>/dev/null; then
    pip install -q "torch==2.13.0"
  else
    pip install -q "torch==2.13.0" --index-url "${SPLAM_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
fi
pip install -q -e ".[test]"
python - <<'PY'
import importlib.util, sys
if importlib.util.find_spec("torchvision"):
    sys.exit("torchvision is installed in .venv: it breaks diffusers' StableDiffusionPipeline import with this torch; pip uninstall torchvision")
import torch; print(f"setup ok: torch {torch.__version__}, cuda={torch.cuda.is_available()}")
PY
