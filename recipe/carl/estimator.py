"""`algorithm.adv_estimator=carl`: node values, edge advantages and the update set (Alg. 2, Eqs. 9-13) of a batch.

As verl's `compute_grpo_outcome_advantage` computes GRPO's math from the batch's rewards and groups, this estimator
computes CARL's from the batch's trees: every tree travels as a compact description (`carl_core.describe_tree`: per
node parent, leaf reward, action entropy) on its first row, and every row records which node each of its tokens
belongs to. `carl_batch_from_rows` gathers both from the rows' `extra_fields`; the estimator then scores all trees
at once and puts each trained action's advantage on its tokens.

verl calls custom estimators with `token_level_rewards, response_mask, config, index` only, so the CARL trainer
(`recipe.carl.trainer`) builds the `CarlBatch` and passes it as `carl_batch=`. Padding rows (verl's, which the CARL
trainer adds in `_balance_batch`: uid "pad...", response_mask all 0, `extra_fields` copied from another row without
its tree description, `recipe.carl.schedule.pad_batch`) belong to no tree and get advantage 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est

from carl_core import (
    ScoredTrees,
    TreeArrays,
    compute_token_advantages,
    expand_token_nodes,
    pack_descriptions,
    score_trees,
)
from recipe.carl.settings import ESTIMATOR, read_settings

PAD_UID_PREFIX = "pad"
"""verl's `padding_utils.upsample_batch_to_divisible_size` names its synthetic rows `pad<hex>`."""


def is_tree_row(uid: str, extra: Any) -> bool:
    """A row of a CARL agent loop; False for verl's padding rows (which copy another row's `extra_fields`)."""
    return not str(uid).startswith(PAD_UID_PREFIX) and isinstance(extra, dict) and "carl_token_nodes" in extra


@dataclass
class CarlBatch:
    """The trees of a batch of rows, as the estimator and the telemetry need them."""

    arrays: TreeArrays
    """Node-level tensors of every tree of the batch."""
    descriptions: list[dict[str, Any]]
    """Each tree's `describe_tree` dict (plus the agent loop's `reward_info`, `search`, `question`, `text`)."""
    questions: list[str]
    """The question (verl `uid`) of each tree."""
    token_node: torch.Tensor
    """Global node id of each response token, -1 on observations and padding [shape: (bs, response_length)]."""
    row_leaf: list[int]
    """Global id of the leaf each row follows, -1 for rows outside any tree [len: bs]."""
    row_length: list[int]
    """Response tokens of each row (0 for rows outside any tree) [len: bs]."""
    scored: ScoredTrees | None = field(default=None)
    """Alg. 2 + Eq. 13 on `arrays`, filled by `compute_carl_advantage` (the telemetry and dumps reuse it)."""


def carl_batch_from_rows(extra_fields: Sequence[Any], uids: Sequence[str], width: int) -> CarlBatch:
    """Collects the batch's tree descriptions and per-token node ids from the rows' `extra_fields`.

    Args:
        extra_fields: each row's `extra_fields` dict, in batch order [len: bs].
        uids: each row's verl uid (the question) [len: bs].
        width: the batch's response length.

    Raises:
        ValueError: when a row's tree never arrived (its first row is missing from the batch).
    """
    descriptions: list[dict[str, Any]] = []
    questions: list[str] = []
    tree_of: dict[str, int] = {}
    for uid, extra in zip(uids, extra_fields, strict=True):
        if is_tree_row(uid, extra) and extra.get("carl_tree") is not None:
            tree_of[extra["carl_tree"]["uid"]] = len(descriptions)
            descriptions.append(extra["carl_tree"])
            questions.append(str(uid))
    arrays = pack_descriptions(descriptions)
    runs, offsets, row_leaf = [], [], []
    for i, (uid, extra) in enumerate(zip(uids, extra_fields, strict=True)):
        if not is_tree_row(uid, extra):
            runs.append([]), offsets.append(0), row_leaf.append(-1)
            continue
        if extra["carl_tree_id"] not in tree_of:
            raise ValueError(
                f"row {i} (uid {uid}) belongs to tree {extra['carl_tree_id']!r}, whose description (on the tree's "
                "first row) is not in the batch: a run's rows must be trained in the same step."
            )
        base = arrays.offsets[tree_of[extra["carl_tree_id"]]]
        runs.append(extra["carl_token_nodes"]), offsets.append(base), row_leaf.append(base + int(extra["carl_leaf"]))
    token_node = expand_token_nodes(runs, offsets, width)
    row_length = [sum(count for _, count in row) for row in runs]
    return CarlBatch(arrays, descriptions, questions, token_node, row_leaf, row_length)


@register_adv_est(ESTIMATOR)
def compute_carl_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    index: Any = None,
    carl_batch: CarlBatch | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CARL's advantages for a batch of rows: A(e) = V(v) - V(u) on every token of each trained action.

    Math (Alg. 2, Eqs. 9-11, 13; c counts the samples of a merged action, leaves without outcome are left out):
        V(leaf) = R(leaf);   V(u) = sum_{v in child(u)} c_v V(v) / sum_v c_v
        A(u -> v) = V(v) - V(u)                     (no critic, no group mean, no std normalisation)
        D_upd = {(u -> v) : |child(u)| > 1}         (update_set=critical; distinct children with a value)
        A_t = c_v * A(e_{node(t)}) * m_t            (m = response_mask, laid out by the agent loop from D_upd)

    Args:
        token_level_rewards: verl's rewards (each row's leaf reward on its last token); not used, because the
            tree values already hold every leaf reward [shape: (bs, response_length)].
        response_mask: 1 on trained tokens [shape: (bs, response_length)].
        config: verl's `algorithm` config; its `carl` block gives `update_set`, `value_aggregation`, `outcome_eps`.
        index: the question uid of each row (not needed: rows are grouped by tree).
        carl_batch: the batch's trees (`carl_batch_from_rows`); its `scored` field is filled.

    Returns:
        (advantages, returns) [shapes: (bs, response_length)]; returns = advantages (there is no critic).
    """
    if carl_batch is None:
        raise ValueError(
            "adv_estimator=carl got no carl_batch: run it with trainer.v1.trainer_mode=carl, whose "
            "_compute_advantage hands the batch's trees over (verl's default trainer passes rewards only)."
        )
    carl = read_settings((config or {}).get("carl")).carl
    # Step 1: node values, edge advantages and the update set of every tree (Alg. 2, Eq. 13).
    scored = score_trees(carl_batch.arrays, carl)
    # Step 2: each trained action's advantage on all of its tokens; the mask must be the update set's.
    advantages = compute_token_advantages(scored.advantage, scored.trained, carl_batch.token_node, response_mask)
    carl_batch.scored = scored
    return advantages, advantages.clone()


def is_registered() -> bool:
    """Whether verl's registry resolves `carl` to this module's function."""
    return ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR) is compute_carl_advantage
