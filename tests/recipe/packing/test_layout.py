"""Tree-packed rows: the layout by hand, its attention mask against each token's own path, budgets, bad input."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from carl_core import CARLConfig, TreeError
from recipe.carl.packing.layout import compute_tree_attention_mask, compute_tree_layout, pack_tree
from tests.core.conftest import build_tree, random_tree


@pytest.fixture
def fig_tree():
    """tests/core's 7-node tree: 0 -a1-> 1 -a2-> 2 -a3-> 3; 1 -a4-> 4 -a5-> 5; 0 -a6-> 6."""
    lp = [-0.5, -1.0]
    return build_tree([(0, lp, None), (1, lp, None), (2, lp, 1.0), (1, lp, None), (4, lp, 0.0), (0, lp, 1.0)])


def _nodes(row) -> list[int]:
    return [node for node, count in row.token_nodes for _ in range(count)]


def _path_tokens(tree, node: int) -> list[tuple[int, int]]:
    """(token id, node) of the path prefix that ends with node's action, observation included (node -1 marks it)."""
    out = [(t, 0) for t in tree.prompt_ids]
    for v in tree.path(node)[1:]:
        action = tree.nodes[v].action
        out += [(t, v) for t in action.token_ids] + [(t, -1) for t in action.observation_ids]
    return out


def _check_row_against_paths(tree, row) -> None:
    """Every token sees exactly its own path, in order, with its generation-time position and predecessor."""
    ids = row.prompt_ids + row.response_ids
    nodes = [0] * len(row.prompt_ids) + _nodes(row)
    position, span_end, predecessor = compute_tree_layout(row.tree_runs)
    mask = compute_tree_attention_mask(torch.as_tensor(span_end))
    assert mask.shape == (len(ids), len(ids)) and row.position_ids == position.tolist()
    owner = []  # the action node each column belongs to (observations belong to the action before them)
    for c, v in enumerate(nodes):
        owner.append(v if v >= 0 else owner[c - 1])
    for q in range(len(ids)):
        seen = mask[q].nonzero().flatten().tolist()
        expected = [t for t, _ in _path_tokens(tree, owner[q])] if owner[q] else list(tree.prompt_ids)
        # the visible columns are the path's tokens up to q, in path order
        assert [ids[k] for k in seen] == expected[: len(seen)] and seen[-1] == q
        assert position[q] == len(seen) - 1
        assert predecessor[q] == (seen[-2] if len(seen) > 1 else -1)


def test_fig_tree_by_hand(fig_tree):
    # 0 -a1-> 1 -a2-> 2 -a3-> 3; 1 -a4-> 4 -a5-> 5; 0 -a6-> 6. Critical (Eq. 13): a1, a6 (root), a2, a4 (state 1).
    trained = [False, True, True, False, True, False, True]
    (row,) = pack_tree(fig_tree, trained, max_response_tokens=1000)
    # DFS: a1 o1 | a2 (tail a3 dropped, so a2's observation too) | a4 (tail a5 dropped) | a6
    assert row.response_ids == [100, 101, 901, 951, 200, 201, 400, 401, 600, 601]
    assert row.response_mask == [1, 1, 0, 0, 1, 1, 1, 1, 1, 1]
    assert row.token_nodes == [[1, 2], [-1, 2], [2, 2], [4, 2], [6, 2]] and row.leaf == 6
    assert row.tree_runs == [[3, -1], [2, 0], [2, 1], [2, 2], [2, 2], [2, 0]]
    # a4 follows a2 in the row but sits at a2's positions; a6 starts right after the prompt.
    assert row.position_ids == [0, 1, 2, 3, 4, 5, 6, 7, 8, 7, 8, 3, 4]
    position, span_end, predecessor = compute_tree_layout(row.tree_runs)
    assert predecessor.tolist() == [-1, 0, 1, 2, 3, 4, 5, 6, 7, 6, 9, 2, 11]
    assert span_end.tolist() == [13] * 3 + [11] * 4 + [9] * 2 + [11] * 2 + [13] * 2
    _check_row_against_paths(fig_tree, row)


