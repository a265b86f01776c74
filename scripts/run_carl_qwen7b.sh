#!/usr/bin/env bash
# CARL (N0=8, N=16) on Qwen2.5-7B-Instruct: 1 node x 8 GPUs, FSDP actor, vLLM async rollout, 100 steps.
# The paper's optimisation for Qwen2.5 (arXiv 2512.04949 v3): batch 128, lr 5e-6, T_max=32, 100 steps; its data,
# reward, action space and metric differ (docs/reproducing.md). Needs a retriever at RETRIEVER_URL.
# Before renting a node for this: scripts/smoke_gpu.sh runs 2 steps of the same path on a tiny model in minutes.
# Several nodes (NNODES > 1, Ray started on each): serve the retriever on an address every node reaches and export
# RETRIEVER_URL=http://<host>:<port>/retrieve; main_carl forwards it to every Ray worker and refuses a loopback URL.
# A head node started without CPUs (ray start --head --num-cpus=0) also needs
# +transfer_queue.backend.SimpleStorage.required_node_resource=<a custom resource of the worker nodes>: TransferQueue
# pins its storage units round-robin to every alive node, the head included.
set -xeuo pipefail

# ---- paths (override through the environment) ----
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-7B-Instruct}
TRAIN_FILE=${TRAIN_FILE:-$HOME/data/carl_search/train.parquet}
VAL_FILE=${VAL_FILE:-$HOME/data/carl_search/val.parquet}
export RETRIEVER_URL=${RETRIEVER_URL:-http://127.0.0.1:8000/retrieve}
# What the agent may do (algorithm.carl.action_space): search_r1 = <search>, <answer>; paper = also <access> id
# </access> and <read> </read>, the paper's agent (docs/pages.md: a retriever started with --pages, data written with
# --action-space paper). PAGE_CHUNK_CHARS: characters per part of a long page.
ACTION_SPACE=${ACTION_SPACE:-search_r1}
PAGE_CHUNK_CHARS=${PAGE_CHUNK_CHARS:-4000}
# verl tool yaml declaring the tool named `search` (recipe/carl/search, issue 4), and `access` for the paper's action
# space; it reads RETRIEVER_URL.
TOOL_CONFIG=${TOOL_CONFIG:-recipe/carl/search/$([[ $ACTION_SPACE == paper ]] && echo pages_tool || echo search_tool).yaml}
CKPT_DIR=${CKPT_DIR:-$HOME/checkpoints/carl}

# ---- cluster ----
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
SP_SIZE=${SP_SIZE:-1}  # Ulysses sequence parallelism of the actor (data-parallel ranks = GPUs / SP_SIZE)

# ---- CARL (algorithm.carl) ----
N0=${N0:-8}
N_FORKS=${N_FORKS:-16}
MAX_ACTIONS=${MAX_ACTIONS:-32}
if [ -n "${WAVE_SIZE:-}" ]; then
  echo "run_carl_qwen7b.sh: WAVE_SIZE was replaced by FORKS_IN_FLIGHT (K forks of a tree at once; the next starts as soon as the oldest ends): set FORKS_IN_FLIGHT=$WAVE_SIZE" >&2
  exit 2
fi
# K: forks of a tree generated at once (1 = Alg. 1 exactly). The default is the rollout-time model's choice for this
# shape (docs/measurements.md, "Rollout time": 1.89x GRPO's predicted rollout on 8 H100s against 2.14x at K = 1; a
# larger K is faster still but moves forks toward the root and generates over 5 % more actions than Alg. 1).
FORKS_IN_FLIGHT=${FORKS_IN_FLIGHT:-2}
# The tail: once at most TAIL_SHARE of an agent-loop worker's trees are still growing, they run up to
# TAIL_FORKS_IN_FLIGHT forks at once (0 = off; refused with rollout.full_determinism=true).
TAIL_FORKS_IN_FLIGHT=${TAIL_FORKS_IN_FLIGHT:-8}
TAIL_SHARE=${TAIL_SHARE:-0.25}

# ---- optimisation ----
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-128}  # prompts (= trees) per step
LR=${LR:-5e-6}
TOTAL_STEPS=${TOTAL_STEPS:-100}
# Questions per optimizer update (ppo_mini_batch_size: questions in both PACKING layouts, as GRPO's prompts), the
# variable the GRPO script reads too: 128 / 16 = 8 updates a step in both. The CARL trainer splits a step's rows (up to N0 + N = 24 per
# tree with PACKING=path, about one per tree with PACKING=tree) into those 8 updates with the same number of rows
# each (+-1), padded to a multiple of the data-parallel ranks (recipe/carl/schedule.py); it must divide
# TRAIN_BATCH_SIZE (checked below, before Ray starts).
if [[ -n ${PPO_MINI_BATCH_ROWS:-} ]]; then
    echo "error: PPO_MINI_BATCH_ROWS is gone: ppo_mini_batch_size counts questions per update (in both PACKING" \
        "layouts); set PPO_MINI_BATCH_QUESTIONS instead (default 16: TRAIN_BATCH_SIZE / 16 updates a step)" >&2
    exit 2
