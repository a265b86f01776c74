"""Entry point: `python -m recipe.carl.main_carl [hydra overrides]` (config: `recipe/carl/config/carl_trainer.yaml`).

Validates `algorithm.carl` once, checks that verl resolves every `carl` name in this process (the `verl.plugins`
entry point fails silently otherwise), runs the start-up checks of `recipe.carl.preflight` (paths, batch, data,
worker environment, retriever), starts Ray with the workers' secrets kept out of what verl prints
(`recipe.carl.ray_start`), then hands over to verl's own `run_ppo` with its V1 TaskRunner: the trainer
(`trainer.v1.trainer_mode=carl`), estimator and agent loops are found through verl's registries in every Ray process,
because each of them imports verl and so the plugin.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import recipe.carl.plugin as plugin
from recipe.carl import preflight
from recipe.carl.cpu.vllm_cpu import check_rollout_config
from recipe.carl.ray_start import start_ray
from recipe.carl.settings import check_trainer_config


def run_carl(config: DictConfig) -> None:
    """Checks the CARL config and runs verl's trainer with it."""
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    plugin.check_registered()
    check_trainer_config(config)
    check_rollout_config(config)  # CARL_DEVICE=cpu with rollout.name=vllm: vLLM's CPU build and +device=cpu_vllm
    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    secrets = preflight.run(config)
    start_ray(config, secrets)  # before run_ppo: verl would print the secrets with its own ray.init's arguments
    run_ppo(config, task_runner_class=TaskRunnerV1)


@hydra.main(config_path="config", config_name="carl_trainer", version_base=None)
def main(config: DictConfig) -> None:
    run_carl(config)


if __name__ == "__main__":
    main()
