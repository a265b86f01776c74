"""The two pictures of a CPU run: a learning curve and one rollout tree (matplotlib, Agg backend, PNG files).

Learning curve input (:func:`plot_learning_curves`)::

    runs = [
        {"label": "CARL", "step": [0, 10, 20], "actions": [0, 5120, 10240], "accuracy": [0.42, 0.48, 0.55]},
        {"label": "GRPO", "step": [0, 10, 20], "actions": [0, 14080, 28160], "accuracy": [0.42, 0.45, 0.47]},
    ]

``step`` is the training step of each evaluation, ``actions`` the cumulative number of actions trained (actions
that received a gradient) up to that step, ``accuracy`` the held-out accuracy in [0, 1]; the three lists have the
same length. ``sft_start`` (the accuracy of the SFT checkpoint both runs start from) is drawn as a horizontal line.

Rollout tree input (:func:`plot_rollout_tree`): one object of the project's JSON-lines tree dump::

    {"uid": "q17", "n0": 4, "n_forks": 2,
     "nodes": [{"id": 0, "parent": null, "depth": 0, "entropy": 1.2, "action_entropy": null, "num_children": 2,
                "value": 0.5, "advantage": null, "trained": false, "reward": null, "finish_reason": null,
                "num_action_tokens": 0, "forked": true}, ...]}

The root has ``parent`` null; ``advantage`` and ``trained`` describe the action on the edge entering a node;
``entropy`` (the state's entropy) is null on leaves, which carry ``reward``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on the training machine

import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
from matplotlib.colors import Normalize  # noqa: E402

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
"""Keys every node of a tree dump must have."""


# ----------------------------------------------------------------------------------------------- learning curves


def _check_runs(runs: Sequence[Mapping]) -> None:
    if not runs:
        raise ValueError("plot_learning_curves needs at least one run: [{'label', 'step', 'actions', 'accuracy'}].")
    for k, run in enumerate(runs):
        missing = [key for key in ("label", "step", "actions", "accuracy") if key not in run]
        if missing:
            raise ValueError(f"run {k} lacks {missing}; each run is {{'label', 'step', 'actions', 'accuracy'}}.")
        lengths = {key: len(run[key]) for key in ("step", "actions", "accuracy")}
        if len(set(lengths.values())) != 1 or lengths["step"] == 0:
            raise ValueError(
                f"run {run['label']!r}: step/actions/accuracy need the same non-zero length, got {lengths}."
            )
        bad = [a for a in run["accuracy"] if not (isinstance(a, int | float) and 0.0 <= a <= 1.0)]
        if bad:
            raise ValueError(f"run {run['label']!r}: accuracy must be fractions in [0, 1], got {bad[:3]}.")


def plot_learning_curves(
    runs: Sequence[Mapping],
    out: str | os.PathLike,
    sft_start: float | None = None,
    title: str = "Held-out accuracy",
) -> Path:
    """Held-out accuracy against training step (left) and cumulative actions trained (right).

    Args:
        runs: one dict per run or method (see the module docstring); overlaid with a legend.
        out: PNG path (its folder is created).
        sft_start: accuracy of the SFT starting checkpoint, drawn as a dashed horizontal line; None to omit.
        title: figure title.

    Returns:
        The PNG path.

    Raises:
        ValueError: malformed ``runs`` (the message names the run and the fix).
    """
    _check_runs(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout="constrained")
    for ax, x_key, x_label in ((axes[0], "step", "training step"), (axes[1], "actions", "actions trained")):
        for run in runs:
            ax.plot(run[x_key], run["accuracy"], marker="o", markersize=3.5, label=run["label"])
        if sft_start is not None:
            ax.axhline(sft_start, color="0.4", linestyle="--", linewidth=1.2, label=f"SFT start ({sft_start:.1%})")
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (exact match)")
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[1].ticklabel_format(axis="x", style="sci", scilimits=(0, 4))
    axes[1].legend(loc="best", fontsize=9)
    fig.suptitle(title)
    return _save(fig, out)


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


def plot_rollout_tree(tree: Mapping, out: str | os.PathLike, title: str | None = None, cmap: str = "viridis") -> Path:
    """Draw one rollout tree.

    Nodes are coloured by state entropy (colour bar; leaves, which have none, are white). Edges whose action was
    trained (critical actions) are thick and orange, the others thin and grey; each node shows its value ``V``;
    leaves show their reward ``r`` with a green (reward > 0) or red border; forked nodes get a double outline.

    Args:
        tree: one tree dump object (see the module docstring).
        out: PNG path.
        title: figure title; defaults to the uid and fork counts.
        cmap: matplotlib colour map for entropy.

    Returns:
        The PNG path.

    Raises:
        ValueError: malformed tree (see :func:`validate_tree`).
    """
    validate_tree(tree)
    nodes = tree["nodes"]
    pos = tree_layout(nodes)
    entropies = [n["entropy"] for n in nodes if n["entropy"] is not None]
    norm = Normalize(vmin=min(entropies, default=0.0), vmax=max(entropies, default=1.0) + 1e-9)
    colormap = plt.get_cmap(cmap)
    n_leaves = sum(1 for n in nodes if n["num_children"] == 0 and n["parent"] is not None) or 1
    depth = max(n["depth"] for n in nodes)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * n_leaves + 2), max(3.5, 1.3 * depth + 2)), layout="constrained")

    for n in nodes:  # edges first, under the nodes
        if n["parent"] is None:
            continue
        (x0, y0), (x1, y1) = pos[n["parent"]], pos[n["id"]]
        trained = bool(n["trained"])
        ax.plot(
            [x0, x1], [y0, y1], color="tab:orange" if trained else "0.7", linewidth=3.2 if trained else 1.0, zorder=1
        )
        if n["advantage"] is not None and trained:
            ax.annotate(
                f"A={n['advantage']:+.2f}",
                # Nearer the child than the midpoint: sibling edges leave a fork together and would overlap.
                (x0 + 0.62 * (x1 - x0), y0 + 0.62 * (y1 - y0)),
                fontsize=7,
                color="tab:orange",
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
        if n["reward"] is not None:
            edge = "tab:green" if n["reward"] > 0 else "tab:red"
        if n["forked"]:
            ax.scatter([x], [y], s=1150, facecolors="none", edgecolors="black", linewidths=1.0, zorder=3)
        ax.scatter([x], [y], s=800, c=[face], edgecolors=edge, linewidths=2.2 if leaf else 1.0, zorder=4)
        value = "" if n["value"] is None else f"V={n['value']:.2f}"
        text_color = "black" if leaf or norm(n["entropy"]) > 0.5 else "white"
        ax.text(x, y, value, ha="center", va="center", fontsize=7, color=text_color, zorder=5)
        if n["reward"] is not None:
            ax.text(x, y - 0.32, f"r={n['reward']:g}", ha="center", va="top", fontsize=8, color=edge, zorder=5)

    sm = plt.cm.ScalarMappable(norm=norm, cmap=colormap)
    fig.colorbar(sm, ax=ax, shrink=0.8, label="state entropy (nats)")
    handles = [
        plt.Line2D([], [], color="tab:orange", linewidth=3.2, label="trained (critical) action"),
        plt.Line2D([], [], color="0.7", linewidth=1.0, label="untrained action"),
        plt.Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markerfacecolor="none",
            markeredgecolor="black",
            markersize=14,
            label="forked state",
        ),
    ]
    ax.legend(handles=handles, loc="upper left", fontsize=8, frameon=False)
    xs = [p[0] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(-depth - 0.8, 0.6)
    ax.set_yticks(range(0, -depth - 1, -1), [f"depth {d}" for d in range(depth + 1)])
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    default = f"rollout tree {tree.get('uid', '')}: n0={tree.get('n0')}, forks={tree.get('n_forks')}"
    ax.set_title(title or default)
    return _save(fig, out)


def _save(fig, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out