fi
PPO_MINI_BATCH_QUESTIONS=${PPO_MINI_BATCH_QUESTIONS:-16}
# Training rows (algorithm.carl.packing): path = one row per leaf path (verl's flash attention); tree = one row per
# tree with a tree attention mask (flex_attention; recipe/carl/packing, docs/packing.md).
PACKING=${PACKING:-path}

# ---- token budgets ----
# One agent turn (reasoning + one <search> or <answer>): algorithm.carl.max_action_tokens; a turn that runs out
# ends its leaf as `action_too_long`.
MAX_ACTION_TOKENS=${MAX_ACTION_TOKENS:-512}
# Thinking models (Qwen3): a </search> or </answer> inside an unclosed <think> block does not end the turn.
THINKING=${THINKING:-false}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-2048}
# Whole trajectory after the prompt: every action AND every observation; a leaf that runs out ends as
# `context_overflow`.
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-12288}
# What binds first: context, not T_max. A turn costs its action (Qwen2.5: ~100-300 tokens, at most
# MAX_ACTION_TOKENS) plus an observation (3 passages, ~450 tokens, at most max_obs_chars=4000 characters ~ 1,000
# tokens): ~550-1,500 tokens, so 12,288 tokens hold ~8-22 turns and a trajectory overflows long before T_max=32.
# The paper's Qwen3-4B trajectories average 6-7 actions (Table 2: GRPO generated 115 actions per question at
# T_max=32, over a group of probably 16), so the budget trims the longest ones only. MAX_RESPONSE_LENGTH=24576 would let T_max=32 bind at ~750 tokens per turn
# (not run on GPUs: rows twice as long).
source "$(dirname "$0")/check_batch.sh"
print_turn_budget
# Tokens per GPU in one forward pass with dynamic batch size (>= one full sequence).
MAX_TOKENS_PER_GPU=${MAX_TOKENS_PER_GPU:-$(( (MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH) * 2 ))}
if (( MAX_TOKENS_PER_GPU < MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH )); then
    echo "error: MAX_TOKENS_PER_GPU=$MAX_TOKENS_PER_GPU must hold one whole row:" \
        "MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH = $(( MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH ))" >&2
    exit 2
fi
EXPERIMENT=${EXPERIMENT:-carl_n0${N0}_qwen2.5_7b}

# ---- seed, validation, checkpoints, logging (SEED, TEST_FREQ, VAL_BEFORE_TRAIN, SAVE_FREQ, MAX_CKPT_TO_KEEP, LOGGER:
# scripts/run_settings.sh, shared with the GRPO script) ----
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
    algorithm.carl.n0=$N0 \
    algorithm.carl.n_forks=$N_FORKS \
    algorithm.carl.max_actions=$MAX_ACTIONS \
    algorithm.carl.forks_in_flight=$FORKS_IN_FLIGHT \
    algorithm.carl.tail_forks_in_flight=$TAIL_FORKS_IN_FLIGHT \
    algorithm.carl.tail_share=$TAIL_SHARE \
    algorithm.carl.max_action_tokens=$MAX_ACTION_TOKENS \
    algorithm.carl.thinking=$THINKING \
    algorithm.carl.action_space=$ACTION_SPACE \
    algorithm.carl.page_chunk_chars=$PAGE_CHUNK_CHARS \
    "${PACKING_OVERRIDES[@]}" \
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
