"""The CARL trainer: verl's V1 sync trainer with its advantage step handing the batch's trees to the estimator.

Selected with `trainer.v1.trainer_mode=carl` (the recipe's yaml, for CARL and its baselines alike). verl's `fit()`
and `_step_once()` run unchanged; changed lines are tagged `# CARL:`.

- `__init__`: the start-up checks that need the cluster (`recipe.carl.cluster`); the forwarded secrets hidden from the
  config verl hands its loggers (`preflight.hide_secrets`). The run takes verl's sync code paths: verl compares
  `trainer_mode == "sync"` as a string (replay buffer, generation batch size, TransferQueue persistence, resume), so
  the mode is set back to `sync` once verl has picked this class.
- `_balance_batch`, `_update_actor`, `_update_critic`: each step's optimizer updates follow `recipe.carl.schedule`:
  `ppo_mini_batch_size` counts questions in both row layouts, every update trains on the same number of real rows
  (+-1), and padding rows carry no tree description.
- `_compute_advantage` under `algorithm.adv_estimator=carl`: builds the batch's `CarlBatch` from the rows'
  `extra_fields` and calls the registered `carl` estimator (verl passes estimators only rewards); gives each row
  its own leaf reward (`rm_scores`) and reward breakdown (`reward_extra_info`) back, which verl's list
  post-processing overwrote with the last output's; logs `carl/*` and `search/*` and dumps the trees, all from the
  estimator's one result. Under any other estimator (the GRPO baseline) the advantages are verl's exactly, and the
  same per-question budget, search metrics and shares without signal (`baseline_signal_stats`) are logged.
- A step whose share of failed searches exceeds `algorithm.carl.max_search_error_rate` stops the run (accesses of the
  paper's action space count as searches).
- Metrics by action kind (`recipe.carl.action_kinds`), and each dumped node's kind.
- `_save_checkpoint`: after verl's, writes the run's agent settings (`recipe.carl.run_record`) into the step's folder
  and `trainer.default_local_dir`, where `python -m recipe.carl.evaluate` finds them (verl saves no run config), and
  the running totals `carl/total/*` (`recipe.carl.totals`), which `_load_checkpoint` reads back on resume.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transfer_queue as tq
from omegaconf import open_dict
from tensordict import NonTensorStack, TensorDict
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from carl_core import compute_budget_stats, compute_tree_stats, tree_records
from recipe.carl.action_kinds import action_kind_stats, node_kinds
from recipe.carl.cluster import check_cluster
from recipe.carl.estimator import CarlBatch, carl_batch_from_rows, is_tree_row
from recipe.carl.in_flight import in_flight_metrics
from recipe.carl.io import write_jsonl
from recipe.carl.pool import pool_metrics
from recipe.carl.preflight import hide_secrets
from recipe.carl.run_record import run_record, write_run_record
from recipe.carl.schedule import (
    UpdatePlan,
    is_padding_key,
    micro_batch_rows,
    mini_batch_rows,
    pad_batch,
    padding_flags,
    plan_metrics,
    plan_updates,
    spread_padding,
)
from recipe.carl.settings import ESTIMATOR, TRAINER_MODE, RecipeSettings, check_trainer_config
from recipe.carl.totals import BudgetTotals, checkpoint_folder

logger = logging.getLogger(__name__)


class SearchFailureError(RuntimeError):
    """Too many of a step's searches failed: the retriever is down, wrong or overloaded."""


def search_metrics(batch: CarlBatch, settings: RecipeSettings, config: Any, step: int) -> dict[str, float]:
    """`search/*` of the step's trees; raises `SearchFailureError` above `max_search_error_rate`."""
    stats = [d.get("search") or {} for d in batch.descriptions]
    calls, errors = sum(s.get("calls", 0) for s in stats), sum(s.get("errors", 0) for s in stats)
    if not calls:
        return {}
    rate = errors / calls
    if rate > settings.max_search_error_rate:
        last = next((s["last_error"] for s in stats if s.get("last_error")), "")
        tool = config.actor_rollout_ref.rollout.multi_turn.get("tool_config_path")
        raise SearchFailureError(
            f"{errors} of {calls} searches failed in step {step} (error rate {rate:.0%} > "
            f"algorithm.carl.max_search_error_rate={settings.max_search_error_rate}); last error: {last}. Check the "
            f"retriever named by the tool yaml {tool} (RETRIEVER_URL={os.environ.get('RETRIEVER_URL', 'unset')}); "
            "set algorithm.carl.max_search_error_rate=1.0 to train through failures."
        )
    latency = sum(s.get("latency_s", 0.0) for s in stats)
    out = {
        "search/calls": float(calls),
        "search/errors": float(errors),
        "search/error_rate": rate,
        "search/latency_mean_s": latency / calls,
    }
    accesses = sum(s.get("accesses", 0) for s in stats)  # the paper's action space: pages opened (in `calls`)
    return out | ({"search/accesses": float(accesses)} if accesses else {})


