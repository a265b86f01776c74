"""The agent settings of a training run, saved beside its checkpoints so that evaluation rolls out as training did.

verl 0.9.1 saves no run config with a checkpoint (`global_step_N/` holds `actor/` with the FSDP shards,
`fsdp_config.json` and `huggingface/` (model config and tokenizer), and `data.pt`, the dataloader state; Hydra's
`.hydra/config.yaml` lands in the launch directory's `outputs/`, far from the checkpoint). So the CARL trainer
(`recipe.carl.trainer`, CARL and its baselines alike) writes `carl_run_config.json` into every `global_step_N/` it saves
and, as the latest, into `trainer.default_local_dir`; `python -m recipe.carl.evaluate` given a checkpoint reads it
(`find_run_record`) and takes T_max, the turn and trajectory budgets, thinking, the invalid-action rule, the action
space and its page part size, the search tool's top-k and snippet length and the chat-template arguments from it,
unless a flag says otherwise.

    {"format": 1, "experiment": ..., "model": ..., "adv_estimator": ..., "global_step": 100,
     "agent": {"max_actions": 10, "max_action_tokens": 2048, "thinking": true, ...}, "sources": {...}}
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from recipe.carl.io import write_json
from recipe.carl.settings import read_settings

RUN_RECORD = "carl_run_config.json"
FORMAT = 1
TOOL_KEY = "actor_rollout_ref.rollout.multi_turn.tool_config_path"
#: Each recorded agent setting and the training config key it comes from.
SOURCES = {
    "max_actions": "algorithm.carl.max_actions",
    "max_action_tokens": "algorithm.carl.max_action_tokens",
    "thinking": "algorithm.carl.thinking",
    "invalid_action": "algorithm.carl.invalid_action",
    "action_space": "algorithm.carl.action_space",
    "page_chunk_chars": "algorithm.carl.page_chunk_chars",
    "prompt_length": "actor_rollout_ref.rollout.prompt_length",
    "response_length": "actor_rollout_ref.rollout.response_length",
    "chat_template_kwargs": "data.apply_chat_template_kwargs",
    "topk": f"{TOOL_KEY}: the search tool's config.topk",
    "snippet_words": f"{TOOL_KEY}: the search tool's config.snippet_words",
}
#: The type each recorded value must have (a record is read back by another program, maybe another version).
TYPES: dict[str, type | tuple[type, ...]] = {
    "max_actions": int,
    "max_action_tokens": int,
    "thinking": bool,
    "invalid_action": str,
    "action_space": str,
    "page_chunk_chars": int,
    "prompt_length": int,
    "response_length": int,
    "chat_template_kwargs": dict,
    "topk": int,
    "snippet_words": int,
}


def search_tool_setting(tool_config_path: str | None, key: str) -> int | None:
    """`key` of the tool yaml's search tool (the first tool with a retriever URL or a `topk`); None if not set."""
    if not tool_config_path or not os.path.exists(tool_config_path):
        return None
    for tool in OmegaConf.load(tool_config_path).get("tools") or []:
        config = tool.get("config") or {}
        if "topk" in config or "retrieval_service_url" in config:
            value = config.get(key)
            return int(value) if value is not None else None
    return None


def search_topk(tool_config_path: str | None) -> int | None:
    """`topk` of the tool yaml's search tool; None if not set."""
    return search_tool_setting(tool_config_path, "topk")


def run_record(config: Any, global_step: int | None = None) -> dict[str, Any]:
    """What evaluation needs to roll out as this run does, from the trainer's (resolved) config."""
    settings = read_settings(config)
    kwargs = OmegaConf.select(config, "data.apply_chat_template_kwargs", default=None)
    agent = {
        "max_actions": settings.carl.max_actions,
        "max_action_tokens": settings.max_action_tokens,
        "thinking": settings.thinking,
        "invalid_action": settings.invalid_action,
        "action_space": settings.action_space,
        "page_chunk_chars": settings.page_chunk_chars,
        "prompt_length": int(config.actor_rollout_ref.rollout.prompt_length),
        "response_length": int(config.actor_rollout_ref.rollout.response_length),
        "chat_template_kwargs": OmegaConf.to_container(kwargs, resolve=True) if kwargs is not None else {},
    }
    tool_path = OmegaConf.select(config, TOOL_KEY, default=None)
    for key in ("topk", "snippet_words"):
        value = search_tool_setting(tool_path, key)
        if value is not None:
            agent[key] = value
    return {
        "format": FORMAT,
        "experiment": OmegaConf.select(config, "trainer.experiment_name", default=None),
        "model": OmegaConf.select(config, "actor_rollout_ref.model.path", default=None),
        "adv_estimator": OmegaConf.select(config, "algorithm.adv_estimator", default=None),
        "global_step": global_step,
        "tool_config_path": tool_path,
        "agent": agent,
        "sources": {key: SOURCES[key] for key in agent},
    }


def write_run_record(record: dict[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Writes `record` to `folder/carl_run_config.json` whole (a reader never sees half of it)."""
    return write_json(Path(folder) / RUN_RECORD, record)


def checkpoint_step_dir(path: str | os.PathLike[str]) -> Path | None:
    """The `global_step_N` folder of a verl checkpoint path (`global_step_N`, `.../actor`, `.../actor/huggingface`,
    `.../actor/merged_hf`), or None for anything else (a plain model folder, a hub id)."""
    p = Path(path).absolute()
    if p.name in ("huggingface", "merged_hf") and p.parent.name == "actor":
        p = p.parent
    if p.name == "actor":
        p = p.parent
    return p if re.fullmatch(r"global_step_\d+", p.name) and p.is_dir() else None


def find_run_record(path: str | os.PathLike[str]) -> Path | None:
    """The run record of the checkpoint at `path`: its `global_step_N/carl_run_config.json`, else the one of its
    run folder (`trainer.default_local_dir`); None when `path` is no checkpoint or neither exists."""
    step = checkpoint_step_dir(path)
    if step is None:
        return None
    return next((f for f in (step / RUN_RECORD, step.parent / RUN_RECORD) if f.is_file()), None)


def read_run_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recorded agent settings of a run record (`record["agent"]`), checked.

    Raises:
        ValueError: an unreadable record, or a value of the wrong type, naming the file and the fix.
    """
    fix = f"fix or delete {path} (then give the training run's settings as flags)"
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"run record {path}: unreadable ({type(error).__name__}: {error}); {fix}.") from None
    agent = record.get("agent") if isinstance(record, dict) else None
    if not isinstance(agent, dict):
        raise ValueError(f"run record {path}: no `agent` object; {fix}.")
    for key, value in agent.items():
        wanted = TYPES.get(key)
        if wanted is None:
            continue  # written by a newer recipe: a setting this version does not know
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise ValueError(
                f"run record {path}: agent.{key}={value!r} is not a {getattr(wanted, '__name__', wanted)}; {fix}."
            )
    return {key: value for key, value in agent.items() if key in TYPES}
