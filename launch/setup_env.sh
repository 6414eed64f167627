#!/usr/bin/env bash
# Creates the virtual environment (default .venv) with the project and its dependencies.
# torch: if the venv already has one (GPU users: install your CUDA build into it first), it is
# kept; otherwise the pinned CPU-friendly release TORCH_SPEC (default torch==2.13.0) goes in
# before the project, so the project's torch range never pulls a multi-GB CUDA build here.
set -euo pipefail
VENV=${1:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] keeping torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
else
  echo "[setup] installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
fi
echo "[setup] installing the project and its dependencies"
"${PIP[@]}" install -e ".[dev,export]"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, numpy, cv2; print("torch", torch.__version__, "numpy", numpy.__version__, "opencv", cv2.__version__)')"