def baseline_signal_stats(batch: CarlBatch) -> dict[str, float]:
    """Where a group baseline's signal goes (GRPO: one-leaf chains per question, `rollout.n` sessions of one chain, or
    one session's chains from the GRPO fork pool), on CARL's scale.

    An action gets A = 0 when its chain's reward equals the group's mean (verl's GRPO takes 0 for a group of one); a
    question's group has no signal when every action in it gets A = 0, i.e. (two chains or more) when all its rewards
    are equal: CARL's `degenerate_tree_fraction` for groups. Both in exact arithmetic: verl's GRPO divides the
    float32 rounding residue of an equal group's mean by std + 1e-6, so a group of eight 0.1 rewards gets A = -0.0074
    on every token rather than 0.

    Returns:
        `carl/no_signal_group_fraction` (share of questions) and `carl/zero_advantage_fraction` (share of the
        generated actions, all of which a baseline trains); empty when no chain has an outcome.
    """
    arrays = batch.arrays
    parent = arrays.parent.tolist()
    groups: dict[str, list[tuple[float, float]]] = {}  # question -> (reward, actions) per chain with an outcome
    for leaf in torch.nonzero(arrays.is_leaf & arrays.has_outcome).flatten().tolist():
        actions, node = 0.0, leaf
        while parent[node] >= 0:  # the chain's actions: its path from the root (a chain shares no node)
            actions, node = actions + float(arrays.count[node]), parent[node]
        question = batch.questions[int(arrays.tree_index[leaf])]
        groups.setdefault(question, []).append((float(arrays.reward[leaf].double()), actions))
    if not groups:
        return {}
    silent, zero, total = 0, 0.0, 0.0
    for chains in groups.values():
        rewards = [r for r, _ in chains]
        mean = math.fsum(rewards) / len(rewards) if len(rewards) > 1 else 0.0  # verl: a lone chain's A is its reward
        at_mean = [math.isclose(r, mean, rel_tol=0.0, abs_tol=1e-9) for r in rewards]
        silent += all(at_mean)
        zero += sum(a for (_, a), z in zip(chains, at_mean, strict=True) if z)
        total += sum(a for _, a in chains)
    return {
        "carl/no_signal_group_fraction": silent / len(groups),
        "carl/zero_advantage_fraction": zero / total if total else math.nan,
    }


