#!/usr/bin/env bash
# CARL (N0=8, N=16) on Qwen3-4B: scripts/run_carl_qwen7b.sh with the paper's Qwen3-4B optimisation
# (arXiv 2512.04949 v3, Table 2): batch 64, lr 1e-5, T_max=10 (its data, reward, action space and metric differ:
# docs/reproducing.md). A step has at most 64 * 24 = 1536 rows, in 64 / 16 = 4
# updates (PPO_MINI_BATCH_QUESTIONS). Every setting of run_carl_qwen7b.sh applies, PACKING=path|tree included.
set -xeuo pipefail
export MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-4B}
export MAX_ACTIONS=${MAX_ACTIONS:-10}
export TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-64}
export LR=${LR:-1e-5}
# K = 4 forks of a tree at once: the rollout-time model's choice for this shape (docs/measurements.md, "Rollout time").
export FORKS_IN_FLIGHT=${FORKS_IN_FLIGHT:-4}
# Thinking-aware turn budget: a Qwen3 turn is <think> reasoning </think> plus one <search> or <answer>; the Qwen2.5
# setting (512 tokens) cuts longer reasoning, and the leaf then ends as `action_too_long`.
export MAX_ACTION_TOKENS=${MAX_ACTION_TOKENS:-2048}
# Qwen3 mentions </search> and </answer> while it reasons: those stops inside <think> continue the turn.
export THINKING=${THINKING:-true}
# Whole trajectory after the prompt (actions + observations). What binds first: a thinking turn costs ~750-2,000
# tokens (reasoning ~300-1,000, at most MAX_ACTION_TOKENS, plus an observation of ~450-1,000), so 16,384 tokens hold
# ~8-20 turns and T_max=10 binds for turns up to ~1,600 tokens; turns of full-length reasoning overflow after 5.
# (8,192 tokens, the earlier setting, overflowed after ~4-10 turns: before T_max in most long trajectories.)
export MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-16384}
# Tokens per GPU in one forward pass: the 7B run's 28,672 (one 18,432-token row fits), not twice the row length.
export MAX_TOKENS_PER_GPU=${MAX_TOKENS_PER_GPU:-28672}
export EXPERIMENT=${EXPERIMENT:-carl_n0${N0:-8}_qwen3_4b}
exec bash "$(dirname "$0")/run_carl_qwen7b.sh" "$@"
