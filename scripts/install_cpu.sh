#!/usr/bin/env bash
# Installs carl-verl for the CPU path into a virtualenv (default: .venv), if it is not there yet.
# torch==2.13.0 resolves to the local CPU wheel; it is installed first so that nothing pulls CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CARL_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
stamp="$VENV/.carl-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt setup.py ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
"$VENV/bin/python" -m pip install --quiet -e ".[cpu]"
# Fail here, not mid-run, if something pulled a CUDA build of torch.
"$VENV/bin/python" - <<'PY'
import torch
assert "+cpu" in torch.__version__ or not torch.version.cuda, f"CUDA torch {torch.__version__} was installed"
PY
touch "$stamp"