def pooled_grpo_advantages(
    batch: CarlBatch, response_mask: torch.Tensor, uids: Sequence[str], norm_adv_by_std_in_grpo: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO advantages of the GRPO fork pool's rows: every chain its own trajectory, grouped by question (verl uid).

    The pool grows a question's whole group in one agent-loop session (`rollout.n = 1`), one row per chain. verl's
    multi-trajectory GRPO (`compute_advantage_for_multi_trajectories`) would read a session's rows as the turns of
    one trajectory: only the last row is scored, in a group of one, and its raw reward is copied to every chain.
    Here each row keeps its own leaf reward and verl's own `compute_grpo_outcome_advantage` groups the rows by uid.

    Args:
        batch: the rows' trees (one per question, each leaf a chain).
        response_mask: [shape: (bs, response_length)].
        uids: each row's question [len: bs].

    Returns:
        (advantages, returns, rm_scores), each [shape: (bs, response_length)].
    """
    scores = leaf_reward_scores(batch, response_mask)
    advantages, returns = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=scores,
        response_mask=response_mask,
        index=np.array(list(uids), dtype=object),
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
    )
    return advantages, returns, scores


def leaf_reward_scores(batch: CarlBatch, response_mask: torch.Tensor) -> torch.Tensor:
    """verl's `rm_scores` layout with each row's own leaf reward on its last response token (0 outside trees).

    Args:
        batch: the rows' trees.
        response_mask: [shape: (bs, response_length)], only its shape is used.
    """
    scores = torch.zeros(response_mask.shape, dtype=torch.float32)
    for i, (leaf, length) in enumerate(zip(batch.row_leaf, batch.row_length, strict=True)):
        if leaf >= 0:
            scores[i, length - 1] = float(batch.arrays.reward[leaf])
    return scores


def restored_reward_info(batch: CarlBatch, extra_fields: Sequence[Any]) -> list[Any]:
    """Each row's `extra_fields` with the reward breakdown of its own leaf (verl copied the last row's)."""
    out = []
    for extra, leaf in zip(extra_fields, batch.row_leaf, strict=True):
        if leaf >= 0:
            b = int(batch.arrays.tree_index[leaf])
            info = batch.descriptions[b]["reward_info"][leaf - batch.arrays.offsets[b]]
            extra = {**extra, "reward_extra_info": info or {}}
        out.append(extra)
    return out


@register_trainer(TRAINER_MODE)
class CARLTrainer(PPOTrainerSync):
    """`PPOTrainerSync` whose advantage step feeds the batch's trees to the `carl` estimator."""

    def __init__(self, config):
        self.carl_settings = check_trainer_config(config)  # CARL: fail at start, with a fix-it message
        check_cluster(config)  # CARL: every node sees the driver's files; no loopback retriever across hosts
        hide_secrets(config)  # CARL: verl hands this config to its loggers; the workers have the values already
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"  # CARL: verl's sync code paths (it compares the name)
        self.carl_totals = BudgetTotals()  # CARL: carl/total/*, restored by `_load_checkpoint` on resume
        super().__init__(config)

    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        # CARL: the step's own padding (rows for k equal updates, no tree description), then verl's balancing, then
        # the padding dealt evenly over the updates (recipe.carl.schedule).
        plan = self._plan_updates(batch)
        batch = pad_batch(batch, plan.rows, self.tokenizer.eos_token_id)
        batch = super()._balance_batch(batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)
        batch.reorder(spread_padding(padding_flags(batch), plan.dp, plan.updates))
        metrics.update(plan_metrics(plan, padding_flags(batch)))
        return batch

    def _get_required_batch_multiple(self, dp_size: int) -> int:
        return dp_size  # CARL: `_balance_batch` padded the step to its updates already (a multiple of dp)

    def _update_actor(self, batch, metrics: dict):
        with mini_batch_rows(self.config, len(batch) // self._plan_updates(batch).updates):  # CARL: this step's size
            return super()._update_actor(batch, metrics)

    def _update_critic(self, batch, metrics: dict):
        with mini_batch_rows(self.config, len(batch) // self._plan_updates(batch).updates, roles=("critic",)):
            return super()._update_critic(batch, metrics)

    def _plan_updates(self, batch) -> UpdatePlan:
        """This step's updates (`recipe.carl.schedule.plan_updates`) from its real rows and the actor's dp ranks."""
        worker_group = self.actor_rollout_wg  # verl's own lookup of the actor's dp size (PPOTrainer._balance_batch)
        if "actor" not in worker_group._dispatch_info:
            worker_group._dispatch_info["actor"] = worker_group._query_dispatch_info("actor")
        return plan_updates(
            [key for key in batch.keys if not is_padding_key(key)],  # by key: also where a batch's tags are stale
            int(self.config.actor_rollout_ref.actor.ppo_mini_batch_size),
            dp=max(worker_group._dispatch_info["actor"]) + 1,
            rollout_n=int(self.config.actor_rollout_ref.rollout.n),
            micro_rows=micro_batch_rows(self.config, use_critic=self.use_critic),
        )

    def _compute_advantage(self, batch, metrics: dict):
        carl = self.config.algorithm.adv_estimator == ESTIMATOR
        pooled_grpo = not carl and self.carl_settings.fork_pool is not None
        if not carl and not pooled_grpo:  # CARL: baselines (GRPO, ...) take verl's path, then log the same budget
            batch = super()._compute_advantage(batch, metrics)
        fields = ["uid", "response_mask", "extra_fields"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        uids = [str(u) for u in data.pop("uid").tolist()]
        extra_fields = list(data.pop("extra_fields").tolist())
        nested_mask = data["response_mask"]
        if not nested_mask.is_nested:  # equal-length rows can come back stacked; verl's writer wants jagged
            nested_mask = torch.nested.as_nested_tensor(list(nested_mask), layout=torch.jagged)
        response_mask = data.to_padded_tensor()["response_mask"]
        if not any(is_tree_row(u, e) for u, e in zip(uids, extra_fields, strict=True)):
            return batch  # rows of other agent loops: nothing to log
        trees = carl_batch_from_rows(extra_fields, uids, response_mask.shape[1])
        metrics.update(search_metrics(trees, self.carl_settings, self.config, self.global_steps))
        metrics.update(in_flight_metrics(d.get("in_flight") for d in trees.descriptions))
        metrics.update(pool_metrics([d.get("pool") for d in trees.descriptions]))
        kinds, questions = node_kinds(trees.descriptions), len(set(trees.questions))
        if pooled_grpo:  # CARL: a pooled group is one session of many chains, which verl's GRPO would misread
            norm = bool(self.config.algorithm.get("norm_adv_by_std_in_grpo", True))
            advantages, returns, rm_scores = pooled_grpo_advantages(trees, response_mask, uids, norm)
            batch = self._put_advantages(batch, advantages, returns, rm_scores, nested_mask, trees, extra_fields)
        if not carl:
            budget = compute_budget_stats(trees.arrays, trees.arrays.parent >= 0, trees.questions)
            metrics.update(budget | self.carl_totals.add(self.global_steps, budget))
            metrics.update({k: v for k, v in baseline_signal_stats(trees).items() if not math.isnan(v)})
            metrics.update(action_kind_stats(trees.arrays, kinds, trees.arrays.parent >= 0, questions))
            return batch

        estimator = core_algos.get_adv_estimator_fn(ESTIMATOR)  # CARL: the registered estimator, with the trees
        advantages, returns = estimator(
            token_level_rewards=torch.zeros_like(response_mask, dtype=torch.float32),
            response_mask=response_mask,
            config=self.config.algorithm,
            index=np.array(uids, dtype=object),
            carl_batch=trees,
        )
        scored = trees.scored
        assert scored is not None
        metrics.update(compute_tree_stats(trees.arrays, scored))
        budget = compute_budget_stats(trees.arrays, scored.trained, trees.questions)
        metrics.update(budget | self.carl_totals.add(self.global_steps, budget))
        metrics.update(action_kind_stats(trees.arrays, kinds, scored.trained, questions, scored.advantage))
        self._dump_trees(trees)

        rm_scores = leaf_reward_scores(trees, response_mask)  # CARL: undo verl's copy of the last row's score
        return self._put_advantages(batch, advantages, returns, rm_scores, nested_mask, trees, extra_fields)

    @staticmethod
    def _put_advantages(batch, advantages, returns, rm_scores, nested_mask, trees: CarlBatch, extra_fields):
        """Writes the rows' advantages, returns, own scores and own reward breakdowns back to TransferQueue."""
        output: dict[str, Any] = {
            name: response_to_nested(value, nested_mask)
            for name, value in {"advantages": advantages, "returns": returns, "rm_scores": rm_scores}.items()
        }
        output["extra_fields"] = NonTensorStack(*restored_reward_info(trees, extra_fields))
        return tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(output, batch_size=len(batch))
        )

    def _save_checkpoint(self):
        super()._save_checkpoint()
        # CARL: the agent settings this checkpoint was trained with, read back by `python -m recipe.carl.evaluate`
        # (per step: a resumed run may change them).
        record = run_record(self.config, self.global_steps)
        root = self.config.trainer.default_local_dir
        write_run_record(record, os.path.join(root, f"global_step_{self.global_steps}"))
        write_run_record(record, root)
        # CARL: carl/total/* so far, counting up to this checkpoint's step (also when its steps counted nothing: a
        # GRPO run without CARL rows logs no budget).
        self.carl_totals.step = self.global_steps
        self.carl_totals.save(os.path.join(root, f"global_step_{self.global_steps}"))

    def _load_checkpoint(self):
        super()._load_checkpoint()
        if self.global_steps > 0:  # CARL: resumed; go on counting carl/total/* from the checkpoint's totals
            self.carl_totals = BudgetTotals.load(checkpoint_folder(self.config, self.global_steps), self.global_steps)

    def _dump_trees(self, trees: CarlBatch) -> None:
        """Writes the step's trees to `{trainer.default_local_dir}/carl_trees/step_XXXXXX.jsonl`."""
        every = self.carl_settings.dump_every
        if every <= 0 or self.global_steps % every or trees.scored is None:
            return
        records = tree_records(trees.arrays, trees.scored, self.carl_settings.carl, trees.descriptions)
        for record, description in zip(records, trees.descriptions, strict=True):  # CARL: each action's kind
            for node, kind in zip(record["nodes"], description.get("kind") or [], strict=False):
                node["kind"] = kind
        path = os.path.join(self.config.trainer.default_local_dir, "carl_trees", f"step_{self.global_steps:06d}.jsonl")
        write_jsonl(path, records)
        logger.info("CARL: wrote %d trees to %s", len(records), path)
