#!/usr/bin/env bash
# Installs fusedclr and everything it needs into ./.venv, builds the C++ (and,
# where nvcc is found, CUDA) kernels, then runs the main job: `fusedclr demo`.
#   bash scripts/bootstrap.sh            install + demo
#   bash scripts/bootstrap.sh --no-demo  install only
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q "setuptools>=64" wheel
.venv/bin/python -m pip install -q "$TORCH_SPEC" ninja numpy
# --no-build-isolation: build against the torch just installed (its headers and ABI).
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --no-build-isolation -e ".[test,tune,integrations]"
.venv/bin/python - <<'PY'
import fusedclr, fusedclr.ops as ops
print(f"fusedclr {fusedclr.__version__}: compiled extension {'loaded' if ops.extension_available() else 'MISSING'}, "
      f"CUDA kernels {'built' if ops.cuda_kernels_registered() else 'not built'}")
PY

if [ "${1:-}" != "--no-demo" ]; then
  .venv/bin/fusedclr demo
fi
