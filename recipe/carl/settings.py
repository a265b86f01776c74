"""Reads CARL's one config block (`algorithm.carl`) and checks the verl settings CARL depends on.

Every CARL knob lives in `algorithm.carl` (verl leaves `algorithm` a plain DictConfig, so an extra sub-block is safe,
whereas an extra key under `actor_rollout_ref.rollout` crashes verl's `RolloutConfig` dataclass). The block holds
`carl_core.CARLConfig`'s fields plus the recipe-only keys in `RECIPE_KEYS`.
"""

from __future__ import annotations

import os
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

RECIPE_KEYS = {"dump_every": 0}
"""Keys of `algorithm.carl` that are not `CARLConfig` fields, with their defaults.

dump_every: write the step's trees as JSON lines every this many steps (0 = never).
"""


@dataclass(frozen=True)
class RecipeSettings:
    """`algorithm.carl` split into the algorithm's config and the recipe's own keys."""

    carl: CARLConfig
    dump_every: int = 0


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


def _agents_in(path: str, default: str | None) -> set[str]:
    """The agent loops a local parquet's rows name (`default` for a file without an `agent_name` column)."""
    import pyarrow.parquet as pq

    if "agent_name" not in pq.read_schema(path).names:
        return {default} if default else set()
    return {str(a) for a in pq.read_table(path, columns=["agent_name"]).column(0).to_pylist()}


def _local_parquets(files: Any) -> list[str]:
    files = [files] if isinstance(files, str) else list(files or [])
    return [f for f in files if isinstance(f, str) and f.endswith(".parquet") and os.path.isfile(f)]


def check_data_agents(config: DictConfig) -> None:
    """Refuses data rows whose agent loop does not fit the estimator, before any worker starts.

    The agent loop cannot see verl's validate flag, so the check is on the data. Under `adv_estimator=carl`, rows of
    `data.val_files` must not grow trees (`carl_agent`, `carl_tree_agent`): validation scores one trajectory per
    question (checked only when the run validates: `trainer.val_before_train` or `trainer.test_freq > 0`). Under any
    other estimator, no row may name `carl_tree_agent` (each of `rollout.n` sessions would grow a
    whole tree; the loop refuses it, but inside a worker). Rows without an `agent_name` column count as
    `rollout.agent.default_agent_loop`; files that do not exist locally are left to verl's own loader.

    Raises:
        CARLConfigError: naming the file, the agent loop and how to fix the rows.
    """
    default = config.actor_rollout_ref.rollout.agent.get("default_agent_loop")
    carl = config.algorithm.adv_estimator == ESTIMATOR
    validates = bool(config.trainer.get("val_before_train", True)) or (config.trainer.get("test_freq", -1) or -1) > 0
    keys = ("train_files", "val_files") if not carl else ("val_files",) if validates else ()
    for key in keys:
        for path in _local_parquets(config.data.get(key)):
            bad = sorted(_agents_in(path, default) & ({AUTO_AGENT, TREE_AGENT} if carl else {TREE_AGENT}))
            if not bad:
                continue
            if carl:
                raise CARLConfigError(
                    f"data.val_files {path}: rows name agent loop {', '.join(bad)}, which grows a CARL tree under "
                    f"algorithm.adv_estimator=carl, but validation scores one trajectory per question. Set the file's "
                    f"agent_name column to {CHAIN_AGENT} (the preprocessing scripts do so for any --split but train)."
                )
            raise CARLConfigError(
                f"data.{key} {path}: rows name agent loop {TREE_AGENT}, which grows a CARL tree in each of the "
                f"rollout.n sessions, under algorithm.adv_estimator={config.algorithm.adv_estimator}. Name "
                f"{AUTO_AGENT} (a tree under carl, one trajectory otherwise) or {CHAIN_AGENT} in the agent_name column."
            )
