"""The registered `carl` estimator on batches of random trees, against the slow recursive reference of tests/core.

Path: each tree is laid out as the agent loop does (structural update set, `layout_rows`, `describe_tree` on the
first row), the rows are shuffled and padded like a verl batch (padding rows copy a real row's `extra_fields`),
then `carl_batch_from_rows` + `compute_carl_advantage` run once over the whole batch. Every trained token must carry
the reference advantage of its action, every other token 0, and each trained action must be trained in exactly
one row.
"""

import math
import random

import pytest
import torch

from carl_core import CARLConfig, compute_trained_mask, describe_tree, layout_rows
from recipe.carl.estimator import carl_batch_from_rows, compute_carl_advantage
from tests.core.conftest import random_tree
from tests.core.test_reference import reference


def agent_loop_rows(tree, update_set):
    parent = torch.tensor([-1 if n.parent is None else n.parent for n in tree.nodes])
    rows = layout_rows(tree, compute_trained_mask(parent, update_set).tolist())
    extra = [
        {
            "carl_tree_id": tree.uid,
            "carl_token_nodes": r.token_nodes,
            "carl_leaf": r.leaf,
            "carl_tree": describe_tree(tree) if i == 0 else None,
        }
        for i, r in enumerate(rows)
    ]
    return list(zip(rows, extra, strict=True))


@pytest.mark.parametrize("update_set", ["critical", "all", "all_inherit", "outcome_only"])
@pytest.mark.parametrize("aggregation", ["mean", "leaf_weighted"])
@pytest.mark.parametrize("seed", range(6))
def test_estimator_matches_the_recursive_reference(update_set, aggregation, seed):
    rng = random.Random(77 * seed + 3)
    config = CARLConfig(
        n0=rng.randint(1, 4),
        n_forks=rng.randint(1, 10),
        forks_in_flight=rng.randint(1, 3),
        max_actions=rng.randint(2, 5),
        update_set=update_set,
        value_aggregation=aggregation,
    )
    trees = [random_tree(rng, config, uid=f"q{i}_0") for i in range(rng.randint(2, 5))]
    batch = [(t, row, extra) for t in trees for row, extra in agent_loop_rows(t, update_set)]
    rng.shuffle(batch)  # verl reorders rows to balance ranks; a tree's description may come after its other rows
    width = max(len(row.response_ids) for _, row, _ in batch) + 3
    extras = [extra for _, _, extra in batch] + [dict(batch[0][2])] * 2  # two padding rows copying a real one
    uids = [t.uid.rsplit("_", 1)[0] for t, _, _ in batch] + ["pad0", "pad0"]
    mask = torch.zeros(len(extras), width, dtype=torch.long)
    for i, (_, row, _) in enumerate(batch):
        mask[i, : len(row.response_mask)] = torch.tensor(row.response_mask)
    algorithm = {"carl": {"update_set": update_set, "value_aggregation": aggregation, "n0": config.n0}}
    cb = carl_batch_from_rows(extras, uids, width)
    advantages, _ = compute_carl_advantage(torch.zeros(mask.shape), mask, config=algorithm, carl_batch=cb)

    expected = {
        t.uid: reference(
            {n.id: {"parent": n.parent, "reward": n.reward} for n in t.nodes},
            update_set,
            aggregation,
            config.outcome_eps,
        )
        for t in trees
    }
    seen = set()
    for i, (tree, row, _) in enumerate(batch):
        pos = 0
        for node, count in row.token_nodes:
            got = advantages[i, pos : pos + count]
            if node >= 0 and row.response_mask[pos]:
                value, adv, trained = expected[tree.uid][node]
                assert trained and (tree.uid, node) not in seen
                seen.add((tree.uid, node))
                assert all(math.isclose(float(a), adv, abs_tol=1e-5) for a in got)
            else:
                assert got.abs().sum() == 0
            pos += count
        assert advantages[i, pos:].abs().sum() == 0
    assert advantages[len(batch) :].abs().sum() == 0  # padding rows
    trained = {(t.uid, v) for t in trees for v, (_, _, tr) in expected[t.uid].items() if tr}
    assert seen == trained
