"""Starts Ray in the driver as verl's `run_ppo` would, with the secrets kept out of everything that is printed.

verl's `run_ppo` calls `ray.init` only when Ray is not started yet, and prints its arguments first
(`print(f"ray init kwargs: {ray_init_kwargs}")`, verl/trainer/main_ppo.py); its TaskRunner then prints the whole
config (`pprint(OmegaConf.to_container(config, resolve=True))`) before any trainer code runs. The secrets the
start-up checks forward to the workers (`WANDB_API_KEY`, `HF_TOKEN`, ...: `preflight.take_secrets`) would be in both
lines if they travelled in `ray_kwargs.ray_init.runtime_env.env_vars`. So `main_carl` calls `start_ray` before
`run_ppo`: the config keeps `***` in their place, the secrets go to `ray.init` alone, and verl's own branch, which
sees Ray started, neither prints nor starts Ray again.

`ray_init_kwargs` is verl's branch step for step (its runtime-env defaults from `get_ppo_ray_runtime_env`, the
determinism and rl_insight variables it sets first, `TRANSFER_QUEUE_ENABLE`), so the workers get what verl's own
`ray.init` would give them; `tests/recipe/test_ray_start.py` compares the two on the same config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf


def _set_verl_environment(config: DictConfig) -> None:
    """What verl's `run_ppo` puts into `os.environ` before its `ray.init`, for `get_ppo_ray_runtime_env` to forward."""
    rollout = config.actor_rollout_ref.rollout
    reward_rollout = config.reward.reward_model.rollout
    if rollout.full_determinism or (config.reward.reward_model.enable and reward_rollout.full_determinism):
        os.environ["VERL_FULL_DETERMINISM"] = "1"
        os.environ["VLLM_BATCH_INVARIANT"] = "1"
        os.environ["PYTHONHASHSEED"] = str(rollout.seed)
    loggers = config.trainer.get("logger", [])
    if "rl_insight" in ([loggers] if isinstance(loggers, str) else loggers or []):
        os.environ["VERL_RL_INSIGHT_ENABLE"] = "1"


def ray_init_kwargs(config: DictConfig) -> DictConfig:
    """The `ray.init` arguments verl's `run_ppo` builds from `config` (secrets as the config holds them: `***`)."""
    # here, not at the top: it imports verl (and torch)
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env

    _set_verl_environment(config)
    default_runtime_env = get_ppo_ray_runtime_env(config)
    kwargs = config.ray_kwargs.get("ray_init", {})
    if config.transfer_queue.enable:
        default_runtime_env.setdefault("env_vars", {})["TRANSFER_QUEUE_ENABLE"] = "1"
    runtime_env = OmegaConf.merge(default_runtime_env, kwargs.get("runtime_env", {}))
    return OmegaConf.create({**kwargs, "runtime_env": runtime_env})


def start_ray(config: DictConfig, secrets: Mapping[str, str]) -> dict[str, Any] | None:
    """Starts Ray for the run with the workers' secrets in the job's environment; prints the arguments without them.

    Args:
        config: the checked trainer config (`ray_kwargs.ray_init`, with `***` where a secret goes).
        secrets: environment variables for every worker that must never be printed (`preflight.take_secrets`).

    Returns:
        The arguments given to `ray.init` (secrets included), or None when Ray was started already: verl keeps
        such a session as it is, and so does this.
    """
    import ray  # here, not at the top: Ray is imported only when a run starts

    if ray.is_initialized():
        if secrets:
            print(f"[carl] Ray was started before main_carl: {', '.join(sorted(secrets))} not forwarded to the workers")
        return None
    shown = ray_init_kwargs(config)
    print(f"ray init kwargs: {shown}", flush=True)  # verl's line, with the secrets as `***`
    kwargs: dict[str, Any] = OmegaConf.to_container(shown)  # type: ignore[assignment]
    kwargs["runtime_env"].setdefault("env_vars", {}).update(secrets)
    ray.init(**kwargs)
    return kwargs
