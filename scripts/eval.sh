#!/usr/bin/env bash
# Evaluate a trained policy (and optionally its start) on test parquets on a GPU node, with vLLM, in the training
# environment: python -m recipe.carl.evaluate (see its -h). Needs a retriever at RETRIEVER_URL
# (scripts/launch_retriever.sh).
#
#   MODEL_PATH=$HOME/checkpoints/carl/carl_n08_qwen2.5_7b/global_step_100/actor BASELINE_PATH=Qwen/Qwen2.5-7B-Instruct \
#     TEST_FILES="data/nq_test.parquet data/hotpotqa_test.parquet" bash scripts/eval.sh
#   PROFILE=qwen3 MODEL_PATH=Qwen/Qwen3-4B TEST_FILES=... bash scripts/eval.sh    # a Qwen3 model without a run record
#   ... bash scripts/eval.sh --samples 4 --temperature 0.7 --limit 500     # extra arguments go to the CLI
set -xeuo pipefail

# ---- what to evaluate (MODEL_PATH / BASELINE_PATH: a model folder, a hub id or a verl checkpoint) ----
MODEL_PATH=${MODEL_PATH:?set MODEL_PATH to a model folder, a hub id, or a verl checkpoint (.../global_step_N/actor)}
BASELINE_PATH=${BASELINE_PATH:-}
TEST_FILES=${TEST_FILES:?set TEST_FILES to one or more test parquet files (space-separated; data_preprocess writes them)}
OUT=${OUT:-runs/eval_$(date +%Y%m%d_%H%M%S)}
export RETRIEVER_URL=${RETRIEVER_URL:-http://127.0.0.1:8000/retrieve}

# ---- the environment (as in training: algorithm.carl.*, the tool yaml's topk, data.max_*_length, chat template) ----
# Unset: a verl checkpoint is rolled out with the settings its run recorded (global_step_N/carl_run_config.json),
# anything else with the CLI's defaults, which are scripts/run_carl_qwen7b.sh's. Set: passed as flags (a flag that
# differs from the run's record is printed). PROFILE=qwen3 sets scripts/run_carl_qwen3_4b.sh's values (thinking, T_max
# 10, 2,048-token turns, 16,384-token trajectories) for a model without a record, e.g. its start Qwen/Qwen3-4B.
PROFILE=${PROFILE:-}
case "$PROFILE" in
    "") ;;
    qwen3)
        MAX_ACTIONS=${MAX_ACTIONS:-10}
        MAX_ACTION_TOKENS=${MAX_ACTION_TOKENS:-2048}
        MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-16384}
        THINKING=${THINKING:-true}
        ;;
    *)
        echo "error: PROFILE=$PROFILE is unknown: use qwen3 (scripts/run_carl_qwen3_4b.sh's settings), or leave it" \
            "unset (the checkpoint's recorded settings, else scripts/run_carl_qwen7b.sh's)" >&2
        exit 2
        ;;
esac
MAX_ACTIONS=${MAX_ACTIONS:-}
MAX_ACTION_TOKENS=${MAX_ACTION_TOKENS:-}
TOPK=${TOPK:-}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-}
THINKING=${THINKING:-}                         # true / false
INVALID_ACTION=${INVALID_ACTION:-}             # end / feedback
CHAT_TEMPLATE_KWARGS=${CHAT_TEMPLATE_KWARGS:-} # JSON, e.g. '{"enable_thinking": true}'

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
    --tensor-parallel-size "$TP"
    --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION"
)
[[ -n "$BASELINE_PATH" ]] && args+=(--baseline "$BASELINE_PATH")
[[ -n "$MAX_ACTIONS" ]] && args+=(--max-actions "$MAX_ACTIONS")
[[ -n "$MAX_ACTION_TOKENS" ]] && args+=(--max-action-tokens "$MAX_ACTION_TOKENS")
[[ -n "$TOPK" ]] && args+=(--topk "$TOPK")
[[ -n "$MAX_PROMPT_LENGTH" ]] && args+=(--prompt-length "$MAX_PROMPT_LENGTH")
[[ -n "$MAX_RESPONSE_LENGTH" ]] && args+=(--response-length "$MAX_RESPONSE_LENGTH")
[[ -n "$INVALID_ACTION" ]] && args+=(--invalid-action "$INVALID_ACTION")
[[ -n "$CHAT_TEMPLATE_KWARGS" ]] && args+=(--chat-template-kwargs "$CHAT_TEMPLATE_KWARGS")
case "$THINKING" in
    "") ;;
    true) args+=(--thinking) ;;
    false) args+=(--no-thinking) ;;
    *) echo "error: THINKING=$THINKING: use true or false (or leave it unset)" >&2; exit 2 ;;
esac
exec python3 -m recipe.carl.evaluate "${args[@]}" "$@"
