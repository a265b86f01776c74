"""Reads CARL's one config block (`algorithm.carl`) and checks the verl settings CARL depends on.

Every CARL knob lives in `algorithm.carl` (verl leaves `algorithm` a plain DictConfig, so an extra sub-block is safe,
whereas an extra key under `actor_rollout_ref.rollout` crashes verl's `RolloutConfig` dataclass). The block holds
`carl_core.CARLConfig`'s fields plus the recipe-only keys in `RECIPE_KEYS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from carl_core import CARLConfig, CARLConfigError
from recipe.carl.packing import PACKING_MODES, check_packing_config
from recipe.carl.pool import PoolSettings
from recipe.carl.search.action_space import ACTION_SPACES

ESTIMATOR = "carl"
TRAINER_MODE = "carl"
AUTO_AGENT = "carl_agent"
CHAIN_AGENT = "carl_chain_agent"


@dataclass(frozen=True)
class RecipeSettings:
    """`algorithm.carl` split into the algorithm's config (`carl`) and the recipe's own keys (the other fields)."""

    carl: CARLConfig
    dump_every: int = 0
    """Write the step's trees as JSON lines every this many steps (0 = never)."""
    max_action_tokens: int = 512
    """Token budget of one agent turn (reasoning + one search or answer); the rest of the trajectory's
    `data.max_response_length` caps it further."""
    invalid_action: str = "end"
    """A malformed turn ends its leaf (`end`, the default: the turn's credit then reflects that it failed, and no
    tokens are spent on a recovery the reward never asked for) or gets Search-R1's feedback observation and the
    episode goes on (`feedback`)."""
    thinking: bool = False
    """Continue a turn whose stop string (`</search>`, `</answer>`) fired inside an unclosed `<think>` block
    (thinking models such as Qwen3 mention tags while reasoning)."""
    max_search_error_rate: float = 0.2
    """Stop the run when more than this share of a training step's searches failed (after the tool's retries);
    1.0 never stops."""
    bad_rows: str = "error"
    """What the start-up data check (`recipe.carl.preflight`) does with rows it cannot train on: `error` stops the run
    naming file and row; `skip` trains on the others from filtered copies (the skipped rows are listed)."""
    packing: str = "path"
    """Training rows: `path` (one row per leaf path with a new trained action) or `tree` (one row per tree, each
    token once, with a tree attention mask: `recipe.carl.packing`)."""
    fork_pool: PoolSettings | None = None
    """The step-level fork pool (`recipe.carl.pool`): null (the paper: every tree gets N forks) or a mapping
    `{floor, prior, group, wait_s}`."""
    action_space: str = "search_r1"
    """What the agent may do: `search_r1` (search, answer: Search-R1's tags) or `paper` (search, access, read,
    answer: the paper's agent; `recipe.carl.search.action_space`, docs/pages.md)."""
    page_chunk_chars: int = 4000
    """`paper`: a page longer than this many characters is shown in parts, read on with `<read>`."""
    tail_forks_in_flight: int = 0
    """The tail (`recipe.carl.in_flight.TailBoost`): once at most `tail_share` of an agent-loop worker's trees are
    still growing, they run up to this many forks at once; 0 = off (`forks_in_flight` throughout). Its start depends
    on timing, so not with `rollout.full_determinism`."""
    tail_share: float = 0.25
    """The share of a worker's trees (rounded up) left growing when the tail boost starts."""

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise CARLConfigError(f"algorithm.carl.{msg}")

        if not isinstance(self.dump_every, int) or isinstance(self.dump_every, bool) or self.dump_every < 0:
            fail(f"dump_every={self.dump_every!r} must be an integer >= 0 (0 = never).")
        if not isinstance(self.max_action_tokens, int) or self.max_action_tokens < 1:
            fail(f"max_action_tokens={self.max_action_tokens!r} must be an integer >= 1 (e.g. 512; 1024+ for Qwen3).")
        if self.invalid_action not in ("end", "feedback"):
            fail(f"invalid_action={self.invalid_action!r} is unknown: use end (the default) or feedback.")
        if not isinstance(self.thinking, bool):
            fail(f"thinking={self.thinking!r} must be true or false.")
        if not isinstance(self.max_search_error_rate, (int, float)) or not 0 <= self.max_search_error_rate <= 1:
            fail(f"max_search_error_rate={self.max_search_error_rate!r} must be in [0, 1] (1.0 never stops).")
        if self.bad_rows not in ("error", "skip"):
            fail(f"bad_rows={self.bad_rows!r} is unknown: use error (stop at bad rows) or skip (train on the rest).")
        if self.packing not in PACKING_MODES:
            fail(f"packing={self.packing!r} is unknown: use path (the default) or tree (tree-packed rows).")
        if self.action_space not in ACTION_SPACES:
            fail(
                f"action_space={self.action_space!r} is unknown: use search_r1 (search, answer; the default) or "
                "paper (search, access, read, answer)."
            )
        tail, k = self.tail_forks_in_flight, self.carl.forks_in_flight
        if not isinstance(tail, int) or isinstance(tail, bool) or (tail != 0 and tail < k):
            fail(f"tail_forks_in_flight={tail!r} must be 0 (off) or an integer >= forks_in_flight={k}.")
        if not isinstance(self.tail_share, (int, float)) or not 0 < self.tail_share < 1:
            fail(f"tail_share={self.tail_share!r} must be in (0, 1): the share of a worker's trees still growing.")
        chunk = self.page_chunk_chars
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            fail(f"page_chunk_chars={chunk!r} must be an integer >= 1 (characters per part of a page, e.g. 4000).")


