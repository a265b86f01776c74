"""The CARL trainer: verl's V1 sync trainer with one method changed (`_compute_advantage`).

Selected with `trainer.v1.trainer_mode=carl`. verl's `fit()` and `_step_once()` run unchanged; in the advantage step
this trainer additionally reads each row's `extra_fields` (written by `recipe.carl.agent_loop`) and

1. hands the rows' tree advantages to the registered `carl` estimator (verl itself passes estimators only rewards);
2. restores each row's own leaf reward in `rm_scores`: verl's list post-processing copies the *last* output's score
   onto every output of a `run()`, so without this `critic/score/*` would report one leaf per tree;
3. logs the batch's tree statistics under `carl/...` and dumps the trees as JSON lines every `dump_every` steps.

With any other `algorithm.adv_estimator` (the GRPO baseline) the advantages are verl's exactly; the trainer only
logs the same per-question budget (`carl/actions_generated_per_question`, `carl/tokens_trained`, ...).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from carl_core import (
    RolloutTree,
    compute_budget_stats,
    compute_tree_stats,
    pack_trees,
    score_trees,
    tree_records,
    write_jsonl,
)
from recipe.carl.estimator import gather_row_advantages, is_padding_row
from recipe.carl.settings import ESTIMATOR, TRAINER_MODE, RecipeSettings, check_trainer_config

logger = logging.getLogger(__name__)


def leaf_reward_scores(extra_fields: Sequence[Any], uids: Sequence[str], response_mask: torch.Tensor) -> torch.Tensor:
    """verl's `rm_scores` layout with each row's own leaf reward on its last response token.

    Args:
        extra_fields: each row's `extra_fields` [len: bs].
        uids: each row's uid [len: bs].
        response_mask: [shape: (bs, response_length)], only its shape is used.

    Returns:
        Scores [shape: (bs, response_length)]; all zero on verl's padding rows.
    """
    scores = torch.zeros(response_mask.shape, dtype=torch.float32)
    for i, (uid, extra) in enumerate(zip(uids, extra_fields, strict=True)):
        if not is_padding_row(uid, extra):
            scores[i, len(extra["carl_advantages"]) - 1] = float(extra["carl_leaf_reward"])
    return scores


def tree_telemetry(
    extra_fields: Sequence[Any], uids: Sequence[str], settings: RecipeSettings, budget_only: bool = False
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Rebuilds the batch's trees from the rows that carry them and computes `carl/...` stats and dump records.

    Each tree travels once, in the `carl_tree` field of its first row; verl's padding rows copy another row's
    `extra_fields`, so trees are taken from real rows only and de-duplicated by tree uid (`{uid}_{session}`).
    With `budget_only` (GRPO and other estimators: one-leaf trees, every action trained) only the per-question
    budget (`compute_budget_stats`) is returned, and no dump records.
    """
    trees: dict[str, RolloutTree] = {}
    questions: dict[str, str] = {}
    for uid, extra in zip(uids, extra_fields, strict=True):
        if is_padding_row(uid, extra) or extra.get("carl_tree") is None:
            continue
        tree_dict = extra["carl_tree"]
        if tree_dict["uid"] not in trees:
            trees[tree_dict["uid"]] = RolloutTree.from_dict(tree_dict)
            questions[tree_dict["uid"]] = uid
    if not trees:
        return {}, []
    ordered = list(trees.values())
    if budget_only:  # every generated action is trained: no values or advantages needed
        arrays = pack_trees(ordered)
        return compute_budget_stats(ordered, arrays.parent >= 0, arrays.offsets, list(questions.values())), []
    scored = score_trees(ordered, settings.carl)
    budget = compute_budget_stats(ordered, scored.trained, scored.arrays.offsets, list(questions.values()))
    stats = {**compute_tree_stats(ordered, scored), **budget}
    stats["carl/trees"] = float(len(ordered))
    stats["carl/leaf_reward_mean"] = float(scored.arrays.reward[scored.arrays.is_leaf].mean())
    return stats, tree_records(ordered, scored, settings.carl)


@register_trainer(TRAINER_MODE)
class CARLTrainer(PPOTrainerSync):
    """`PPOTrainerSync` whose advantage step feeds the tree metadata to the `carl` estimator."""

    def __init__(self, config):
        super().__init__(config)
        self.carl_settings = check_trainer_config(config)  # CARL: fail at start, with a fix-it message

    def _compute_advantage(self, batch, metrics: dict):
        if self.config.algorithm.adv_estimator != ESTIMATOR:  # CARL: baselines (GRPO, ...) take verl's path
            batch = super()._compute_advantage(batch, metrics)
            self._log_budget(batch, metrics)
            return batch
        # CARL: verl reads rollout_log_probs/old_log_probs/values here for KL-in-reward, rollout correction and
        # GAE, none of which CARL uses (check_trainer_config rejects them); it never reads extra_fields.
        fields = ["uid", "response_mask", "extra_fields"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        nested_mask = data["response_mask"]
        if not nested_mask.is_nested:  # CARL: equal-length rows can come back stacked; verl's writer wants jagged
            nested_mask = torch.nested.as_nested_tensor(list(nested_mask), layout=torch.jagged)
        uids = [str(u) for u in data.pop("uid").tolist()]  # CARL
        extra_fields = list(data.pop("extra_fields").tolist())  # CARL: tree metadata from the agent loop
        response_mask = data.to_padded_tensor()["response_mask"]

        rm_scores = leaf_reward_scores(extra_fields, uids, response_mask)  # CARL: undo verl's score copy
        estimator = core_algos.get_adv_estimator_fn(ESTIMATOR)  # CARL: the registered estimator, with trees
        advantages, returns = estimator(
            token_level_rewards=rm_scores,
            response_mask=response_mask,
            config=self.config.algorithm,
            index=np.array(uids, dtype=object),
            carl_advantages=gather_row_advantages(extra_fields, uids, response_mask),
        )
        stats, records = tree_telemetry(extra_fields, uids, self.carl_settings)  # CARL: telemetry
        metrics.update(stats)
        self._dump_trees(records)

        output = {
            name: response_to_nested(value, nested_mask)
            for name, value in {"advantages": advantages, "returns": returns, "rm_scores": rm_scores}.items()
        }
        return tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(output, batch_size=len(batch))
        )

    def _log_budget(self, batch, metrics: dict) -> None:
        """Baselines: the same per-question action and token counts as CARL logs (for `benchmarks/carl_vs_grpo`).

        Rows from other agent loops carry no `carl_tree`; they log nothing.
        """
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["uid", "extra_fields"])
        uids = [str(u) for u in data.pop("uid").tolist()]
        extra_fields = [e if isinstance(e, dict) else {} for e in data.pop("extra_fields").tolist()]
        stats, _ = tree_telemetry(extra_fields, uids, self.carl_settings, budget_only=True)
        metrics.update(stats)

    def _dump_trees(self, records: list[dict[str, Any]]) -> None:
        """Writes the step's trees to `{trainer.default_local_dir}/carl_trees/step_XXXXXX.jsonl`."""
        every = self.carl_settings.dump_every
        if not records or every <= 0 or self.global_steps % every:
            return
        path = os.path.join(self.config.trainer.default_local_dir, "carl_trees", f"step_{self.global_steps:06d}.jsonl")
        write_jsonl(records, path)
        logger.info("CARL: wrote %d trees to %s", len(records), path)
