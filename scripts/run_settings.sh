#!/usr/bin/env bash
# Sourced by the GPU run scripts once CKPT_DIR and EXPERIMENT are set: the run settings CARL and its GRPO baseline
# share, defined once so that both arms of a comparison run alike. `run_settings` sets RUN_OVERRIDES (Hydra
# overrides) from these variables:
#
#   SEED              one seed for the data order (data.seed; verl's default, null, draws a new order every run), the
#                     rollout's sampling (actor_rollout_ref.rollout.seed), the actor's mini-batch shuffle
#                     (actor_rollout_ref.actor.data_loader_seed) and CARL's planner (algorithm.carl.seed); default 0.
#                     RL seeds of a study: SEED=0, 1, 2, ... with the same SEED in both arms (docs/evaluation.md).
#   TEST_FREQ         validate every this many steps, and after the last (trainer.test_freq); default 10, -1 = never.
#   VAL_BEFORE_TRAIN  validate before step 1 (trainer.val_before_train): auto (default) = true for a fresh run, false
#                     when the run resumes, i.e. $CKPT_DIR/$EXPERIMENT holds a checkpoint that verl's
#                     trainer.resume_mode=auto loads (that policy was validated when it was trained); true / false.
#   SAVE_FREQ         save a checkpoint every this many steps, and after the last (trainer.save_freq); default 10.
#   MAX_CKPT_TO_KEEP  checkpoints kept, older ones deleted (trainer.max_actor_ckpt_to_keep); default 2. A 7B
#                     checkpoint holds fp32 weights and Adam's two moments, 12 bytes a parameter: ~90 GB.
#   LOGGER            trainer.logger, comma-separated: console, file (the resumable metrics file,
#                     $CKPT_DIR/$EXPERIMENT/metrics.jsonl), wandb (WANDB_API_KEY or `wandb login`; WANDB_MODE=offline
#                     without network); default console,file,wandb.

# run_settings: sets RUN_OVERRIDES; exits 2 naming a bad value.
run_settings() {
    set +x  # the run script traces its commands; these checks would only add noise
    local seed=${SEED:-0} test_freq=${TEST_FREQ:-10} val=${VAL_BEFORE_TRAIN:-auto} save_freq=${SAVE_FREQ:-10}
    local keep=${MAX_CKPT_TO_KEEP:-2} logger=${LOGGER:-console,file,wandb} name
    for name in SEED TEST_FREQ SAVE_FREQ MAX_CKPT_TO_KEEP; do
        if ! [[ ${!name:-0} =~ ^-?[0-9]+$ ]]; then
            echo "error: $name=${!name} must be an integer" >&2
            exit 2
        fi
    done
    if (( keep < 1 )); then
        echo "error: MAX_CKPT_TO_KEEP=$keep must be >= 1 (the checkpoint a resumed run starts from)" >&2
        exit 2
    fi
    case $val in
        auto)
            val=true
            if [[ -f $CKPT_DIR/$EXPERIMENT/latest_checkpointed_iteration.txt ]]; then
                val=false
                echo "resuming from $CKPT_DIR/$EXPERIMENT (step $(< "$CKPT_DIR/$EXPERIMENT/latest_checkpointed_iteration.txt"))," \
                    "without the validation before training (VAL_BEFORE_TRAIN=true to run it)"
            fi
            ;;
        true | false) ;;
        *) echo "error: VAL_BEFORE_TRAIN=$val: use auto (true unless the run resumes), true or false" >&2; exit 2 ;;
    esac
    if ! [[ $logger =~ ^[a-z_]+(,[a-z_]+)*$ ]]; then
        echo "error: LOGGER=$logger: give trainer.logger's backends comma-separated, e.g. console,file,wandb" >&2
        exit 2
    fi
    RUN_OVERRIDES=(
        data.seed="$seed"
        actor_rollout_ref.rollout.seed="$seed"
        actor_rollout_ref.actor.data_loader_seed="$seed"
        algorithm.carl.seed="$seed"
        trainer.test_freq="$test_freq"
        trainer.val_before_train="$val"
        trainer.save_freq="$save_freq"
        trainer.max_actor_ckpt_to_keep="$keep"
        trainer.max_critic_ckpt_to_keep="$keep"
        trainer.logger="[$logger]"
    )
    set -x
}
