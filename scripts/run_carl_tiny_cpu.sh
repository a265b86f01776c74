#!/usr/bin/env bash
# The embedded default: train a small CARL search agent with verl's real trainer on a CPU, end to end.
# SynthHop data + BM25 retriever + tiny policy (SFT start shipped in recipe/carl/tiny/checkpoints) + CARL RL
# through `python -m recipe.carl.main_carl +device=cpu`, then a summary table, a learning curve and a tree picture.
#
#   bash scripts/run_carl_tiny_cpu.sh                       # CARL, run folder runs/carl_tiny_cpu
#   ALGO=grpo bash scripts/run_carl_tiny_cpu.sh             # the GRPO baseline through the same path
#   bash scripts/run_carl_tiny_cpu.sh --overwrite --seed 1  # any option of `python -m recipe.carl.tiny.demo -h`
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR="${RUN_DIR:-runs/carl_tiny_cpu${ALGO:+_$ALGO}}"

bash scripts/install_cpu.sh
exec "${CARL_VENV:-.venv}/bin/python" -m recipe.carl.tiny.demo --run-dir "$RUN_DIR" "$@"
