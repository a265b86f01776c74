"""Laying out the trained actions of a tree as verl rows, and mapping node advantages onto their tokens.

A row is a prompt plus a response: the actions and observations along one root-to-leaf path. verl's engine
recomputes every token of every row, so `layout_rows` keeps only leaf paths that hold a not-yet-covered trained
action, each cut after its last such action: every trained action is trained in exactly one row. The layout needs
only the *structural* update set (`compute_trained_mask`), so rows are laid out where the tree is grown and the
advantages come later, for the whole batch, from the estimator, through each row's runs `[[node, count], ...]`
(node -1 on observation tokens). For a tree whose root was forked once (a1, a4) and whose s1 once (a2, a3)::

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


@dataclass
class TrainingRow:
    """One training sequence (unpadded), in verl's naming."""

    leaf: int  # the leaf whose path the row follows
    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]  # 1 on the tokens of actions this row trains, 0 on observations and context actions
    rollout_log_probs: list[float]  # the engine's log-prob of every action token, 0 on observation tokens
    token_nodes: list[list[int]]  # runs [node, count]: the node whose action each token belongs to, -1 on observations


def layout_rows(tree: RolloutTree, trained: Sequence[bool]) -> list[TrainingRow]:
    """Rows for every trained action of a finished tree, each action in exactly one row.

    Args:
        tree: the finished tree.
        trained: whether the action entering each node is trained [len: num_nodes] (`compute_trained_mask`).

    Returns:
        The rows, ordered by leaf id; none for a tree without a trained action.
    """
    covered = [False] * len(tree.nodes)
    rows = []
    for leaf in tree.leaves():
        path = tree.path(leaf)[1:]
        new = [v for v in path if trained[v] and not covered[v]]
        if not new:
            continue
        last = path.index(new[-1])
        row = TrainingRow(leaf, list(tree.prompt_ids), [], [], [], [])
        for pos, v in enumerate(path[: last + 1]):
            action = tree.nodes[v].action
            assert action is not None
            n, on = len(action.token_ids), int(v in new)
            row.response_ids += action.token_ids
            row.response_mask += [on] * n
            row.rollout_log_probs += action.log_probs
            row.token_nodes.append([v, n])
            m = len(action.observation_ids)
            if pos < last and m:  # the observation after the row's last trained action is never needed
                row.response_ids += action.observation_ids
                row.response_mask += [0] * m
                row.rollout_log_probs += [0.0] * m
                row.token_nodes.append([-1, m])
        for v in new:
            covered[v] = True
        rows.append(row)
    return rows


def expand_token_nodes(runs: Sequence[Sequence[Sequence[int]]], offsets: Sequence[int], width: int) -> torch.Tensor:
    """Per-token global node ids of a batch of rows from their runs.

    Args:
        runs: each row's `token_nodes` runs (an empty list for rows without tree tokens, e.g. verl's padding).
        offsets: global id of the root of each row's tree (added to every node id >= 0) [len: bs].
        width: the batch's response length.

    Returns:
        Global node id per response token, -1 on observations and padding [shape: (bs, width)].
    """
    nodes: list[int] = []
    counts: list[int] = []
    for r, (row, base) in enumerate(zip(runs, offsets, strict=True)):
        length = sum(count for _, count in row)
        if length > width:
            raise ValueError(f"row {r} has {length} response tokens but the batch is {width} wide (truncated?).")
        nodes += [node + base if node >= 0 else -1 for node, _ in row] + [-1]  # the runs, then padding
        counts += [count for _, count in row] + [width - length]
    values = np.repeat(np.asarray(nodes, dtype=np.int64), np.asarray(counts, dtype=np.int64))  # 8x torch's here
    return torch.from_numpy(values).view(len(runs), width)


def compute_token_advantages(
    node_advantage: torch.Tensor, trained: torch.Tensor, token_node: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Each trained action's advantage on all of its tokens (Eq. 13), 0 on every other token.

    Math:
        A_t = A(e_{node(t)}) * m_t      (no group mean/std, no critic)

    Args:
        node_advantage: advantage of the action entering each node [shape: (num_nodes,)].
        trained: whether that action is in D_upd [shape: (num_nodes,)].
        token_node: global node id per token, -1 on observations and padding [shape: (bs, response_length)].
        response_mask: 1 on the tokens the rows train [shape: (bs, response_length)].

    Returns:
        Token advantages [shape: (bs, response_length)], float32.

    Raises:
        ValueError: when a row trains a token that is not in D_upd (the rows were laid out for another update set,
            or changed after the rollout).
    """
    mask = response_mask.bool()
    node = token_node[mask]  # only the trained tokens are looked up
    if bool((node < 0).any()) or not bool(trained[node.clamp(min=0)].all()):
        raise ValueError("a row trains a token whose action is not in the update set (rows from another update_set?).")
    values = node_advantage[node]
    if not bool(torch.isfinite(values).all()):
        raise ValueError("non-finite CARL advantage on a trained token: the leaf rewards must be finite.")
    return torch.zeros(mask.shape, dtype=torch.float32).index_put_((mask,), values.to(torch.float32))
