"""Tree-packed training rows (`algorithm.carl.packing: tree`): each token of a tree is processed once per pass.

- `recipe.carl.packing.layout`: the layout (`pack_tree`) and its structure (`compute_tree_layout`), framework-free;
- `recipe.carl.packing.attention`: tree masks, path position ids and predecessor logits for a transformers model;
- `recipe.carl.packing.engine`: verl's FSDP engine with the above, registered through `EngineRegistry` (the recipe
  plugin imports it when a process imports `verl.workers.engine`).

A packed row travels like any other row; its structure is one compact field, `extra_fields["carl_tree_runs"]`
(`[[length, parent run], ...]`, a few hundred integers per tree), which the engine turns into the mask.

This module imports neither torch nor verl: the agent loop and the config check use only its names.
"""

from __future__ import annotations

from typing import Any

RUNS_KEY = "carl_tree_runs"
"""`extra_fields` key of a packed row's runs."""
PACKING_MODES = ("path", "tree")
"""`algorithm.carl.packing`: one row per leaf path (verl's usual rows) or tree-packed rows."""
PACKED_LOSS_AGG_MODES = ("token-mean", "token-sum")
"""Loss aggregations that do not depend on how tokens are grouped into rows (so packing leaves the loss alone)."""
TREE_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations that take a tree mask (see `recipe.carl.packing.attention`)."""
DENSE_MASK_ATTENTION = ("sdpa", "eager")
"""Those of them that take the mask as a dense T x T tensor: CPU only (at 28k tokens 0.8 GB as bool, 1.6 GB as the bf16
bias sdpa makes of it, and every masked pair computed); on a GPU, flex attention skips masked blocks."""
ATTENTION_SETTING = "actor_rollout_ref.model.override_config.attn_implementation"
"""The verl setting that chooses the attention implementation (named in errors)."""


def tree_attention_problem(attn: str, device: str, attn_is_set: bool | None = None) -> str | None:
    """The override that lets tree-packed rows run on `device` ("cpu", "cuda", ...) with attention `attn`, and why;
    None when they can already.

    Args:
        attn: the model's attention implementation.
        device: where the model runs (`trainer.device`, or the input tensors' device type).
        attn_is_set: whether the config has the key already; Hydra then takes `key=value`, and a key not there yet
            needs `+key=value` (`override_config` is a struct node). None (unknown) names both forms.
    """
    if attn in TREE_ATTENTION and (device == "cpu" or attn not in DENSE_MASK_ATTENTION):
        return None
    override = f"{ATTENTION_SETTING}=flex_attention"
    form = {True: override, False: f"+{override}", None: f"+{override} (no + where the key is already set)"}
    if attn in DENSE_MASK_ATTENTION:
        why = (
            f"on {device} it builds a dense T x T mask over the packed micro-batch, about 0.8 GB at 28k tokens and "
            "1.6 GB as sdpa's bf16 bias, and computes every masked pair, where flex attention skips the other "
            "branches' blocks; sdpa and eager are for CPU runs"
        )
    else:
        why = "it cannot take a tree mask: flash-attn's varlen kernels express only contiguous causal segments"
    return f"{form[attn_is_set]} (got {attn!r}: {why}; or set algorithm.carl.packing=path)"


def packing_budget(config: Any, prompt_length: int) -> int:
    """Response tokens one packed row may hold: a whole row must fit one micro-batch.

    With dynamic batch sizes (`use_dynamic_bsz`) that is the smallest per-GPU token budget of the passes that run
    the row (actor update, old log-probs, reference) minus the prompt; without, `data.max_response_length` (a
    micro-batch then counts rows, and a row longer than verl's usual rows would cost more memory than configured).

    Args:
        config: the trainer config.
        prompt_length: tokens of the tree's prompt.
    """
    arr = config.actor_rollout_ref
    if not arr.actor.get("use_dynamic_bsz", False):
        return int(config.data.max_response_length)
    limits = [
        arr.actor.get("ppo_max_token_len_per_gpu"),
        arr.rollout.get("log_prob_max_token_len_per_gpu"),
        arr.ref.get("log_prob_max_token_len_per_gpu"),
    ]
    return min(int(n) for n in limits if n) - prompt_length


def check_packing_config(config: Any, packing: str) -> list[str]:
    """The verl settings that tree-packed rows cannot run with, as fixes (empty when all is well).

    Args:
        config: the trainer config (`actor_rollout_ref` is read).
        packing: `algorithm.carl.packing`.

    Returns:
        One `key=value (why)` string per problem.
    """
    if packing != "tree":
        return []
    arr = config.actor_rollout_ref
    problems = []
    agg = arr.actor.get("loss_agg_mode", "token-mean")
    if agg not in PACKED_LOSS_AGG_MODES:
        problems.append(
            f"actor_rollout_ref.actor.loss_agg_mode in {PACKED_LOSS_AGG_MODES} (got {agg!r}: a per-sequence mean "
            "weighs tokens by the row they are in, and packed rows group tokens differently from per-path rows)"
        )
    override_config = arr.model.get("override_config") or {}
    attn = override_config.get("attn_implementation", "flash_attention_2")
    device = str(config.get("trainer", {}).get("device", "cuda"))
    problem = tree_attention_problem(attn, device, attn_is_set="attn_implementation" in override_config)
    if problem:
        problems.append(problem)
    if arr.actor.get("ulysses_sequence_parallel_size", 1) != 1:
        problems.append("actor_rollout_ref.actor.ulysses_sequence_parallel_size=1 (a path's tokens would span ranks)")
    if arr.model.get("use_fused_kernels", False):
        problems.append("actor_rollout_ref.model.use_fused_kernels=False (fused kernels bypass the LM head)")
    longest_path = int(config.data.max_prompt_length) + int(config.data.max_response_length)
    budget = packing_budget(config, 0)
    if arr.actor.get("use_dynamic_bsz", False) and budget < longest_path:
        problems.append(
            f"every per-GPU token budget (ppo_max_token_len_per_gpu, log_prob_max_token_len_per_gpu) >= "
            f"data.max_prompt_length + data.max_response_length = {longest_path} (got {budget}: a packed row holds "
            "at least one whole path)"
        )
    return problems
