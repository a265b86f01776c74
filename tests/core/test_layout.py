"""Laying out verl rows: every trained action exactly once, observations never, rows cut after training.

`flatten_trees` (tests/core/support.py) is the production path: `layout_rows` per tree, then
`compute_token_advantages` over the batch.
"""

import random

import pytest
import torch

from carl_core import CARLConfig, compute_token_advantages, expand_token_nodes, score_trees

from .conftest import build_tree, random_tree
from .support import flatten_trees


def test_fig_tree_rows_by_hand(fig_tree):
    # Tokens: action of node i = [100 i, 100 i + 1], its observation = [900 + i, 950 + i] (conftest.build_tree).
    # Trained (critical): actions 1, 2, 4, 6. Leaves in id order: 3, 5, 6.
    s = score_trees([fig_tree], CARLConfig())
    rows = flatten_trees([fig_tree], s)
    assert [r.leaf for r in rows] == [3, 5, 6]
    # Row for leaf 3 trains a1 and a2, and is cut after a2 (a3 is not trained, obs2 is not needed).
    r = rows[0]
    assert r.response_ids == [100, 101, 901, 951, 200, 201]
    assert r.response_mask == [1, 1, 0, 0, 1, 1]
    assert r.advantages == pytest.approx([-0.25, -0.25, 0, 0, 0.5, 0.5])
    assert r.token_node == [1, 1, -1, -1, 2, 2]
    assert r.rollout_log_probs == pytest.approx([-0.5, -1.0, 0, 0, -0.5, -1.0])
    # Row for leaf 5 carries a1 as context only (already trained in row 1) and trains a4.
    assert rows[1].response_ids == [100, 101, 901, 951, 400, 401]
    assert rows[1].response_mask == [0, 0, 0, 0, 1, 1]
    assert rows[1].advantages == pytest.approx([0, 0, 0, 0, -0.5, -0.5])
    # Row for leaf 6 is the single root fork.
    assert rows[2].response_ids == [600, 601] and rows[2].response_mask == [1, 1]
    assert all(r.prompt_ids == [1, 2, 3] and r.uid == "t" for r in rows)


def test_a_tree_without_trained_actions_has_no_row():
    chain = build_tree([(0, [-1.0], None), (1, [-1.0], 1.0)])  # N = 0 forks: nothing is critical
    assert flatten_trees([chain], score_trees([chain], CARLConfig())) == []


@pytest.mark.parametrize("update_set", ["critical", "all", "all_inherit", "outcome_only"])
@pytest.mark.parametrize("seed", range(6))
def test_every_trained_action_once_and_observations_never(update_set, seed):
    rng = random.Random(seed)
    config = CARLConfig(
        n0=rng.choice([1, 3]),
        n_forks=rng.randint(0, 8),
        forks_in_flight=rng.choice([1, 3]),
        max_actions=rng.randint(1, 5),
        update_set=update_set,
    )
    trees = [random_tree(rng, config, uid=f"u{i}") for i in range(4)]
    s = score_trees(trees, config)
    rows = flatten_trees(trees, s)
    seen = {}
    for r in rows:
        tree = trees[r.tree_index]
        base = s.arrays.offsets[r.tree_index]
        # The row is a prefix of the path to its leaf: actions and observations in order.
        full = []
        for v in tree.path(r.leaf)[1:]:
            full += tree.nodes[v].action.token_ids + tree.nodes[v].action.observation_ids
        assert r.response_ids == full[: len(r.response_ids)]
        for m, a, v in zip(r.response_mask, r.advantages, r.token_node, strict=True):
            if v == -1:
                assert m == 0 and a == 0  # observation tokens are never trained
            elif m:
                assert s.trained[base + v] and a == pytest.approx(float(s.advantage[base + v]))
                seen.setdefault((r.tree_index, v), set()).add(id(r))
        # The row ends with a trained token: nothing is computed after the last trained action.
        assert r.response_mask[-1] == 1
    trained = {
        (b, int(g) - s.arrays.offsets[b])
        for g in torch.nonzero(s.trained).flatten().tolist()
        for b in [int(s.arrays.tree_index[g])]
    }
    assert set(seen) == trained  # every trained action appears with mask 1 ...
    assert all(len(rows_of) == 1 for rows_of in seen.values())  # ... in exactly one row


def test_token_nodes_expand_with_tree_offsets():
    runs = [[[1, 2], [-1, 3], [2, 1]], [], [[0, 1]]]
    out = expand_token_nodes(runs, [10, 0, 5], width=7)
    assert out.tolist() == [[11, 11, -1, -1, -1, 12, -1], [-1] * 7, [5, -1, -1, -1, -1, -1, -1]]
    with pytest.raises(ValueError, match="row 0 has 6 response tokens but the batch is 4 wide"):
        expand_token_nodes(runs[:1], [0], width=4)


def test_a_mask_outside_the_update_set_is_refused(fig_tree):
    s = score_trees([fig_tree], CARLConfig())
    token_node = torch.tensor([[3, 3]])  # a3 is not critical: a row must not train it
    with pytest.raises(ValueError, match="not in the update set"):
        compute_token_advantages(s.advantage, s.trained, token_node, torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="not in the update set"):  # an observation token marked trained
        compute_token_advantages(s.advantage, s.trained, torch.tensor([[-1]]), torch.ones(1, 1, dtype=torch.long))


def test_a_non_finite_advantage_on_a_trained_token_is_refused(fig_tree):
    s = score_trees([fig_tree], CARLConfig())
    node = int(torch.nonzero(s.trained)[0])
    bad = s.advantage.clone()
    bad[node] = float("nan")
    token_node = torch.tensor([[node, node, -1]])
    mask = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="non-finite"):
        compute_token_advantages(bad, s.trained, token_node, mask)
    untrained = torch.tensor([[node, node, -1]])  # the same NaN node on context tokens only is not looked up
    assert torch.all(compute_token_advantages(bad, s.trained, untrained, torch.zeros(1, 3, dtype=torch.long)) == 0)
