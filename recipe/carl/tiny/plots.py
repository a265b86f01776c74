"""The pictures of a CPU run: learning curves with their noise, and one representative rollout tree (PNG files).

    python -m recipe.carl.tiny.plots compare runs/carl runs/grpo -o cmp.png   # overlay runs (CARL vs GRPO)
    python -m recipe.carl.tiny.plots tree runs/carl -o tree.png               # redraw a run's tree picture
    python -m recipe.carl.tiny.plots compare $CKPT_DIR/carl_n08_qwen2.5_7b $CKPT_DIR/grpo_qwen2.5_7b -o cmp.png
    python -m recipe.carl.tiny.plots tree $CKPT_DIR/carl_n08_qwen2.5_7b --data ~/data/carl_search/train.parquet \
        -o tree.png                                                          # a GPU run's checkpoint folder

Both read either layout (`recipe.carl.tiny.run_folder`): a CPU demo's run folder, or a GPU run's checkpoint folder
(`$CKPT_DIR/$EXPERIMENT`, with its `metrics.jsonl` and `carl_trees/`).

Learning curve input (:func:`plot_learning_curves`), one dict per run::

    {"label": "CARL", "step": [0, 10, 20], "actions": [0, 5120, 10240], "accuracy": [0.42, 0.48, 0.55],
     "se": [0.025, 0.025, 0.025]}

``step`` is the training step of each validation, ``actions`` the cumulative number of actions trained (actions that
received a gradient) up to that step, ``accuracy`` the held-out accuracy in [0, 1] and ``se`` (optional) its
standard error, drawn as a band of +-1 se (:mod:`recipe.carl.tiny.noise` says how it is derived). The y-axis is
fixed at 0-100 %, so a change is drawn at its true size against the whole scale, never stretched to fill the panel.

Rollout tree input (:func:`plot_rollout_tree`): one object of the trainer's JSON-lines tree dump (format in
``carl_core/stats.py``): ``{"uid", "question", "n0", "n_forks", "nodes": [{"id", "parent", "depth", "entropy",
"action_entropy", "num_children", "value", "advantage", "trained", "reward", "finish_reason", "num_action_tokens",
"forked", "count", "text"}]}``. ``advantage``, ``trained``, ``count`` and ``text`` describe the action entering a
node; ``entropy`` (the state's) is null on leaves, which carry ``reward``. ``count`` is how often that action was
sampled (identical samples are merged into one node, `algorithm.carl.merge`), and ``advantage`` is what the loss
weighs it with: ``count`` times the per-sample A = V(child) - V(parent) (older dumps have no ``count``: 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on the training machine

import matplotlib.pyplot as plt  # after the backend choice
from matplotlib.colors import Normalize

from recipe.carl.io import atomic_path
from recipe.carl.search.action_space import parse_paper_action
from recipe.carl.search.actions import parse_action
from recipe.carl.search.reward import exact_match, parse_ground_truth
from recipe.carl.tiny.noise import curve_se, validation_size
from recipe.carl.tiny.run_folder import TREE_FOLDERS, gpu_curve, ground_truths, tree_dumps

NODE_KEYS = (
    "id",
    "parent",
    "depth",
    "entropy",
    "action_entropy",
    "num_children",
    "value",
    "advantage",
    "trained",
    "reward",
    "finish_reason",
    "num_action_tokens",
    "forked",
)
"""Keys every node of a tree dump must have (`question` and `text` are optional: older dumps lack them)."""


# ----------------------------------------------------------------------------------------------- learning curves

NOISE_NOTE = "band: ±1 standard error, binomial over the validation's episodes, sqrt(p(1-p)/(n k)); {sizes}"
"""The line under a learning curve (`{sizes}`: each run's validation, `n=... questions x k=... episodes`)."""


def _check_runs(runs: Sequence[Mapping]) -> None:
    if not runs:
        raise ValueError("plot_learning_curves needs at least one run: [{'label', 'step', 'actions', 'accuracy'}].")
    for k, run in enumerate(runs):
        missing = [key for key in ("label", "step", "actions", "accuracy") if key not in run]
        if missing:
            raise ValueError(f"run {k} lacks {missing}; each run is {{'label', 'step', 'actions', 'accuracy'}}.")
        keys = ("step", "actions", "accuracy") + (("se",) if run.get("se") is not None else ())
        lengths = {key: len(run[key]) for key in keys}
        if len(set(lengths.values())) != 1 or lengths["step"] == 0:
            raise ValueError(f"run {run['label']!r}: {'/'.join(keys)} need the same non-zero length, got {lengths}.")
        bad = [a for a in run["accuracy"] if not (isinstance(a, int | float) and 0.0 <= a <= 1.0)]
        if bad:
            raise ValueError(f"run {run['label']!r}: accuracy must be fractions in [0, 1], got {bad[:3]}.")


def plot_learning_curves(
    runs: Sequence[Mapping],
    out: str | os.PathLike,
    sft_start: float | None = None,
    title: str = "Held-out accuracy",
    note: str | None = None,
    budget: str = "trained",
    y_label: str = "accuracy (exact match)",
) -> Path:
    """Held-out accuracy against training step (left) and cumulative actions trained (right), runs overlaid.

    Args:
        runs: one dict per run (see the module docstring); a run with ``se`` gets a +-1 se band.
        out: PNG path (its folder is created).
        sft_start: accuracy of the SFT start all runs share, drawn as a dashed line; None to omit.
        title: figure title.
        note: a line under the panels (e.g. how the band was derived).
        budget: what the runs' ``actions`` count, ``trained`` or ``generated`` (the right panel's axis).
        y_label: the accuracy's name.

    Returns:
        The PNG path.

    Raises:
        ValueError: malformed ``runs`` (the message names the run and the fix).
    """
    _check_runs(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True, layout="constrained")
    for ax, x_key, x_label in ((axes[0], "step", "training step"), (axes[1], "actions", f"actions {budget}")):
        for run in runs:
            (line,) = ax.plot(run[x_key], run["accuracy"], marker="o", markersize=3.5, label=run["label"])
            if run.get("se") is not None:
                low = [max(0.0, a - e) for a, e in zip(run["accuracy"], run["se"], strict=True)]
                high = [min(1.0, a + e) for a, e in zip(run["accuracy"], run["se"], strict=True)]
                ax.fill_between(run[x_key], low, high, color=line.get_color(), alpha=0.18, linewidth=0)
        if sft_start is not None:
            ax.axhline(sft_start, color="0.4", linestyle="--", linewidth=1.2, label=f"SFT start ({sft_start:.1%})")
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0.0, 1.0)  # fixed: a change is drawn at its size on the whole scale
    axes[0].set_ylabel(y_label)
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[1].ticklabel_format(axis="x", style="sci", scilimits=(0, 4))
    axes[1].legend(loc="upper left", fontsize=9)
    fig.suptitle(title)
    if note:
        fig.supxlabel(note, fontsize=8, color="0.3")
    return _save(fig, out)


