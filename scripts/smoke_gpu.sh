#!/usr/bin/env bash
# Before renting a node: two training steps of the GPU path (scripts/run_carl_qwen7b.sh, main_carl's checks, Ray,
# FSDP2, vLLM, CARL's agent loop and the search tool, checkpoints, validation, metrics, tree dumps), then evaluation
# of the checkpoint and its pictures, on a randomly initialised tiny Qwen2 built here (nothing downloaded): minutes.
# The last lines list each check with ok or FAILED. Options: python -m recipe.carl.smoke -h
#
#   bash scripts/smoke_gpu.sh                                          # CARL on 1 GPU, output in runs/smoke_gpu
#   ALGO=grpo bash scripts/smoke_gpu.sh                                # scripts/run_grpo_qwen7b.sh instead
#   bash scripts/smoke_gpu.sh --model Qwen/Qwen2.5-0.5B-Instruct --gpus 8   # a model that searches; 8 FSDP ranks
set -euo pipefail
cd "$(dirname "$0")/.."
ALGO=${ALGO:-carl}
OUT=${OUT:-runs/smoke_gpu_$ALGO}
exec "${PYTHON:-python3}" -m recipe.carl.smoke --out "$OUT" --algo "$ALGO" "$@"
