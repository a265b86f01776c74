"""Flattening trained actions of a batch of trees into training rows in verl's layout.

A row is a prompt plus a response: the actions and observations along one root-to-leaf path, cut right after the
last action the row trains. verl's FSDP engine recomputes every token of every row, so the cost of a layout is the
number of tokens it feeds the actor (old log-probs, reference, update):

    one row per trained action:  prompt + full prefix for each of |D_upd| rows   (prefix recomputed per action)
    one row per leaf path:       N0 + N rows, shared prefixes recomputed per leaf, untrained tails computed too
    this module:                 only leaf paths that hold a not-yet-covered trained action, each cut after its
                                 last such action; every trained action is trained in exactly one row

Choosing, for each leaf in id order, the still-uncovered trained actions on its path covers every trained action
exactly once (mask 1 in that row, 0 in any other row that carries it as context). Actions outside the update set
get no row of their own and mask 0 where they appear as context; observation tokens always have mask 0. Shared
prefixes are still recomputed once per row: verl's engine has no tree attention, so that is the floor here.

Row diagram for a tree whose root was forked once (a1, a4 critical) and whose s1 was forked once (a2, a3)::

    prompt | a1 obs1 a2 obs2          row 1: mask a1=1, a2=1 (obs 0)
    prompt | a1 obs1 a3               row 2: mask a1=0 (already covered), a3=1; cut after a3
    prompt | a4                       row 3: mask a4=1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from carl_core.tree import RolloutTree
from carl_core.update_set import ScoredTrees


@dataclass
class TrainingRow:
    """One training sequence (unpadded), in verl's naming."""

    uid: str
    """The tree's uid (verl's `index` / GRPO group key)."""
    tree_index: int
    leaf: int
    """Local id of the leaf whose path the row follows."""
    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    """1 on the tokens of actions this row trains, 0 on observations and on context actions."""
    advantages: list[float]
    """The action's advantage on each of its trained tokens, 0 elsewhere."""
    rollout_log_probs: list[float]
    """Inference-engine log-prob of every action token, 0 on observation tokens."""
    token_node: list[int]
    """Local node id of the action each token belongs to, -1 on observation tokens."""


def flatten_trees(trees: Sequence[RolloutTree], scored: ScoredTrees) -> list[TrainingRow]:
    """Training rows for every trained action of a batch of trees, each action in exactly one row.

    Args:
        trees: the finished trees, in the order they were scored.
        scored: `score_trees(trees, config)`.

    Returns:
        Rows, grouped by tree and ordered by leaf id within a tree.
    """
    trained_all = scored.trained.tolist()
    adv_all = scored.advantage.tolist()
    rows: list[TrainingRow] = []
    for b, tree in enumerate(trees):
        base = scored.arrays.offsets[b]
        covered = [False] * len(tree.nodes)
        for leaf in tree.leaves():
            path = tree.path(leaf)[1:]
            new = [v for v in path if trained_all[base + v] and not covered[v]]
            if not new:
                continue
            last = path.index(new[-1])
            ids: list[int] = []
            mask: list[int] = []
            adv: list[float] = []
            logp: list[float] = []
            node_of: list[int] = []
            train_here = set(new)
            for pos, v in enumerate(path[: last + 1]):
                action = tree.nodes[v].action
                assert action is not None
                n_act = len(action.token_ids)
                on = v in train_here
                ids += action.token_ids
                mask += [1 if on else 0] * n_act
                adv += [adv_all[base + v] if on else 0.0] * n_act
                logp += action.log_probs
                node_of += [v] * n_act
                if pos < last:  # the observation after the row's last trained action is never needed
                    n_obs = len(action.observation_ids)
                    ids += action.observation_ids
                    mask += [0] * n_obs
                    adv += [0.0] * n_obs
                    logp += [0.0] * n_obs
                    node_of += [-1] * n_obs
            for v in new:
                covered[v] = True
            rows.append(TrainingRow(tree.uid, b, leaf, list(tree.prompt_ids), ids, mask, adv, logp, node_of))
    return rows


def collate_rows(
    rows: Sequence[TrainingRow], response_length: int | None = None, pad_token_id: int = 0
) -> dict[str, torch.Tensor | np.ndarray]:
    """Pads rows into verl's `(bs, response_length)` tensors (responses right-padded, prompts left-padded).

    Args:
        rows: output of `flatten_trees`.
        response_length: pad responses to this length; a longer row is an error (raise the length or lower
            T_max), because cutting it would silently drop trained tokens. Default: the longest row.
        pad_token_id: id used for padding tokens.

    Returns:
        `prompts` (bs, prompt_length), `responses`, `response_mask`, `advantages`, `rollout_log_probs`,
        `token_node` (bs, response_length), and `index` (bs,) numpy array of tree uids.
    """
    if not rows:
        raise ValueError("collate_rows got no rows: no tree of the batch has a trained action.")
    longest = max(len(r.response_ids) for r in rows)
    length = longest if response_length is None else response_length
    if longest > length:
        raise ValueError(
            f"a row has {longest} response tokens but response_length={length}: raise "
            "data.max_response_length or lower algorithm.carl.max_actions so whole trajectories fit."
        )
    p_len = max(len(r.prompt_ids) for r in rows)
    bs = len(rows)
    prompts = torch.full((bs, p_len), pad_token_id, dtype=torch.long)
    responses = torch.full((bs, length), pad_token_id, dtype=torch.long)
    mask = torch.zeros(bs, length, dtype=torch.long)
    adv = torch.zeros(bs, length, dtype=torch.float32)
    logp = torch.zeros(bs, length, dtype=torch.float32)
    node = torch.full((bs, length), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.response_ids)
        if r.prompt_ids:
            prompts[i, p_len - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        responses[i, :n] = torch.tensor(r.response_ids)
        mask[i, :n] = torch.tensor(r.response_mask)
        adv[i, :n] = torch.tensor(r.advantages)
        logp[i, :n] = torch.tensor(r.rollout_log_probs)
        node[i, :n] = torch.tensor(r.token_node)
    return {
        "prompts": prompts,
        "responses": responses,
        "response_mask": mask,
        "advantages": adv,
        "rollout_log_probs": logp,
        "token_node": node,
        "index": np.array([r.uid for r in rows], dtype=object),
    }
