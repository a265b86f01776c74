#!/usr/bin/env bash
# CARL-Lite (N0=1, N=16) on Qwen2.5-7B-Instruct: scripts/run_carl_qwen7b.sh with one initial rollout per tree.
# A CARL-Lite tree gives at most N0 + N = 17 rows, so a step has at most 128 * 17 = 2176 rows, in 128 / 16 = 8 updates
# (PPO_MINI_BATCH_QUESTIONS). Every setting of run_carl_qwen7b.sh applies, PACKING=path|tree included.
set -xeuo pipefail
export N0=${N0:-1}
# K = 1 (Alg. 1): every K > 1 generates over 5 % more actions at this shape (docs/measurements.md, "Rollout time").
export FORKS_IN_FLIGHT=${FORKS_IN_FLIGHT:-1}
export EXPERIMENT=${EXPERIMENT:-carl_lite_qwen2.5_7b}
exec bash "$(dirname "$0")/run_carl_qwen7b.sh" "$@"