@pytest.mark.parametrize("seed", range(12))
def test_random_trees_every_token_sees_exactly_its_path(seed):
    rng = random.Random(seed)
    tree = random_tree(rng, CARLConfig(n0=rng.randint(1, 3), n_forks=rng.randint(0, 6), max_actions=4))
    trained = [False] + [rng.random() < 0.5 for _ in tree.nodes[1:]]
    longest = max(len(tree.prefix_ids(leaf)) - len(tree.prompt_ids) for leaf in tree.leaves())
    rows = pack_tree(tree, trained, max_response_tokens=rng.choice([longest, longest + 10, 1000]))
    for row in rows:
        _check_row_against_paths(tree, row)
    # every trained action is trained exactly once, nothing else ever is
    counts = np.zeros(len(tree.nodes), dtype=int)
    for row in rows:
        for node, m in zip(_nodes(row), row.response_mask, strict=True):
            counts[node] += m
            assert m == 0 or trained[node]
    sizes = [len(n.action.token_ids) if t else 0 for n, t in zip(tree.nodes, trained, strict=True)]
    assert counts[1:].tolist() == sizes[1:]


@pytest.mark.parametrize("seed", range(6))
def test_budget_splits_rows_and_drops_tails(seed):
    rng = random.Random(100 + seed)
    tree = random_tree(rng, CARLConfig(n0=2, n_forks=6, max_actions=4))
    trained = [False] + [True] * (len(tree.nodes) - 1)
    longest = max(len(tree.prefix_ids(leaf)) - len(tree.prompt_ids) for leaf in tree.leaves())
    (whole,) = pack_tree(tree, trained, max_response_tokens=10**6)
    # one row holds every token of the tree except the last observation of each leaf
    leaf_obs = sum(len(tree.nodes[leaf].action.observation_ids) for leaf in tree.leaves() if leaf)
    total = sum(len(n.action.token_ids) + len(n.action.observation_ids) for n in tree.nodes[1:])
    assert len(whole.response_ids) == total - leaf_obs
    split = pack_tree(tree, trained, max_response_tokens=longest)
    assert all(len(r.response_ids) <= longest for r in split)
    assert sum(sum(r.response_mask) for r in split) == sum(whole.response_mask)


def test_nothing_trained_gives_no_row(fig_tree):
    assert pack_tree(fig_tree, [False] * len(fig_tree.nodes), 100) == []


def test_a_path_longer_than_the_budget_is_refused(fig_tree):
    with pytest.raises(TreeError, match="more than the row budget 5: raise data.max_response_length"):
        pack_tree(fig_tree, [False, True, True, True, False, False, False], max_response_tokens=5)


def test_trained_mask_must_fit_the_tree(fig_tree):
    with pytest.raises(TreeError, match="trained has 3 entries for 7 nodes"):
        pack_tree(fig_tree, [False, True, True], 100)
    with pytest.raises(TreeError, match="root is never trained"):
        pack_tree(fig_tree, [True] * 7, 100)


def test_runs_that_would_let_a_token_see_a_sibling_branch_are_refused():
    # prompt(2) | A(1) | B(1) | C(1) with C hanging below A after A's sibling B: as spans, A's subtree would cover
    # B, so B would attend to A. The layout must never produce this, and compute_tree_layout refuses it.
    runs = [[2, -1], [1, 0], [1, 0], [1, 1]]
    with pytest.raises(TreeError, match="run 3 hangs below run 1, which is not on the path of run 2"):
        compute_tree_layout(runs)
    # the same tree in depth-first order is fine, and B does not see A
    position, span_end, _ = compute_tree_layout([[2, -1], [1, 0], [1, 1], [1, 0]])
    mask = compute_tree_attention_mask(torch.as_tensor(span_end))
    assert mask[4].tolist() == [True, True, False, False, True] and position.tolist() == [0, 1, 2, 3, 2]


def test_empty_runs_are_refused():
    with pytest.raises(TreeError, match="run 1 has length 0"):
        compute_tree_layout([[2, -1], [0, 0]])
