"""Entry point: `python -m recipe.carl.main_carl [hydra overrides]` (config: `recipe/carl/config/carl_trainer.yaml`).

Validates `algorithm.carl` once, checks that verl resolves every `carl` name in this process (the `verl.plugins`
entry point fails silently otherwise), then hands over to verl's own `run_ppo` with its V1 TaskRunner: the trainer
(`trainer.v1.trainer_mode=carl`), estimator and agent loops are found through verl's registries in every Ray process,
because each of them imports verl and so the plugin.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, open_dict

import recipe.carl.plugin as plugin
from recipe.carl.settings import check_data_agents, check_trainer_config

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _absolute_agent_loop_config(config: DictConfig) -> None:
    """Makes a project-relative agent-loop yaml path absolute, so workers started elsewhere still find it."""
    path = config.actor_rollout_ref.rollout.agent.agent_loop_config_path
    if path and not os.path.isabs(path) and not os.path.exists(path):
        candidate = os.path.join(PROJECT_ROOT, path)
        if os.path.exists(candidate):
            with open_dict(config):
                config.actor_rollout_ref.rollout.agent.agent_loop_config_path = candidate


def run_carl(config: DictConfig) -> None:
    """Checks the CARL config and runs verl's trainer with it."""
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    from recipe.carl.cpu.vllm_cpu import check_rollout_config

    plugin.check_registered()
    check_trainer_config(config)
    check_rollout_config(config)  # CARL_DEVICE=cpu with rollout.name=vllm: vLLM's CPU build and +device=cpu_vllm
    check_data_agents(config)
    _absolute_agent_loop_config(config)
    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    run_ppo(config, task_runner_class=TaskRunnerV1)


@hydra.main(config_path="config", config_name="carl_trainer", version_base=None)
def main(config: DictConfig) -> None:
    run_carl(config)


if __name__ == "__main__":
    main()
