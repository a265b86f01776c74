"""The plots write non-empty PNGs from small handmade inputs and refuse malformed ones with a clear message."""

import json

import pytest

from recipe.carl.tiny.plots import load_tree_dump, plot_learning_curves, plot_rollout_tree, tree_layout, validate_tree


def node(i, parent, depth, entropy=None, trained=False, reward=None, value=0.5, children=0, forked=False):
    return {
        "id": i,
        "parent": parent,
        "depth": depth,
        "entropy": entropy,
        "action_entropy": None if parent is None else 0.4,
        "num_children": children,
        "value": value,
        "advantage": None if parent is None else (0.25 if trained else 0.0),
        "trained": trained,
        "reward": reward,
        "finish_reason": None if reward is None else "stop",
        "num_action_tokens": 0 if parent is None else 5,
        "forked": forked,
    }


@pytest.fixture()
def tree():
    # root -> {1, 2}; 1 -> {3, 4} (a fork at a high-entropy state); 2 and 3, 4 are leaves.
    return {
        "uid": "q0",
        "n0": 2,
        "n_forks": 1,
        "nodes": [
            node(0, None, 0, entropy=0.3, children=2),
            node(1, 0, 1, entropy=1.6, trained=True, children=2, forked=True, value=0.5),
            node(2, 0, 1, reward=0.0, value=0.0),
            node(3, 1, 2, reward=1.0, trained=True, value=1.0),
            node(4, 1, 2, reward=0.0, trained=True, value=0.0),
        ],
    }


def test_learning_curve_png(tmp_path):
    runs = [
        {"label": "CARL", "step": [0, 10, 20], "actions": [0, 4000, 8000], "accuracy": [0.4, 0.5, 0.6]},
        {"label": "GRPO", "step": [0, 10, 20], "actions": [0, 9000, 18000], "accuracy": [0.4, 0.45, 0.5]},
    ]
    out = plot_learning_curves(runs, tmp_path / "curve.png", sft_start=0.4)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ([], "at least one run"),
        ([{"label": "a", "step": [0], "accuracy": [0.1]}], "lacks \\['actions'\\]"),
        ([{"label": "a", "step": [0, 1], "actions": [0], "accuracy": [0.1, 0.2]}], "same non-zero length"),
        ([{"label": "a", "step": [0], "actions": [0], "accuracy": [45.0]}], "fractions in \\[0, 1\\]"),
    ],
)
def test_learning_curve_refuses_malformed_runs(tmp_path, runs, message):
    with pytest.raises(ValueError, match=message):
        plot_learning_curves(runs, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_tree_layout_is_layered_and_centred(tree):
    pos = tree_layout(tree["nodes"])
    assert [pos[i][1] for i in range(5)] == [0, -1, -1, -2, -2]
    assert pos[1][0] == (pos[3][0] + pos[4][0]) / 2  # a parent sits over its children


def test_rollout_tree_png_from_a_dump_file(tmp_path, tree):
    dump = tmp_path / "trees.jsonl"
    dump.write_text(json.dumps(tree) + "\n" + json.dumps({**tree, "uid": "q1"}) + "\n")
    trees = load_tree_dump(dump)
    assert [t["uid"] for t in trees] == ["q0", "q1"]
    out = plot_rollout_tree(trees[0], tmp_path / "tree.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t["nodes"][3].pop("value"), "lacks \\['value'\\]"),
        (lambda t: t["nodes"][3].update(parent=9), "unknown parent 9"),
        (lambda t: t["nodes"][3].update(depth=5), "expected 2"),
        (lambda t: t["nodes"][1].update(parent=None), "exactly one root"),
        (lambda t: t["nodes"][4].update(id=3), "appears twice"),
        (lambda t: t.update(nodes=[]), "at least one node"),
    ],
)
def test_rollout_tree_refuses_malformed_trees(tmp_path, tree, mutate, message):
    mutate(tree)
    with pytest.raises(ValueError, match=message):
        validate_tree(tree)
    with pytest.raises(ValueError, match=message):
        plot_rollout_tree(tree, tmp_path / "bad.png")


def test_empty_dump_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no trees"):
        load_tree_dump(tmp_path / "empty.jsonl")
