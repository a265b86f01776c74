#!/usr/bin/env bash
# Evaluate a trained policy (and optionally its start) on test parquets on a GPU node, with vLLM, in the training
# environment: python -m recipe.carl.evaluate (see its -h). Defaults are scripts/run_carl_qwen7b.sh's; needs a
# retriever at RETRIEVER_URL (scripts/launch_retriever.sh).
#
#   MODEL_PATH=$HOME/checkpoints/carl/carl_n08_qwen2.5_7b/global_step_100/actor BASELINE_PATH=Qwen/Qwen2.5-7B-Instruct \
#     TEST_FILES="data/nq_test.parquet data/hotpotqa_test.parquet" bash scripts/eval.sh
#   ... bash scripts/eval.sh --samples 4 --temperature 0.7 --limit 500     # extra arguments go to the CLI
set -xeuo pipefail

# ---- what to evaluate (MODEL_PATH / BASELINE_PATH: a model folder, a hub id or a verl checkpoint) ----
MODEL_PATH=${MODEL_PATH:?set MODEL_PATH to a model folder, a hub id, or a verl checkpoint (.../global_step_N/actor)}
BASELINE_PATH=${BASELINE_PATH:-}
TEST_FILES=${TEST_FILES:?set TEST_FILES to one or more test parquet files (space-separated; data_preprocess writes them)}
OUT=${OUT:-runs/eval_$(date +%Y%m%d_%H%M%S)}
export RETRIEVER_URL=${RETRIEVER_URL:-http://127.0.0.1:8000/retrieve}

# ---- the environment (as in training: algorithm.carl.*, the tool yaml's topk, data.max_*_length) ----
MAX_ACTIONS=${MAX_ACTIONS:-32}
MAX_ACTION_TOKENS=${MAX_ACTION_TOKENS:-512}
TOPK=${TOPK:-3}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-2048}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-12288}

# ---- vLLM ----
TP=${TP:-1}
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.85}

read -r -a test_files <<< "$TEST_FILES"
args=(
    --model "$MODEL_PATH"
    --data "${test_files[@]}"
    --out "$OUT"
    --engine vllm
    --retriever-url "$RETRIEVER_URL"
    --max-actions "$MAX_ACTIONS"
    --max-action-tokens "$MAX_ACTION_TOKENS"
    --topk "$TOPK"
    --prompt-length "$MAX_PROMPT_LENGTH"
    --response-length "$MAX_RESPONSE_LENGTH"
    --tensor-parallel-size "$TP"
    --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION"
)
[[ -n "$BASELINE_PATH" ]] && args+=(--baseline "$BASELINE_PATH")
exec python3 -m recipe.carl.evaluate "${args[@]}" "$@"
