"""Reads CARL's one config block (`algorithm.carl`) and checks the verl settings CARL depends on.

Every CARL knob lives in `algorithm.carl` (verl leaves `algorithm` a plain DictConfig, so an extra sub-block is safe,
whereas an extra key under `actor_rollout_ref.rollout` crashes verl's `RolloutConfig` dataclass). The block holds
`carl_core.CARLConfig`'s fields plus the recipe-only keys in `RECIPE_KEYS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from carl_core import CARLConfig, CARLConfigError

ESTIMATOR = "carl"
TRAINER_MODE = "carl"
TREE_AGENT = "carl_tree_agent"
AUTO_AGENT = "carl_agent"
CHAIN_AGENT = "carl_chain_agent"

RECIPE_KEYS = {"dump_every": 0, "max_action_tokens": None, "bad_rows": "error"}
"""Keys of `algorithm.carl` that are not `CARLConfig` fields, with their defaults.

dump_every: write the step's trees as JSON lines every this many steps (0 = never).
max_action_tokens: token budget of one agent turn (reasoning + one <search> or <answer>) for every CARL agent loop;
    null keeps each agent-loop yaml entry's own `max_action_tokens`. The run scripts set it (MAX_ACTION_TOKENS).
bad_rows: what the start-up data check (`recipe.carl.preflight`) does with rows it cannot train on: "error" stops the
    run naming file and row; "skip" trains on the rest from filtered copies (the skipped rows are listed).
"""

BAD_ROWS_MODES = ("error", "skip")


@dataclass(frozen=True)
class RecipeSettings:
    """`algorithm.carl` split into the algorithm's config and the recipe's own keys."""

    carl: CARLConfig
    dump_every: int = 0
    max_action_tokens: int | None = None
    bad_rows: str = "error"


def _as_dict(block: Any) -> dict[str, Any]:
    if block is None:
        return {}
    if isinstance(block, DictConfig):
        return dict(OmegaConf.to_container(block, resolve=True))  # type: ignore[arg-type]
    if isinstance(block, Mapping):
        return dict(block)
    raise CARLConfigError(f"algorithm.carl must be a mapping of CARL settings, got {type(block).__name__}.")


def read_settings(config: Any) -> RecipeSettings:
    """Builds the settings from a full trainer config (or from the `algorithm.carl` block itself).

    Raises:
        CARLConfigError: naming the bad key and how to fix it.
    """
    block = config.get("algorithm", {}).get("carl") if _is_trainer_config(config) else config
    values = _as_dict(block)
    recipe = {key: values.pop(key, default) for key, default in RECIPE_KEYS.items()}
    if not isinstance(recipe["dump_every"], int) or recipe["dump_every"] < 0:
        value = recipe["dump_every"]
        raise CARLConfigError(f"algorithm.carl.dump_every={value!r} must be an integer >= 0 (0 = never).")
    tokens = recipe["max_action_tokens"]
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1):
        raise CARLConfigError(
            f"algorithm.carl.max_action_tokens={tokens!r} must be an integer >= 1 (tokens per agent turn), or null to "
            "keep the agent-loop yaml's value."
        )
    if recipe["bad_rows"] not in BAD_ROWS_MODES:
        raise CARLConfigError(
            f"algorithm.carl.bad_rows={recipe['bad_rows']!r} is unknown: use error (stop at bad data rows) or skip "
            "(train on the rest)."
        )
    return RecipeSettings(carl=CARLConfig.from_dict(values), **recipe)


def _is_trainer_config(config: Any) -> bool:
    return isinstance(config, (DictConfig, Mapping)) and "algorithm" in config


def check_trainer_config(config: DictConfig) -> RecipeSettings:
    """Validates `algorithm.carl` once and the verl settings an `adv_estimator=carl` run needs.

    Returns:
        The parsed settings (also for GRPO runs: T_max comes from `algorithm.carl.max_actions` there too).

    Raises:
        CARLConfigError: with the override that fixes the problem.
    """
    settings = read_settings(config)
    if config.algorithm.adv_estimator != ESTIMATOR:
        return settings
    problems = []
    if config.trainer.v1.trainer_mode != TRAINER_MODE:
        problems.append(
            f"trainer.v1.trainer_mode={TRAINER_MODE} (got {config.trainer.v1.trainer_mode}): only the CARL trainer "
            "hands the tree advantages to the `carl` estimator"
        )
    if not config.trainer.get("use_v1", True):
        problems.append("trainer.use_v1=true: the legacy trainer needs exactly one output per sample, a tree has many")
    if config.actor_rollout_ref.rollout.n != 1:
        problems.append(
            f"actor_rollout_ref.rollout.n=1 (got {config.actor_rollout_ref.rollout.n}): one tree per prompt already "
            "holds N0 + N rollouts (set algorithm.carl.n0 / n_forks instead)"
        )
    if config.algorithm.get("use_kl_in_reward", False):
        problems.append("algorithm.use_kl_in_reward=false: CARL's advantages are V(v) - V(u), not per-token rewards")
    correction = config.algorithm.get("rollout_correction", None) or {}
    active = correction.get("rollout_is") is not None or correction.get("rollout_rs") is not None
    if active and not correction.get("bypass_mode", False):
        problems.append(
            "algorithm.rollout_correction.rollout_is=null and rollout_rs=null (or bypass_mode=true): the CARL "
            "trainer does not recompute importance weights in the advantage step"
        )
    if problems:
        raise CARLConfigError("algorithm.adv_estimator=carl needs: " + "; ".join(problems) + ".")
    return settings