def run_curve(run_dir: str | os.PathLike, label: str | None = None) -> dict:
    """A run folder's curve for :func:`plot_learning_curves`, from its `summary.json` (with the +-1 se band)."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist; give the folder of a finished demo run (--run-dir).")
    summary = json.loads(path.read_text())
    curve = summary["curve"]
    return {
        "label": label or f"{summary['algo']} (RL seed {summary['config'].get('rl_seed', 0)})",
        "step": curve["step"],
        "actions": curve["actions_trained"],
        "accuracy": curve["accuracy"],
        "se": curve_se(summary),
        "summary": summary,
    }


# ----------------------------------------------------------------------------------------------------- rollout tree


def load_tree_dump(path: str | os.PathLike) -> list[dict]:
    """All trees of a JSON-lines tree dump (one object per line), validated."""
    trees = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not trees:
        raise ValueError(f"{path} holds no trees; expected one JSON object per line.")
    for tree in trees:
        validate_tree(tree)
    return trees


def validate_tree(tree: Mapping) -> None:
    """Check a tree dump object: keys, a single root, parents that exist, depths that match, no cycles.

    Raises:
        ValueError: the first problem found, naming the node and the expected format.
    """
    if not isinstance(tree, Mapping) or not isinstance(tree.get("nodes"), list) or not tree["nodes"]:
        raise ValueError("a tree is {'uid', 'n0', 'n_forks', 'nodes': [...]} with at least one node.")
    ids = set()
    for node in tree["nodes"]:
        missing = [k for k in NODE_KEYS if k not in node]
        if missing:
            raise ValueError(f"tree {tree.get('uid')!r}: node {node.get('id')!r} lacks {missing} (need {NODE_KEYS}).")
        if node["id"] in ids:
            raise ValueError(f"tree {tree.get('uid')!r}: node id {node['id']!r} appears twice.")
        ids.add(node["id"])
    by_id = {n["id"]: n for n in tree["nodes"]}
    roots = [n["id"] for n in tree["nodes"] if n["parent"] is None]
    if len(roots) != 1:
        raise ValueError(f"tree {tree.get('uid')!r}: need exactly one root (parent null), found {roots}.")
    for node in tree["nodes"]:
        parent = node["parent"]
        if parent is not None and parent not in by_id:
            raise ValueError(f"tree {tree.get('uid')!r}: node {node['id']!r} has unknown parent {parent!r}.")
        expected = 0 if parent is None else by_id[parent]["depth"] + 1
        if node["depth"] != expected:
            raise ValueError(
                f"tree {tree.get('uid')!r}: node {node['id']!r} has depth {node['depth']}, expected {expected} "
                "(its parent's depth + 1); a cycle or a wrong parent."
            )


def leaf_correct(tree: Mapping, ground_truth) -> dict:
    """Which leaves answered correctly: the leaf's final action is an `<answer>` that exactly matches the ground
    truth (the reward's exact match, same normalisation). A positive reward is not success: a well-formed wrong
    answer earns the 0.1 format reward.

    Args:
        tree: a tree dump object whose nodes carry `text` (the action entering the node).
        ground_truth: the question's answer(s), in any shape `recipe.carl.search.reward.parse_ground_truth` takes.

    Returns:
        `{leaf id: True/False}`.
    """
    aliases, _ = parse_ground_truth(ground_truth)
    out = {}
    for n in tree["nodes"]:
        if n["reward"] is None:
            continue
        action = parse_action(n.get("text") or "")
        out[n["id"]] = action.kind == "answer" and exact_match(action.answer, aliases) == 1.0
    return out


def tree_stats(tree: Mapping) -> dict:
    """Per-tree numbers the representative-tree rule uses: trained actions, nodes, forks below the root, and
    whether the leaves' rewards differ (if not, every advantage of the tree is 0)."""
    rewards = {n["reward"] for n in tree["nodes"] if n["reward"] is not None}
    return {
        "trained": sum(bool(n["trained"]) for n in tree["nodes"]),
        "nodes": len(tree["nodes"]),
        "forks_below_root": sum(n["forked"] for n in tree["nodes"] if n["parent"] is not None),
        "signal": len(rewards) > 1,
    }


REPRESENTATIVE_RULE = (
    "the median tree by trained actions (ties: by nodes, then dump order) among the step's trees that fork below "
    "the root and whose leaves' rewards differ (all trees where none do)"
)
"""The rule of :func:`representative_tree`, as printed on the picture."""


def representative_tree(trees: Sequence[Mapping]) -> tuple[Mapping, dict]:
    """A typical informative tree of a dump, by :data:`REPRESENTATIVE_RULE`.

    The widest-reward-spread rule it replaces picked the rare trees whose forks were all at the root. Here the
    candidates are the trees that fork below the root and carry a signal (leaf rewards not all equal), if any; among
    them the tree at the median (lower median) of (trained actions, nodes) in that order, dump order breaking ties.

    Returns:
        The tree and `{"candidates", "trees", "rule"}` (how many trees the rule chose among, out of how many).
    """
    if not trees:
        raise ValueError("representative_tree needs at least one tree.")
    stats = [tree_stats(t) for t in trees]
    candidates = [i for i, s in enumerate(stats) if s["forks_below_root"] > 0 and s["signal"]]
    candidates = candidates or list(range(len(trees)))
    ranked = sorted(candidates, key=lambda i: (stats[i]["trained"], stats[i]["nodes"], i))
    chosen = ranked[(len(ranked) - 1) // 2]
    return trees[chosen], {"candidates": len(candidates), "trees": len(trees), "rule": REPRESENTATIVE_RULE}


def tree_layout(nodes: Sequence[Mapping]) -> dict:
    """Layered layout: y = -depth; leaves evenly spaced left to right in depth-first order; a parent centred
    over its children.

    Written by hand because the tree is small and strictly layered: networkx has no tree layout without
    pygraphviz/graphviz (its spring layouts scatter the layers), and ten lines give the classic picture.

    Returns:
        ``{node_id: (x, y)}``.
    """
    children: dict = {n["id"]: [] for n in nodes}
    root = None
    for n in nodes:
        if n["parent"] is None:
            root = n["id"]
        else:
            children[n["parent"]].append(n["id"])
    pos: dict = {}
    next_leaf = [0.0]

    def place(node_id) -> float:  # post-order: children first, so a parent can sit at their mean
        kids = children[node_id]
        if not kids:
            x = next_leaf[0]
            next_leaf[0] += 1.0
        else:
            x = sum(place(k) for k in kids) / len(kids)
        pos[node_id] = x
        return x

    place(root)
    depth = {n["id"]: n["depth"] for n in nodes}
    return {i: (x, -depth[i]) for i, x in pos.items()}


def action_label(text: str | None, width: int = 48) -> str:
    """An action's text in short form, led by its kind: `search <query>`, `access <id>`, `read <part>`,
    `answer <answer>`, or the raw text of an invalid one (the paper's action space's kinds included)."""
    if text is None:
        return "(text not dumped)"
    action = parse_action(text)
    if action.kind == "invalid" and parse_paper_action(text).kind in ("access", "read"):
        action = parse_paper_action(text)
    if action.kind == "search":
        label = f"search {action.query}"
    elif action.kind == "answer":
        label = f"answer {action.answer}"
    elif action.kind == "access":
        label = f"access {action.page}"
    elif action.kind == "read":
        label = "read next part" if action.part is None else f"read part {action.part}"
    else:
        label = f"invalid ({action.reason}): {' '.join(text.split())}"
    return textwrap.shorten(label, width=width, placeholder="...")


LEGEND_NOTE = (
    "Colour: a state's entropy h (mean over the actions sampled from it, after the tree was complete). "
    "Ringed: a fork point. The root's first N0 branches are independent rollouts, not forks, so a branching root "
    "is ringed only if it was also picked to fork. Forks go to the largest h/n at the moment of the pick (n: actions "
    "already sampled there; Eq. 12), among expanded, non-terminal states below T_max, so the state with the highest "
    "h may stay unforked: it had more children, its h rose after the pick, or it could not be forked."
)
"""Why rings and colours need not agree (printed under the tree)."""


def plot_rollout_tree(
    tree: Mapping,
    out: str | os.PathLike,
    title: str | None = None,
    ground_truth=None,
    caption: str | None = None,
    cmap: str = "viridis",
) -> Path:
    """Draw one rollout tree, with its question and the text of every action.

    Nodes are coloured by state entropy (colour bar; leaves, which have none, are white) and numbered; the panel on
    the right lists the action entering each node. Trained (critical) actions are thick orange edges labelled with
    their per-sample advantage (`edge_label`: ``A=+0.50 ×3`` for an action sampled 3 times and merged), the others
    thin and grey (``×m`` when merged); each node shows its value ``V``. With ``ground_truth``, a leaf whose answer
    is an exact match gets a green border and a tick, any other leaf a red border; without it, leaves are not
    marked. Fork points are ringed (``k forks`` when picked k > 1 times). The legend names every mark.

    Args:
        tree: one tree dump object (see the module docstring).
        out: PNG path.
        title: figure title; defaults to the tree's uid and question.
        ground_truth: the question's answer(s), to mark correct leaves; None to leave them unmarked.
        caption: a line added to the note under the tree (e.g. which rule chose it).
        cmap: matplotlib colour map for entropy.

    Returns:
        The PNG path.

    Raises:
        ValueError: malformed tree (see :func:`validate_tree`).
    """
    validate_tree(tree)
    nodes = tree["nodes"]
    pos = tree_layout(nodes)
    correct = leaf_correct(tree, ground_truth) if ground_truth is not None else {}
    entropies = [n["entropy"] for n in nodes if n["entropy"] is not None]
    norm = Normalize(vmin=min(entropies, default=0.0), vmax=max(entropies, default=1.0) + 1e-9)
    colormap = plt.get_cmap(cmap)
    n_leaves = sum(1 for n in nodes if n["num_children"] == 0 and n["parent"] is not None) or 1
    depth = max(n["depth"] for n in nodes)
    width = max(7.0, 0.9 * n_leaves + 2)
    height = max(4.5, 1.3 * depth + 2.5, 0.17 * len(nodes) + 2.5)
    fig, (ax, text_ax) = plt.subplots(
        1, 2, figsize=(width + 4.6, height), width_ratios=[width, 4.6], layout="constrained"
    )

    summed = tree.get("update_set") == "outcome_only"
    for n in nodes:  # edges first, under the nodes
        if n["parent"] is None:
            continue
        (x0, y0), (x1, y1) = pos[n["parent"]], pos[n["id"]]
        trained = bool(n["trained"])
        ax.plot(
            [x0, x1], [y0, y1], color="tab:orange" if trained else "0.7", linewidth=3.2 if trained else 1.0, zorder=1
        )
        label = edge_label(n, summed)
        if label:
            ax.annotate(
                label,
                # Nearer the child than the midpoint: sibling edges leave a fork together and would overlap.
                (x0 + 0.62 * (x1 - x0), y0 + 0.62 * (y1 - y0)),
                fontsize=7,
                color="tab:orange" if trained else "0.35",
                ha="center",
                va="center",
                backgroundcolor="white",
                zorder=2,
            )

    for n in nodes:
        x, y = pos[n["id"]]
        leaf = n["entropy"] is None
        face = "white" if leaf else colormap(norm(n["entropy"]))
        edge = "black"
        if n["id"] in correct:
            edge = "tab:green" if correct[n["id"]] else "tab:red"
        if n["forked"]:
            ax.scatter([x], [y], s=1150, facecolors="none", edgecolors="black", linewidths=1.0, zorder=3)
            if n["forked"] > 1:
                ax.text(x + 0.2, y + 0.25, f"{n['forked']} forks", fontsize=7, ha="left", va="bottom", zorder=5)
        ax.scatter([x], [y], s=800, c=[face], edgecolors=edge, linewidths=2.2 if leaf else 1.0, zorder=4)
        value = "" if n["value"] is None else f"V={n['value']:.2f}"
        text_color = "black" if leaf or norm(n["entropy"]) > 0.5 else "white"
        ax.text(x, y, value, ha="center", va="center", fontsize=7, color=text_color, zorder=5)
        ax.text(x - 0.22, y + 0.22, str(n["id"]), ha="right", va="bottom", fontsize=6, color="0.35", zorder=5)
        if n["reward"] is not None:
            mark = {True: " \u2713", False: " \u2717"}.get(correct.get(n["id"]), "")
            ax.text(x, y - 0.32, f"r={n['reward']:g}{mark}", ha="center", va="top", fontsize=8, color=edge, zorder=5)

    sm = plt.cm.ScalarMappable(norm=norm, cmap=colormap)
    fig.colorbar(sm, ax=ax, shrink=0.8, label="state entropy h (nats per token)", location="left")
    a_label = (
        "trained action, \u03a3z = its summed GRPO-normalised leaf outcomes (outcome_only)"
        if summed
        else "trained (critical) action, A = V(child) \u2212 V(parent) per sample"
    )
    handles = [
        plt.Line2D([], [], color="tab:orange", linewidth=3.2, label=a_label),
        plt.Line2D([], [], color="0.7", linewidth=1.0, label="untrained action"),
        plt.Line2D(
            [],
            [],
            linestyle="",
            label="\u00d7m on an edge: action sampled m times, merged into one node; the loss weighs it m\u00b7A",
        ),  # fmt: skip
        plt.Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markerfacecolor="none",
            markeredgecolor="black",
            markersize=14,
            label="fork point ('k forks': picked k times)",
        ),
        plt.Line2D(
            [], [], linestyle="", label="V: state value (mean of its children's); r: leaf reward; grey number: node id"
        ),  # fmt: skip
    ]
    if ground_truth is not None:
        ring = dict(marker="o", linestyle="", markerfacecolor="white", markeredgewidth=2.2, markersize=11)
        wrong = "leaf: wrong or no answer (r=0.1: format only)"
        handles += [
            plt.Line2D([], [], markeredgecolor="tab:green", label="leaf: correct answer (exact match)", **ring),
            plt.Line2D([], [], markeredgecolor="tab:red", label=wrong, **ring),
        ]
    ax.legend(handles=handles, loc="upper left", fontsize=7, frameon=False)
    xs = [p[0] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(-depth - 0.8, 1.4)
    ax.set_yticks(range(0, -depth - 1, -1), [f"depth {d}" for d in range(depth + 1)])
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)

    lines = [
        f"{n['id']:>3} <- {n['parent']:<3} {action_label(n.get('text'))}" for n in nodes if n["parent"] is not None
    ]
    text_ax.axis("off")
    text_ax.set_title("action entering each node", fontsize=9, loc="left")
    text_ax.text(0.0, 1.0, "\n".join(lines), family="monospace", fontsize=6.5, va="top", ha="left")

    question = tree.get("question") or "(question not dumped)"
    answer = ""
    if ground_truth is not None:
        answer = f"  [answer: {' / '.join(parse_ground_truth(ground_truth)[0])}]"
    heading = title or f"Rollout tree {tree.get('uid', '')}: n0={tree.get('n0')}, forks={tree.get('n_forks')}"
    fig.suptitle(f"{heading}\n{textwrap.shorten(question + answer, 150, placeholder='...')}", fontsize=10)
    note = LEGEND_NOTE + (f" Shown: {caption}." if caption else "")
    fig.supxlabel(textwrap.fill(note, 190), fontsize=7, color="0.3")
    return _save(fig, out)


def edge_label(node: Mapping, summed: bool = False) -> str:
    """The label of the edge into `node`: a trained action's per-sample advantage, and its multiplicity when its node
    merges several samples; an untrained merged action shows its multiplicity only.

    The dump's ``advantage`` is what the loss weighs the action with, ``count`` times the per-sample A (one node
    stands for ``count`` identical samples), so A is shown as ``advantage / count``: an action sampled 3 times from
    V = 0.60 into V = 1.10 reads ``A=+0.50 ×3``, not ``+1.50``. Under ``outcome_only`` the advantage is a sum of
    normalised leaf outcomes, shown as such (``Σz``).
    """
    count = int(node.get("count") or 1)
    times = f" \u00d7{count}" if count > 1 else ""
    if not node["trained"] or node["advantage"] is None:
        return times.strip()
    if summed:
        return f"\u03a3z={node['advantage']:+.2f}{times}"
    return f"A={node['advantage'] / count:+.2f}{times}"


def _save(fig, out: str | os.PathLike) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------ a run's tree


def draw_tree(
    run_dir: Path, out: Path, step: int | None = None, uid: str | None = None, data: Sequence[Path] | None = None
) -> Path | None:
    """A run's tree picture: the representative tree of the last dump (or of `step`, or the tree `uid`), with its
    question, its actions and its correct answers marked (answers from `data`, else the demo's `data/` folder).
    None when the run dumped no trees (GRPO). Reads either layout (`recipe.carl.tiny.run_folder`)."""
    run_dir = Path(run_dir)
    dumps = tree_dumps(run_dir)
    if step is not None:
        dumps = [d for d in dumps if d.name == f"step_{step:06d}.jsonl"]
    if not dumps:
        return None
    trees = load_tree_dump(dumps[-1])
    dump_step = int(dumps[-1].stem.split("_")[1])
    if uid is not None:
        matches = [t for t in trees if t["uid"] == uid]
        if not matches:
            raise SystemExit(f"error: no tree {uid!r} in {dumps[-1]}; its uids: {[t['uid'] for t in trees][:5]}...")
        tree, caption = matches[0], f"tree {uid}, chosen by hand"
    else:
        tree, info = representative_tree(trees)
        caption = f"{info['rule']} ({info['candidates']} of {info['trees']} trees qualified)"
    files = list(data) if data else [run_dir / "data" / f"{split}.parquet" for split in ("train", "test")]
    truth = ground_truths([f for f in files if Path(f).exists()]).get(tree.get("question"))
    title = f"A rollout tree of training step {dump_step} (n0={tree['n0']}, N={tree['n_forks']})"
    return plot_rollout_tree(tree, out, title=title, ground_truth=truth, caption=caption)


# ------------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m recipe.carl.tiny.plots", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="overlay the learning curves of finished demo runs (e.g. CARL vs GRPO)")
    cmp.add_argument("runs", nargs="+", type=Path, help="run folders (each with its summary.json)")
    cmp.add_argument("--label", action="append", help="a label per run, in order (default: algorithm and seed)")
    cmp.add_argument("--metric", default="em", help="GPU runs: the validation metric (default em; f1, score, ...)")
    cmp.add_argument("--budget", choices=sorted(BUDGET_CHOICES), default="trained", help="GPU runs: the right panel's "
                     "actions, trained or generated (carl/total/*)")  # fmt: skip
    cmp.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    tree = sub.add_parser("tree", help="draw a run's representative tree (or one of your choice)")
    tree.add_argument("run", type=Path, help="a demo run folder, or a GPU run's checkpoint folder")
    tree.add_argument("--step", type=int, help="the dump of this step (default: the last)")
    tree.add_argument("--uid", help="this tree instead of the representative one")
    tree.add_argument("--data", type=Path, nargs="+", help="parquet files with the questions' answers (GPU runs)")
    tree.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args(argv)
    if args.command == "compare":
        labels = args.label or []
        if labels and len(labels) != len(args.runs):
            p.error(f"--label given {len(labels)} times for {len(args.runs)} runs: give one per run or none.")
        if not (args.runs[0] / "summary.json").exists() and (args.runs[0] / "metrics.jsonl").exists():
            return compare_gpu_runs(args.runs, labels, args.metric, args.budget, args.out)
        runs = [run_curve(r, labels[i] if labels else None) for i, r in enumerate(args.runs)]
        starts = {run["accuracy"][0] for run in runs}
        summary = runs[0]["summary"]
        k = validation_size(summary)[1]
        path = plot_learning_curves(
            runs,
            args.out,
            sft_start=statistics.mean(starts) if len(starts) == 1 else None,
            title=f"Held-out accuracy, {k} episode(s) per question sampled at T={summary['config']['temperature']}",
            note=runs_note(runs),
        )
    else:
        path = draw_tree(args.run, args.out, step=args.step, uid=args.uid, data=args.data)
        if path is None:
            where = " or ".join(str(args.run / f) for f in TREE_FOLDERS)
            raise SystemExit(
                f"error: no tree dump{f' of step {args.step}' if args.step is not None else ''} in {where}: CARL "
                "dumps its trees every algorithm.carl.dump_every steps; a GRPO run dumps none."
            )
    print(path)
    return path


BUDGET_CHOICES = ("trained", "generated")


def compare_gpu_runs(runs: Sequence[Path], labels: Sequence[str], metric: str, budget: str, out: Path) -> Path:
    """`compare` for checkpoint folders of GPU runs: their validation curves from `metrics.jsonl` (no band: the file
    does not hold the validation's size)."""
    curves = [gpu_curve(r, metric, budget, labels[i] if labels else None) for i, r in enumerate(runs)]
    sources = sorted({s for c in curves for s in c["sources"]})
    path = plot_learning_curves(
        curves,
        out,
        title=f"Validation {metric}: macro average over {len(sources)} data source(s)",
        note=f"data sources: {', '.join(sources)}; no band: give the validation's size with the evaluation",
        budget=budget,
        y_label=f"validation {metric}",
    )
    print(path)
    return path


def runs_note(runs: Sequence[Mapping]) -> str:
    """The line under a curve: what the band is, per run's validation size."""
    sizes = sorted({validation_size(r["summary"]) for r in runs})
    return NOISE_NOTE.format(sizes=", ".join(f"n={n} questions x k={k} episodes" for n, k in sizes))


if __name__ == "__main__":
    main()
