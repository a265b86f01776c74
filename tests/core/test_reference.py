"""The vectorised production code against a slow, independent reference (plain recursion over dicts)."""

import math
import random
import statistics

import pytest

from carl_core import CARLConfig, score_trees

from .conftest import random_tree


def reference(nodes, update_set, aggregation, eps=1e-6):
    """{node: (value, advantage, trained)} of one tree by recursion, written independently of carl_core.

    nodes: {id: {"parent": p, "reward": r or None}}.
    """
    kids = {i: [] for i in nodes}
    for i, n in nodes.items():
        if n["parent"] is not None:
            kids[n["parent"]].append(i)

    def leaves_below(u):
        return [u] if not kids[u] else [x for c in kids[u] for x in leaves_below(c)]

    def value(u):
        if not kids[u]:
            return nodes[u]["reward"]
        if aggregation == "mean":
            return sum(value(c) for c in kids[u]) / len(kids[u])
        return statistics.fmean(nodes[x]["reward"] for x in leaves_below(u))

    rewards = {x: nodes[x]["reward"] for x in leaves_below(0)}
    if len(rewards) == 1:
        z = dict(rewards)
    else:
        mu, sd = statistics.fmean(rewards.values()), statistics.stdev(rewards.values())
        z = {x: (r - mu) / (sd + eps) for x, r in rewards.items()}

    def result(v):
        u = nodes[v]["parent"]
        if u is None:
            return value(v), 0.0, False
        critical = len(kids[u]) > 1
        edge = value(v) - value(u)
        if update_set == "critical":
            return value(v), edge if critical else 0.0, critical
        if update_set == "all":
            return value(v), edge, True
        if update_set == "all_inherit":
            if critical:
                return value(v), edge, True
            return value(v), result(u)[1], True  # the preceding action's advantage (0 before the first)
        return value(v), sum(z[x] for x in leaves_below(v)), True  # outcome_only

    return {v: result(v) for v in nodes}


@pytest.mark.parametrize("update_set", ["critical", "all", "all_inherit", "outcome_only"])
@pytest.mark.parametrize("aggregation", ["mean", "leaf_weighted"])
@pytest.mark.parametrize("seed", range(12))
def test_production_matches_reference(update_set, aggregation, seed):
    rng = random.Random(1000 * seed + 7)
    config = CARLConfig(
        n0=rng.randint(1, 5),
        n_forks=rng.randint(0, 12),
        forks_in_flight=rng.randint(1, 4),
        max_actions=rng.randint(1, 6),
        selection=rng.choice(["density", "random", "entropy"]),
        update_set=update_set,
        value_aggregation=aggregation,
    )
    trees = [random_tree(rng, config, uid=str(i)) for i in range(rng.randint(1, 4))]
    s = score_trees(trees, config)
    dicts = [{n.id: {"parent": n.parent, "reward": n.reward} for n in t.nodes} for t in trees]
    for b, expected in enumerate(reference(d, update_set, aggregation) for d in dicts):
        base = s.arrays.offsets[b]
        for v, (val, adv, trained) in expected.items():
            assert math.isclose(float(s.node_value[base + v]), val, abs_tol=1e-9)
            assert math.isclose(float(s.advantage[base + v]), adv, abs_tol=1e-6)
            assert bool(s.trained[base + v]) == trained
