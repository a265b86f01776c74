#!/usr/bin/env bash
# Sourced by the run scripts: stop before Ray starts when an update's rows cannot be split over the GPUs; print how
# many turns fit in the token budget.
# verl splits each update's rows (ppo_mini_batch_size x rollout.n) over the data-parallel ranks and asserts
# `mini_batch_size % dp == 0` at the first update; recipe/carl/preflight.py checks the same and words it the same.

gcd() {
    local a=$1 b=$2 t
    while (( b )); do t=$b; b=$(( a % b )); a=$t; done
    echo "$a"
}

# check_mini_batch MINI_BATCH ROLLOUT_N NNODES GPUS_PER_NODE [SP_SIZE]: exits 2 with the nearest working sizes.
check_mini_batch() {
    local mini=$1 n=$2 nnodes=$3 gpus=$4 sp=${5:-1}
    local dp=$(( nnodes * gpus / sp )) rows=$(( $1 * $2 ))
    (( rows % dp == 0 )) && return 0
    local step=$(( dp / $(gcd "$dp" "$n") ))
    local lower=$(( mini / step * step )) upper=$(( (mini / step + 1) * step )) sizes
    if (( lower > 0 )); then sizes="$lower or $upper"; else sizes="$upper"; fi
    echo "error: actor_rollout_ref.actor.ppo_mini_batch_size=$mini x rollout.n=$n = $rows rows per update do not" \
        "divide among $dp data-parallel ranks (trainer.nnodes=$nnodes x trainer.n_gpus_per_node=$gpus); verl would" \
        "stop at its \`mini_batch_size % dp == 0\` assert on the first update. Set" \
        "actor_rollout_ref.actor.ppo_mini_batch_size=$sizes (the scripts' PPO_MINI_BATCH_ROWS for CARL," \
        "PPO_MINI_BATCH_PROMPTS for GRPO), or use a GPU count whose data-parallel size divides $rows." >&2
    exit 2
}

# print_turn_budget: how many turns of full-length actions (MAX_ACTION_TOKENS) and observations (1,000 tokens, the
# upper end of 3 passages) fit in MAX_RESPONSE_LENGTH, next to T_max (MAX_ACTIONS): which of the two binds first.
print_turn_budget() {
    local obs_tokens=1000
    set +x
    echo "token budget: T_max=$MAX_ACTIONS turns; $(( MAX_RESPONSE_LENGTH / (MAX_ACTION_TOKENS + obs_tokens) )) turns" \
        "of full-length actions and observations fit in MAX_RESPONSE_LENGTH=$MAX_RESPONSE_LENGTH"
    set -x
}
