#!/usr/bin/env bash
# Sourced by the run scripts: stop before Ray starts when a step's questions do not split into whole updates; the
# row-layout switch (PACKING); how many turns fit in the token budget.
# ppo_mini_batch_size counts questions (prompts) per optimizer update under the CARL trainer, in both row layouts
# (recipe/carl/schedule.py); recipe/carl/preflight.py checks the same and words it the same (`updates_message`).

# check_updates QUESTIONS_PER_UPDATE TRAIN_BATCH_SIZE: exits 2 with the nearest sizes that divide TRAIN_BATCH_SIZE.
check_updates() {
    local q=$1 b=$2 d lower=0 upper=0 sizes="" why
    set +x
    if (( q > 0 && q <= b && b % q == 0 )); then set -x; return 0; fi
    for (( d = 1; d <= b; d++ )); do
        (( b % d )) && continue
        (( d <= q )) && lower=$d
        (( d >= q && upper == 0 )) && upper=$d
    done
    for d in $lower $upper; do
        (( d == 0 )) && continue
        [[ -n $sizes ]] && sizes+=" or "
        sizes+="$d ($(( b / d )) update$( (( b / d > 1 )) && echo s) a step)"
    done
    if (( q > b )); then why="is more than"; else why="does not divide"; fi
    echo "error: actor_rollout_ref.actor.ppo_mini_batch_size=$q counts questions per optimizer update (the CARL" \
        "trainer's meaning under both algorithm.carl.packing layouts, as verl's prompts for GRPO), and $why" \
        "data.train_batch_size=$b questions a step. Set actor_rollout_ref.actor.ppo_mini_batch_size=$sizes: the" \
        "scripts' PPO_MINI_BATCH_QUESTIONS." >&2
    exit 2
}

# packing_overrides PACKING: sets PACKING_OVERRIDES, the overrides of one training-row layout (algorithm.carl.packing):
#   path  one row per leaf path, verl's attention (flash-attn on GPUs);
#   tree  one row per tree with a tree attention mask (recipe/carl/packing), which needs flex_attention on GPUs.
# ppo_mini_batch_size means questions in both, so the update schedule does not change with the layout.
packing_overrides() {
    case $1 in
        path) PACKING_OVERRIDES=(algorithm.carl.packing=path) ;;
        tree) PACKING_OVERRIDES=(algorithm.carl.packing=tree
                                 ++actor_rollout_ref.model.override_config.attn_implementation=flex_attention) ;;
        *) echo "error: PACKING=$1: use path (one row per leaf path) or tree (one row per tree)" >&2; exit 2 ;;
    esac
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
