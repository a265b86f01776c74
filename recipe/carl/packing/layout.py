"""Tree-packed training rows: each token of a tree once, seen only by the tokens of its own root-to-token path.

A per-path row repeats the prompt and every shared turn once per leaf. A packed row lays a whole tree out once, in
depth-first order, and describes its structure with *runs*: maximal spans of tokens that follow each other on
every path through them (the prompt, one action, one observation). Each run names the run whose last token comes
right before it on its path::

    tree                                   packed row (columns left to right)      runs [length, parent]
    prompt ─ a1 ─ o1 ─┬─ a2                prompt | a1 o1 | a2 | a3 | a4           0: [P, -1]   prompt
          │           └─ a3                                                        1: [|a1|, 0] 2: [|o1|, 1]
          └─ a4                                                                    3: [|a2|, 2] 4: [|a3|, 2]
                                                                                   5: [|a4|, 0]

From the runs alone follow, per token: its position id (its index on its own path, the position it had when it
was generated), its predecessor (the token before it on its path: for a3's first token the last token of o1,
not the last of a2) and the end of its subtree. Because every subtree is a contiguous span in depth-first order,
"k is on q's path" is one comparison: k <= q < span_end[k]. That is the whole attention mask, O(length) to ship.

Observation tokens and actions trained in another row are context (`response_mask` 0); each trained action is
trained in exactly one row; a path's tail after its last trained action is dropped (as per-path rows drop it).
A `PackedRow` is a `carl_core.TrainingRow` (so the estimator maps advantages onto it through `token_nodes`, as onto
any row) plus its runs and position ids.

Framework-free (torch, numpy, `carl_core`), like `carl_core.layout`; it lives here because `carl_core` is kept under
1,200 lines. It can move into `carl_core` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from carl_core import RolloutTree, TrainingRow, TreeError


@dataclass
class PackedRow(TrainingRow):
    """One tree-packed training row (unpadded): a `TrainingRow` whose `leaf` is the leaf its last path leads to."""

    tree_runs: list[list[int]]
    """[length, parent run] per run over prompt + response, in column order; run 0 is the prompt (parent -1)."""
    position_ids: list[int]
    """Position of every token of prompt + response on its own root-to-token path."""


def compute_tree_layout(runs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token position ids, subtree ends and predecessors of a packed row, from its runs.

    Args:
        runs: [length, parent run] per run, in column order; parent -1 starts a path at position 0.

    Returns:
        (position_ids, span_end, predecessor) [shapes: (num_tokens,)]. Token k is visible to token q iff
        k <= q < span_end[k]; predecessor is the column of the previous token on the path (-1 at a path start).

    Raises:
        TreeError: when runs are not in depth-first order, so that a token would see a sibling branch.
    """
    length = np.asarray([int(r[0]) for r in runs], dtype=np.int64)
    parent = [int(r[1]) for r in runs]
    # Step 1: depth-first order: each run hangs below a run of the path that ends at the previous run.
    open_path: list[int] = []
    for r, p in enumerate(parent):
        if length[r] < 1:
            raise TreeError(f"run {r} has length {length[r]}: every run needs at least one token.")
        while open_path and open_path[-1] != p:
            open_path.pop()
        if p != -1 and not open_path:
            raise TreeError(
                f"run {r} hangs below run {p}, which is not on the path of run {r - 1}: its tokens would see a "
                "sibling branch. Lay runs out depth-first (every subtree contiguous)."
            )
        open_path.append(r)
    # Step 2: where each run starts, in columns and on its path.
    start = np.cumsum(length) - length
    pos_start = np.zeros_like(length)
    for r, p in enumerate(parent):
        if p >= 0:
            pos_start[r] = pos_start[p] + length[p]
    # Step 3: a run's subtree ends where its last descendant ends (children come after their parent).
    span_end = start + length
    for r in range(len(parent) - 1, 0, -1):
        if parent[r] >= 0:
            span_end[parent[r]] = max(span_end[parent[r]], span_end[r])
    # Step 4: to tokens.
    columns = np.arange(int(length.sum()), dtype=np.int64)
    position = columns + np.repeat(pos_start - start, length)
    predecessor = columns - 1
    for r, p in enumerate(parent):
        predecessor[start[r]] = start[p] + length[p] - 1 if p >= 0 else -1
    return position, np.repeat(span_end, length), predecessor


