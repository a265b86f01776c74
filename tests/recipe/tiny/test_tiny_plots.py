"""The plots write non-empty PNGs from small handmade inputs and refuse malformed ones with a clear message."""

import json

import pandas as pd
import pytest

from recipe.carl.tiny import plots
from recipe.carl.tiny.plots import (
    leaf_correct,
    load_tree_dump,
    plot_learning_curves,
    plot_rollout_tree,
    representative_tree,
    tree_layout,
    validate_tree,
)


def node(i, parent, depth, entropy=None, trained=False, reward=None, value=0.5, children=0, forked=False, text=None):
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
        "text": text,
    }


@pytest.fixture()
def tree():
    # root -> {1, 2}; 1 -> {3, 4} (a fork at a high-entropy state); 2 and 3, 4 are leaves.
    return {
        "uid": "q0",
        "question": "What is the capital of Uldal ?",
        "n0": 2,
        "n_forks": 1,
        "nodes": [
            node(0, None, 0, entropy=0.3, children=2),
            node(
                1,
                0,
                1,
                entropy=1.6,
                trained=True,
                children=2,
                forked=1,
                value=0.5,
                text="<search> Uldal capital </search>",
            ),
            node(2, 0, 1, reward=0.1, value=0.1, text="<answer> Vexven </answer>"),
            node(3, 1, 2, reward=1.1, trained=True, value=1.1, text="<answer> Drein </answer>"),
            node(4, 1, 2, reward=0.0, trained=True, value=0.0, text="<search> Drein </answer>"),
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


def test_success_is_an_exact_match_not_a_positive_reward(tree):
    # Leaf 2 earned the 0.1 format reward for a wrong answer; leaf 4's action is malformed (reward 0).
    assert leaf_correct(tree, {"target": ["Drein"]}) == {2: False, 3: True, 4: False}
    assert leaf_correct(tree, ["vexven"]) == {2: True, 3: False, 4: False}  # the reward's normalisation


def _tree(uid, trained, nodes=5, below_root=True, signal=True):
    """A tree with `trained` trained actions, `nodes` nodes, a fork at depth 1 (or only at the root)."""
    rewards = [1.1, 0.0] if signal else [0.1, 0.1]
    out = [node(0, None, 0, entropy=0.5, children=2, forked=0 if below_root else 1),
           node(1, 0, 1, entropy=0.9, children=2, forked=1 if below_root else 0)]  # fmt: skip
    out += [node(2, 1, 2, reward=rewards[0]), node(3, 1, 2, reward=rewards[1])]
    out += [node(i, 0, 1, reward=0.0) for i in range(4, nodes)]
    for n in out[1 : 1 + trained]:
        n["trained"] = True
    return {"uid": uid, "n0": 2, "n_forks": 1, "nodes": out}


def test_the_representative_tree_is_the_median_of_the_trees_that_fork_below_the_root_with_signal():
    trees = [
        _tree("flat", trained=4, nodes=9, below_root=False),  # widest, most nodes: the old rule's pick
        _tree("no-signal", trained=3, nodes=4, signal=False),
        _tree("a", trained=1),
        _tree("b", trained=3),
        _tree("c", trained=2),
        _tree("d", trained=2, nodes=6),
    ]
    tree, info = representative_tree(trees)
    assert tree["uid"] == "c"  # a(1), c(2, 5 nodes), d(2, 6 nodes), b(3): the lower median
    assert info["candidates"] == 4 and info["trees"] == 6 and "median" in info["rule"]
    # Where no tree qualifies, the rule falls back to all trees.
    flat = [_tree("x", trained=1, below_root=False), _tree("y", trained=3, below_root=False)]
    assert representative_tree(flat)[0]["uid"] == "x" and representative_tree(flat)[1]["candidates"] == 2


def _capture_figure(monkeypatch):
    figures = []

    def save(fig, out):
        figures.append(fig)
        return out

    monkeypatch.setattr(plots, "_save", save)
    return figures


def test_learning_curve_has_a_fixed_axis_and_the_noise_band(tmp_path, monkeypatch):
    figures = _capture_figure(monkeypatch)
    run = {"label": "CARL", "step": [0, 30], "actions": [0, 5000], "accuracy": [0.300, 0.313], "se": [0.023, 0.023]}
    plot_learning_curves([run], tmp_path / "curve.png")
    ax = figures[0].axes[0]
    assert ax.get_ylim() == (0.0, 1.0)  # +1.3 points is drawn as 1.3 % of the panel, not all of it
    bands = [c for c in ax.collections if c.get_paths()]
    assert len(bands) == 1
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(0.300 - 0.023) and max(ys) == pytest.approx(0.313 + 0.023)
    with pytest.raises(ValueError, match="step/actions/accuracy/se need the same non-zero length"):
        plot_learning_curves([{**run, "se": [0.1]}], tmp_path / "bad.png")


def test_the_tree_picture_marks_only_exact_matches(tmp_path, tree, monkeypatch):
    figures = _capture_figure(monkeypatch)
    plot_rollout_tree(tree, tmp_path / "tree.png", ground_truth={"target": ["Drein"]}, caption="by hand")
    ax = figures[0].axes[0]
    labels = {t.get_text(): t.get_color() for t in ax.texts if t.get_text().startswith("r=")}
    assert labels == {"r=0.1 \u2717": "tab:red", "r=1.1 \u2713": "tab:green", "r=0 \u2717": "tab:red"}
    texts = " ".join(t.get_text() for t in figures[0].axes[1].texts)
    assert "search Uldal capital" in texts and "answer Drein" in texts and "invalid (" in texts
    assert "What is the capital of Uldal ?" in figures[0].get_suptitle()
    plot_rollout_tree(tree, tmp_path / "tree2.png")  # no ground truth: no leaf is marked
    assert {t.get_color() for t in figures[1].axes[0].texts if t.get_text().startswith("r=")} == {"black"}


def _run_folder(root, name, algo, acc):
    run = root / name
    run.mkdir()
    summary = {
        "algo": algo,
        "config": {"rl_seed": 0, "temperature": 0.7, "n_test": 100},
        "accuracy_metric": "val-aux/synthhop/em/mean@4",
        "n_questions": 100,
        "episodes_per_question": 4,
        "curve": {"step": [0, 30], "actions_trained": [0, 5000], "accuracy": acc},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_compare_overlays_two_run_folders(tmp_path):
    carl = _run_folder(tmp_path, "carl", "carl", [0.30, 0.36])
    grpo = _run_folder(tmp_path, "grpo", "grpo", [0.30, 0.33])
    out = plots.main(["compare", str(carl), str(grpo), "-o", str(tmp_path / "cmp.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        plots.main(["compare", str(carl), str(grpo), "--label", "only one", "-o", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="summary.json does not exist"):
        plots.main(["compare", str(tmp_path), "-o", str(tmp_path / "x.png")])


def test_tree_command_draws_the_representative_tree_of_a_run(tmp_path, tree):
    run = tmp_path / "run"
    (run / "ckpt" / "carl_trees").mkdir(parents=True)
    (run / "ckpt" / "carl_trees" / "step_000002.jsonl").write_text(json.dumps(tree) + "\n")
    (run / "data").mkdir()
    frame = pd.DataFrame(
        {"extra_info": [{"question": tree["question"]}], "reward_model": [{"ground_truth": {"target": ["Drein"]}}]}
    )
    frame.to_parquet(run / "data" / "train.parquet")
    out = plots.main(["tree", str(run), "-o", str(tmp_path / "tree.png")])
    assert out.stat().st_size > 10_000


# ------------------------------------------------------------------------------------- merged actions (issue 28)
def merged_tree():
    """root (V=0.60) -> 1: a search sampled 3 times (merged), V=1.10, trained with 3 x 0.50 = 1.50 in the loss;
    root -> 2: an answer sampled once, V=0.10, trained with A = 0.10 - 0.60 = -0.50; the root forked twice;
    1 -> 3: a leaf reached 3 times, untrained (node 1 has one child)."""
    nodes = [
        {**node(0, None, 0, entropy=0.9, children=4, value=0.60, forked=2), "count": 1},
        {**node(1, 0, 1, entropy=0.2, trained=True, children=3, value=1.10), "advantage": 1.50, "count": 3},
        {**node(2, 0, 1, reward=0.1, trained=True, value=0.10), "advantage": -0.50, "count": 1},
        {**node(3, 1, 2, reward=1.1, value=1.10), "count": 3},
    ]
    return {"uid": "q1", "question": "Who?", "n0": 2, "n_forks": 2, "update_set": "critical", "nodes": nodes}


@pytest.mark.parametrize(
    ("changes", "summed", "label"),
    [
        ({"trained": True, "advantage": 1.5, "count": 3}, False, "A=+0.50 \u00d73"),  # per sample, and how many
        ({"trained": True, "advantage": -0.25, "count": 1}, False, "A=-0.25"),
        ({"trained": True, "advantage": 0.25}, False, "A=+0.25"),  # a dump from before `count`
        ({"trained": False, "advantage": 0.0, "count": 2}, False, "\u00d72"),
        ({"trained": False, "advantage": 0.0, "count": 1}, False, ""),
        ({"trained": True, "advantage": 1.2, "count": 2}, True, "\u03a3z=+1.20 \u00d72"),  # outcome_only: a sum
    ],
)
def test_edge_labels_give_the_per_sample_advantage_and_the_multiplicity(changes, summed, label):
    assert plots.edge_label({**node(1, 0, 1), **changes}, summed) == label


def test_the_tree_picture_explains_merged_actions_and_repeated_forks(tmp_path, monkeypatch):
    figures = _capture_figure(monkeypatch)
    plot_rollout_tree(merged_tree(), tmp_path / "tree.png")
    ax = figures[0].axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert {"A=+0.50 \u00d73", "A=-0.50", "\u00d73", "2 forks"} <= set(texts)
    assert not any(t.startswith("x") for t in texts)  # the old unexplained "x2"
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    for mark in ("\u00d7m on an edge: action sampled m times", "m\u00b7A", "'k forks': picked k times", "V: state",
                 "r: leaf reward", "node id", "A = V(child) \u2212 V(parent) per sample"):  # fmt: skip
        assert mark in legend


# ------------------------------------------------------------------------------- a GPU run's checkpoint folder
def gpu_run(root, name, lines):
    """$CKPT_DIR/<name> as a GPU run leaves it: metrics.jsonl beside the checkpoints, carl_trees/ under it."""
    run = root / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "data": d}) + "\n" for s, d in lines))
    return run


def val(nq, hotpotqa):
    return {"val-aux/searchR1_nq/em/mean@1": nq, "val-aux/searchR1_hotpotqa/em/mean@1": hotpotqa}


def test_the_tree_command_reads_a_gpu_runs_checkpoint_folder(tmp_path, tree):
    run = gpu_run(tmp_path, "carl_n08_qwen2.5_7b", [(1, {"carl/questions": 2.0})])
    with pytest.raises(SystemExit, match=r"no tree dump in .*carl_trees or .*ckpt/carl_trees: CARL dumps its trees"):
        plots.main(["tree", str(run), "-o", str(tmp_path / "none.png")])  # was: printed None
    (run / "carl_trees").mkdir()
    (run / "carl_trees" / "step_000010.jsonl").write_text(json.dumps(tree) + "\n")
    frame = pd.DataFrame(
        {"extra_info": [{"question": tree["question"]}], "reward_model": [{"ground_truth": {"target": ["Drein"]}}]}
    )
    frame.to_parquet(tmp_path / "train.parquet")
    args = ["tree", str(run), "--data", str(tmp_path / "train.parquet"), "-o", str(tmp_path / "tree.png")]
    assert plots.main(args).stat().st_size > 10_000


def test_compare_reads_the_metrics_file_of_gpu_runs(tmp_path, monkeypatch):
    """Validation at steps 0, 2 (and a resumed run's step 2 line holding both); the macro average over the data
    sources against carl/total/actions_* so far."""
    carl = gpu_run(tmp_path, "carl", [(0, val(0.2, 0.1)), (1, {"carl/total/actions_trained": 30.0}),
                                      (2, {"carl/total/actions_trained": 64.0, **val(0.4, 0.2)})])  # fmt: skip
    grpo = gpu_run(tmp_path, "grpo", [(0, val(0.2, 0.1)), (2, {"carl/total/actions_trained": 500.0, **val(0.3, 0.3)})])
    figures = _capture_figure(monkeypatch)
    plots.main(["compare", str(carl), str(grpo), "-o", str(tmp_path / "cmp.png")])
    right = figures[0].axes[1]
    lines = {line.get_label(): line.get_xydata().ravel().tolist() for line in right.get_lines()}
    assert lines["carl"] == pytest.approx([0.0, 0.15, 64.0, 0.3])  # (actions, macro em) at steps 0 and 2
    assert lines["grpo"] == pytest.approx([0.0, 0.15, 500.0, 0.3])
    assert right.get_xlabel() == "actions trained"
    with pytest.raises(SystemExit, match=r"holds no validation of 'f1' \(it has \['em'\]\)"):
        plots.main(["compare", str(carl), "--metric", "f1", "-o", str(tmp_path / "x.png")])


def test_the_action_panel_names_each_actions_kind_the_papers_included():
    """The tree picture's panel: every action led by its kind, access and read of the paper's action space too."""
    from recipe.carl.tiny.plots import action_label

    assert action_label("<search> Uldal headquarters </search>") == "search Uldal headquarters"
    assert action_label("<access> Uldal </access>") == "access Uldal"
    assert action_label("<read> </read>") == "read next part" and action_label("<read> 2 </read>") == "read part 2"
    assert action_label("<answer> Drein </answer>") == "answer Drein"
    assert action_label("<read> x </read>").startswith("invalid (no_action)")  # not a read in either space
    assert action_label(None) == "(text not dumped)"
