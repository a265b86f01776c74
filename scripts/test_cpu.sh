#!/usr/bin/env bash
# Runs the whole CPU test suite, installing what is missing first (scripts/install_cpu.sh):
#   1. the main venv (.venv): every test; the ones marked `vllm` skip there (no vLLM in that venv);
#   2. the vLLM venv (.venv-vllm, install_cpu.sh --vllm): the tests marked `vllm` (verl's vLLM rollout on CPU).
# CARL_SKIP_VLLM=1 skips the vLLM venv and its tests. Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CARL_VENV:-.venv}"
VLLM_VENV="${CARL_VLLM_VENV:-$VENV-vllm}"
if [ "${CARL_SKIP_VLLM:-0}" = 1 ]; then
  bash scripts/install_cpu.sh
else
  bash scripts/install_cpu.sh --vllm
fi
status=0
"$VENV/bin/python" -m pytest -q "$@" || status=$?
if [ "${CARL_SKIP_VLLM:-0}" != 1 ]; then
  # Exit code 5 (no test selected) is fine: the extra arguments may name files without vLLM tests.
  vstatus=0
  "$VLLM_VENV/bin/python" -m pytest -q -m vllm "$@" || vstatus=$?
  if [ "$vstatus" != 0 ] && [ "$vstatus" != 5 ]; then status=$vstatus; fi
fi
exit "$status"
