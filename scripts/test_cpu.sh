#!/usr/bin/env bash
# Runs the whole CPU test suite (installs into .venv first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_cpu.sh
VENV="${CARL_VENV:-.venv}"
exec "$VENV/bin/python" -m pytest -q "$@"
