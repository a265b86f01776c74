#!/usr/bin/env bash
# 2 GRPO steps of verl's real trainer on CPU (tiny random Qwen2, carl_hf rollout), then a summary line in JSON.
# Usage: tests/recipe/cpu/run_grpo_cpu_smoke.sh [--no-sync] [--steps N] [hydra overrides...]
# Switch the trainer with CARL_SMOKE_LAUNCHER="python -m recipe.carl.main_carl" once the recipe's main exists.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
PYTHON="${PYTHON:-${REPO}/.venv/bin/python}"
# Hard wall-clock limit of the whole smoke run (the driver also kills the trainer's session at --timeout).
LIMIT_S="${LIMIT_S:-600}"

cd "${REPO}"
exec timeout --kill-after=30 "${LIMIT_S}" "${PYTHON}" tests/recipe/cpu/grpo_smoke.py --timeout "$((LIMIT_S - 30))" "$@"
