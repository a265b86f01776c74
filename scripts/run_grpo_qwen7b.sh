#!/usr/bin/env bash
# GRPO baseline for CARL on Qwen2.5-7B-Instruct: group of 16 chains per prompt, same data, tool, reward and T_max.
# Same entry point, yaml and data as CARL; only the estimator and the group size differ (the rows name carl_agent,
# which runs one trajectory per session under GRPO). Seed, validation, checkpoints, logging and the update size are
# the CARL scripts' variables (SEED, TEST_FREQ, VAL_BEFORE_TRAIN, SAVE_FREQ, MAX_CKPT_TO_KEEP, LOGGER:
# scripts/run_settings.sh; PPO_MINI_BATCH_QUESTIONS below), so both arms of a comparison run alike.
set -xeuo pipefail

# ---- paths (override through the environment) ----
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-7B-Instruct}
TRAIN_FILE=${TRAIN_FILE:-$HOME/data/carl_search/train.parquet}
VAL_FILE=${VAL_FILE:-$HOME/data/carl_search/val.parquet}
export RETRIEVER_URL=${RETRIEVER_URL:-http://127.0.0.1:8000/retrieve}
# verl tool yaml declaring the tool named `search` (recipe/carl/search, issue 4); it reads RETRIEVER_URL.
TOOL_CONFIG=${TOOL_CONFIG:-recipe/carl/search/search_tool.yaml}
CKPT_DIR=${CKPT_DIR:-$HOME/checkpoints/carl}

# ---- cluster ----
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
SP_SIZE=${SP_SIZE:-1}  # Ulysses sequence parallelism of the actor (data-parallel ranks = GPUs / SP_SIZE)

# ---- GRPO ----
# Chains per prompt. 16 matches CARL (N0=8, N=16) in generated actions, not in leaves: a CARL tree has N0 + N = 24
# leaves, but a fork regenerates only the suffix after its fork point, so under Eq. 14's cost model (forks spread
# evenly along the trajectories) a tree costs N0 + N/2 = 16 full trajectories, and in the paper's Table 2 (Qwen3-4B,
# T_max=10) CARL generated 81.8 actions per question against GRPO's 80.9. The paper says its baselines match "the
# number of terminal states per group" without giving GRPO's group size; 16 is inferred from those numbers
# (docs/reproducing.md). GROUP_SIZE=24 matches CARL's leaves instead, as the CPU experiment matched them
# (docs/carl_vs_grpo.md); the logged carl/total/* counts compare any two runs at equal generated or trained budgets.
GROUP_SIZE=${GROUP_SIZE:-16}
MAX_ACTIONS=${MAX_ACTIONS:-32}

# ---- optimisation ----
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-128}  # prompts per step (x GROUP_SIZE = 2048 chains)
LR=${LR:-5e-6}
TOTAL_STEPS=${TOTAL_STEPS:-100}
# Questions (prompts) per optimizer update, the CARL scripts' variable: 16 questions x 16 chains = 256 rows, 128 / 16
# = 8 updates a step, as CARL's. It must divide TRAIN_BATCH_SIZE (checked below, before Ray starts); the trainer
# pads a step whose rows do not divide among the data-parallel ranks (recipe/carl/schedule.py).
if [[ -n ${PPO_MINI_BATCH_PROMPTS:-} ]]; then
    echo "error: PPO_MINI_BATCH_PROMPTS is gone: CARL and GRPO share one variable for the update size; set" \
        "PPO_MINI_BATCH_QUESTIONS instead (default 16: TRAIN_BATCH_SIZE / 16 updates a step)" >&2
    exit 2
fi
PPO_MINI_BATCH_QUESTIONS=${PPO_MINI_BATCH_QUESTIONS:-16}
# Training rows (algorithm.carl.packing): GRPO's rows are single chains, one row each whatever the layout; tree only
# switches the attention to flex_attention, the kernel of a packed CARL run, for a like-for-like comparison.
PACKING=${PACKING:-path}

# ---- token budgets (the same as the CARL scripts', so trajectories are comparable) ----
# One agent turn (reasoning + one <search> or <answer>): algorithm.carl.max_action_tokens.
MAX_ACTION_TOKENS=${MAX_ACTION_TOKENS:-512}
# Thinking models (Qwen3): a </search> or </answer> inside an unclosed <think> block does not end the turn.
THINKING=${THINKING:-false}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-2048}
# Whole trajectory after the prompt: every action AND every observation; a trajectory that runs out ends as
# `context_overflow`.
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-12288}
# What binds first: context, not T_max. A turn costs ~550-1,500 tokens (action ~100-300, at most MAX_ACTION_TOKENS,
# plus an observation of ~450-1,000), so 12,288 tokens hold ~8-22 turns, fewer than T_max=32 (see
# run_carl_qwen7b.sh; the paper's Qwen3-4B trajectories average 6-7 actions).
source "$(dirname "$0")/check_batch.sh"
print_turn_budget
# Tokens per GPU in one forward pass with dynamic batch size (>= one full sequence).
MAX_TOKENS_PER_GPU=${MAX_TOKENS_PER_GPU:-$(( (MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH) * 2 ))}
EXPERIMENT=${EXPERIMENT:-grpo_qwen2.5_7b}

# ---- seed, validation, checkpoints, logging (scripts/run_settings.sh, shared with the CARL scripts) ----
source "$(dirname "$0")/run_settings.sh"
run_settings

check_updates "$PPO_MINI_BATCH_QUESTIONS" "$TRAIN_BATCH_SIZE"
packing_overrides "$PACKING"

python3 -m recipe.carl.main_carl \
    data.train_files="$TRAIN_FILE" \
    data.val_files="$VAL_FILE" \
    data.train_batch_size=$TRAIN_BATCH_SIZE \
    data.max_prompt_length=$MAX_PROMPT_LENGTH \
    data.max_response_length=$MAX_RESPONSE_LENGTH \
    data.filter_overlong_prompts=True \
    data.truncation=error \
    algorithm.adv_estimator=grpo \
    algorithm.carl.max_actions=$MAX_ACTIONS \
    algorithm.carl.max_action_tokens=$MAX_ACTION_TOKENS \
    algorithm.carl.thinking=$THINKING \
    "${PACKING_OVERRIDES[@]}" \
    actor_rollout_ref.rollout.n=$GROUP_SIZE \
    actor_rollout_ref.model.path="$MODEL_PATH" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.actor.optim.lr=$LR \
    actor_rollout_ref.actor.ppo_mini_batch_size=$PPO_MINI_BATCH_QUESTIONS \
    actor_rollout_ref.actor.use_dynamic_bsz=True \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$MAX_TOKENS_PER_GPU \
    actor_rollout_ref.actor.ulysses_sequence_parallel_size=$SP_SIZE \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.fsdp_config.param_offload=False \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.mode=async \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True \
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=$MAX_TOKENS_PER_GPU \
    actor_rollout_ref.rollout.multi_turn.tool_config_path="$TOOL_CONFIG" \
    "${RUN_OVERRIDES[@]}" \
    trainer.project_name=carl \
    trainer.experiment_name="$EXPERIMENT" \
    trainer.default_local_dir="$CKPT_DIR/$EXPERIMENT" \
    trainer.nnodes=$NNODES \
    trainer.n_gpus_per_node=$GPUS_PER_NODE \
    trainer.total_training_steps=$TOTAL_STEPS \
    "$@"
