#!/usr/bin/env bash
# CARL (N0=8, N=16) on Qwen3-4B: scripts/run_carl_qwen7b.sh with the paper's Qwen3-4B setting
# (arXiv 2512.04949 v3, Table 2): batch 64, lr 1e-5, T_max=10. A step has at most 64 * 24 = 1536 rows.
set -xeuo pipefail
export MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-4B}
export MAX_ACTIONS=${MAX_ACTIONS:-10}
export TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-64}
export LR=${LR:-1e-5}
# Whole trajectory after the prompt (actions + observations); T_max=10 turns of a reasoning model fit in 8k.
export MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-8192}
export EXPERIMENT=${EXPERIMENT:-carl_n0${N0:-8}_qwen3_4b}
exec bash "$(dirname "$0")/run_carl_qwen7b.sh" "$@"
