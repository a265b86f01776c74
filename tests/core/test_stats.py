"""Telemetry and the JSON-lines tree dump: format, atomic write, and the invariant check catching errors."""

import copy
import json
import random

import pytest

from carl_core import CARLConfig, compute_budget_stats, compute_tree_stats, describe_tree, pack_trees, score_trees
from carl_core import tree_records as records_of
from recipe.carl.io import read_jsonl, write_jsonl

from .conftest import random_tree
from .support import check_tree_record


def tree_records(trees, scored, config):
    return records_of(scored.arrays, scored, config, [describe_tree(t) for t in trees])


def test_stats_of_the_fig_tree(fig_tree):
    fig_tree.fork_points = [1, 0]
    s = score_trees([fig_tree], CARLConfig())
    st = compute_tree_stats(s.arrays, s)
    assert st["carl/actions_generated_per_tree"] == 6 and st["carl/actions_trained_per_tree"] == 4
    assert st["carl/leaves_per_tree"] == 3 and st["carl/fork_depth_mean"] == 0.5
    # Every action has 2 tokens: 4 of 6 actions trained.
    assert st["carl/trained_token_fraction"] == pytest.approx(4 / 6)
    # Fork points 0 and 1 both have h = 0.75; the other expanded states (2, 4) too.
    assert st["carl/entropy_at_forks"] == pytest.approx(0.75)
    assert st["carl/finish/answer"] == 3


def test_budget_per_question(fig_tree):
    """Two questions: q0 has the fig tree (6 actions of 2 tokens, 4 trained), q1 two copies of it."""
    trees = [fig_tree, copy.deepcopy(fig_tree), copy.deepcopy(fig_tree)]
    s = score_trees(trees, CARLConfig())
    st = compute_budget_stats(s.arrays, s.trained, ["q0", "q1", "q1"])
    assert st["carl/questions"] == 2
    assert st["carl/actions_generated_per_question"] == 18 / 2
    assert st["carl/actions_trained_per_question"] == 12 / 2
    assert (st["carl/tokens_generated"], st["carl/tokens_trained"]) == (36, 24)
    everything = score_trees(trees, CARLConfig(update_set="all"))  # GRPO's count: every action is trained
    st = compute_budget_stats(everything.arrays, everything.trained, ["q0", "q1", "q1"])
    assert st["carl/actions_trained_per_question"] == st["carl/actions_generated_per_question"] == 9
    with pytest.raises(ValueError, match="one question per tree"):
        compute_budget_stats(pack_trees(trees), s.trained, ["q0"])


def test_dump_format_round_trip_and_invariants(tmp_path, fig_tree):
    config = CARLConfig()
    s = score_trees([fig_tree], config)
    recs = tree_records([fig_tree], s, config)
    path = tmp_path / "dumps" / "step_1.jsonl"
    write_jsonl(path, recs)
    back = read_jsonl(path)
    assert back == json.loads(json.dumps(recs))
    rec = back[0]
    assert {"uid", "n0", "n_forks", "nodes"} <= set(rec)
    root = rec["nodes"][0]
    assert root["parent"] is None and root["reward"] is None and not root["trained"]
    assert rec["nodes"][3]["reward"] == 1.0 and rec["nodes"][1]["reward"] is None
    check_tree_record(rec)
    assert list(tmp_path.joinpath("dumps").iterdir()) == [path]  # no temp file left behind


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["nodes"][1].__setitem__("value", 0.9), "not the weighted mean|expected count"),
        (lambda r: r["nodes"][3].__setitem__("trained", True), "trained iff more than one"),
        (lambda r: r["nodes"][2].__setitem__("advantage", 0.7), "expected count"),
        (lambda r: r["nodes"][1].__setitem__("reward", 1.0), "inner node 1 carries a reward"),
        (lambda r: r["nodes"][3].__setitem__("reward", 0.0), "leaf 3 has value"),
    ],
)
def test_check_catches_broken_dumps(fig_tree, mutate, message):
    config = CARLConfig()
    rec = copy.deepcopy(tree_records([fig_tree], score_trees([fig_tree], config), config)[0])
    mutate(rec)
    with pytest.raises(ValueError, match=message):
        check_tree_record(rec)


@pytest.mark.parametrize("seed", range(5))
def test_random_trees_pass_the_check(seed):
    rng = random.Random(seed)
    config = CARLConfig(n0=2, n_forks=6, max_actions=4)
    trees = [random_tree(rng, config, uid=str(i)) for i in range(3)]
    for rec in tree_records(trees, score_trees(trees, config), config):
        check_tree_record(rec)


def test_interrupted_write_leaves_old_file_intact(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"a": 1}])

    def records():
        yield {"a": 2}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(path, records())
    assert read_jsonl(path) == [{"a": 1}] and len(list(tmp_path.iterdir())) == 1