def compute_tree_attention_mask(span_end: torch.Tensor) -> torch.Tensor:
    """The dense attention mask of packed rows: True where query q may attend to key k.

    Math:
        mask[q, k] = (k <= q) and (q < span_end[k])

    Args:
        span_end: end column (exclusive) of each token's subtree [shape: (..., num_tokens)].

    Returns:
        Boolean mask [shape: (..., num_tokens, num_tokens)], queries on dim -2.
    """
    col = torch.arange(span_end.shape[-1], device=span_end.device)
    return (col[None, :] <= col[:, None]) & (col[:, None] < span_end.unsqueeze(-2))


def pack_tree(tree: RolloutTree, trained: Sequence[bool], max_response_tokens: int) -> list[PackedRow]:
    """Lays a tree out as packed rows: one row unless the tree's response tokens exceed the budget.

    Args:
        tree: a finished tree.
        trained: whether each node's entering action is trained (structural, e.g. Eq. 13) [len: num_nodes].
        max_response_tokens: response tokens per row (`data.max_response_length`); no row exceeds it.

    Returns:
        The rows (none if nothing is trained); leaf paths fill rows greedily in depth-first order.

    Raises:
        TreeError: when `trained` does not fit the tree, or one path alone exceeds the budget.
    """
    nodes = tree.nodes
    if len(trained) != len(nodes) or trained[0]:
        raise TreeError(f"trained has {len(trained)} entries for {len(nodes)} nodes (the root is never trained).")
    # Step 1: keep the nodes with a trained action in their subtree (parents have smaller ids than children).
    keep = [bool(t) for t in trained]
    for v in range(len(nodes) - 1, 0, -1):
        keep[nodes[v].parent] |= keep[v]  # type: ignore[index]
    order, stack = [], [0] if keep[0] else []
    while stack:  # depth-first, children in generation order
        v = stack.pop()
        order.append(v)
        stack += [c for c in reversed(nodes[v].children) if keep[c]]
    ends = [v for v in order if v and not any(keep[c] for c in nodes[v].children)]

    def size(v: int, end: int) -> int:  # tokens node v adds to a row whose path ends at `end`
        action = nodes[v].action
        assert action is not None
        return len(action.token_ids) + (len(action.observation_ids) if v != end else 0)

    # Step 2: group the kept paths greedily; a path costs its nodes not yet in the row.
    groups: list[set[int]] = []
    last_end: list[int] = []  # each row's last path ends here
    used = 0
    for end in ends:
        path = tree.path(end)[1:]
        full = sum(size(v, end) for v in path)
        if full > max_response_tokens:
            raise TreeError(
                f"tree {tree.uid!r}: the path to node {end} has {full} response tokens, more than the row budget "
                f"{max_response_tokens}: raise data.max_response_length or lower algorithm.carl.max_actions."
            )
        cost = sum(size(v, end) for v in path if v not in groups[-1]) if groups else full
        if not groups or used + cost > max_response_tokens:
            groups.append(set())
            last_end.append(end)
            used, cost = 0, full
        used += cost
        groups[-1].update(path)
        last_end[-1] = end
    # Step 3: each row in depth-first order; an action is trained in the first row that holds it.
    rows, covered = [], [False] * len(nodes)
    for group, leaf in zip(groups, last_end, strict=True):
        while nodes[leaf].children:  # the leaf the row's last path leads to (its tail is not in the row)
            leaf = nodes[leaf].children[0]
        row = PackedRow(leaf, list(tree.prompt_ids), [], [], [], [], [[len(tree.prompt_ids), -1]], [])
        last_run = {0: 0}
        for v in (v for v in order if v in group):
            action, parent = nodes[v].action, nodes[v].parent
            assert action is not None and parent is not None
            on = int(bool(trained[v]) and not covered[v])
            covered[v] = covered[v] or bool(on)
            segments = [(action.token_ids, action.log_probs, on, v)]
            if action.observation_ids and any(c in group for c in nodes[v].children):
                segments.append((action.observation_ids, [0.0] * len(action.observation_ids), 0, -1))
            for ids, log_probs, mask, node in segments:
                row.tree_runs.append([len(ids), last_run.get(v, last_run[parent])])
                last_run[v] = len(row.tree_runs) - 1
                row.response_ids += ids
                row.response_mask += [mask] * len(ids)
                row.rollout_log_probs += log_probs
                row.token_nodes.append([node, len(ids)])
        if not tree.prompt_ids:  # an empty prompt is no run
            row.tree_runs = [[n, p - 1] for n, p in row.tree_runs[1:]]
        row.position_ids = compute_tree_layout(row.tree_runs)[0].tolist()
        rows.append(row)
    return rows