RECIPE_KEYS = {f.name: f.default for f in fields(RecipeSettings) if f.name != "carl"}
"""Keys of `algorithm.carl` that are not `CARLConfig` fields, with their defaults (see `RecipeSettings`)."""


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
    recipe["fork_pool"] = PoolSettings.from_value(recipe["fork_pool"])
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
    if settings.tail_forks_in_flight and config.actor_rollout_ref.rollout.get("full_determinism", False):
        raise CARLConfigError(
            f"algorithm.carl.tail_forks_in_flight={settings.tail_forks_in_flight} with "
            "actor_rollout_ref.rollout.full_determinism=true: the tail boost starts when other trees end, so fork "
            "choices would depend on timing; set algorithm.carl.tail_forks_in_flight=0 for repeatable runs."
        )
    if settings.fork_pool is not None:
        grpo = config.algorithm.adv_estimator != ESTIMATOR
        settings.fork_pool.check(settings.carl.n_forks, grpo)
        if grpo and config.actor_rollout_ref.rollout.n != 1:
            raise CARLConfigError(
                f"algorithm.carl.fork_pool under GRPO needs actor_rollout_ref.rollout.n=1 (got "
                f"{config.actor_rollout_ref.rollout.n}): the pool grows each question's group itself "
                f"(fork_pool.group={settings.fork_pool.group} trajectories per question on average)."
            )
        if grpo and config.algorithm.adv_estimator != "grpo":
            raise CARLConfigError(
                f"algorithm.carl.fork_pool needs algorithm.adv_estimator=grpo or carl (got "
                f"{config.algorithm.adv_estimator}): the CARL trainer computes the pooled groups' advantages itself, "
                "for GRPO only."
            )
    pooled_grpo = settings.fork_pool is not None and config.algorithm.adv_estimator == "grpo"
    if config.algorithm.adv_estimator != ESTIMATOR and not pooled_grpo:
        return settings
    what = "algorithm.adv_estimator=carl" if not pooled_grpo else "algorithm.carl.fork_pool under GRPO"
    problems = []
    if config.trainer.v1.trainer_mode != TRAINER_MODE:
        problems.append(
            f"trainer.v1.trainer_mode={TRAINER_MODE} (got {config.trainer.v1.trainer_mode}): only the CARL trainer "
            "hands the tree advantages to the `carl` estimator"
        )
    if not config.trainer.get("use_v1", True):
        problems.append("trainer.use_v1=true: the legacy trainer needs exactly one output per sample, a tree has many")
    if config.actor_rollout_ref.rollout.n != 1 and not pooled_grpo:  # pooled GRPO: refused above
        problems.append(
            f"actor_rollout_ref.rollout.n=1 (got {config.actor_rollout_ref.rollout.n}): one tree per prompt already "
            "holds N0 + N rollouts (set algorithm.carl.n0 / n_forks instead)"
        )
    if config.algorithm.get("use_kl_in_reward", False):
        problems.append(
            "algorithm.use_kl_in_reward=false: CARL's advantages (and the pooled groups') come from outcome rewards, "
            "not per-token rewards"
        )
    correction = config.algorithm.get("rollout_correction", None) or {}
    active = correction.get("rollout_is") is not None or correction.get("rollout_rs") is not None
    if active and not correction.get("bypass_mode", False):
        problems.append(
            "algorithm.rollout_correction.rollout_is=null and rollout_rs=null (or bypass_mode=true): the CARL "
            "trainer does not recompute importance weights in the advantage step"
        )
    if not pooled_grpo:
        problems += check_packing_config(config, settings.packing)
    if problems:
        raise CARLConfigError(f"{what} needs: " + "; ".join(problems) + ".")
    return settings
