"""Tree statistics for telemetry, the JSON-lines tree dump, and the dump's invariant check.

Dump format, one JSON object per tree::

    {"uid", "n0", "n_forks", "update_set", "value_aggregation",
     "nodes": [{"id", "parent", "depth", "entropy", "action_entropy", "num_children", "value", "advantage",
                "trained", "reward", "finish_reason", "num_action_tokens", "forked"}]}

`advantage`, `trained`, `action_entropy` and `num_action_tokens` describe the action that *enters* the node;
`entropy` is the state's h_hat (mean entropy of the actions sampled from it, null on leaves); `reward` is set on
leaves only; the root has `parent: null`; `forked` counts how often the state was handed out as a fork point.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from carl_core.config import CARLConfig
from carl_core.entropy import compute_state_entropy
from carl_core.tree import RolloutTree
from carl_core.update_set import ScoredTrees


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def compute_tree_stats(trees: Sequence[RolloutTree], scored: ScoredTrees) -> dict[str, float]:
    """Per-batch statistics, keyed for verl's tracker under `carl/`.

    Returns:
        actions generated |D_roll| and trained |D_upd| per tree, leaves per tree, mean depth of fork points, mean
        state entropy at fork points vs at other expanded states, share of generated action tokens trained,
        aborted rollouts, and counts of leaves per finish reason.
    """
    arrays = scored.arrays
    h_hat, n_hat = compute_state_entropy(arrays.parent, arrays.action_entropy, arrays.parent.numel())
    trained = scored.trained.tolist()
    gen_tokens = trained_tokens = 0
    fork_depths: list[float] = []
    h_fork: list[float] = []
    h_other: list[float] = []
    reasons: Counter[str] = Counter()
    for b, tree in enumerate(trees):
        base = arrays.offsets[b]
        forked = set(tree.fork_points)
        for node in tree.nodes:
            if node.action is not None:
                gen_tokens += len(node.action.token_ids)
                trained_tokens += len(node.action.token_ids) if trained[base + node.id] else 0
            if node.terminal:
                reasons[node.finish_reason or "done"] += 1
            elif node.children:
                (h_fork if node.id in forked else h_other).append(float(h_hat[base + node.id]))
        fork_depths += [tree.nodes[s].depth for s in tree.fork_points]
    num_trees = max(len(trees), 1)
    stats = {
        "carl/actions_generated_per_tree": float((arrays.parent >= 0).sum()) / num_trees,
        "carl/actions_trained_per_tree": float(scored.trained.sum()) / num_trees,
        "carl/leaves_per_tree": float(arrays.is_leaf.sum()) / num_trees,
        "carl/fork_depth_mean": _mean(fork_depths),
        "carl/entropy_at_forks": _mean(h_fork),
        "carl/entropy_elsewhere": _mean(h_other),
        "carl/trained_token_fraction": trained_tokens / gen_tokens if gen_tokens else 0.0,
        "carl/aborted_rollouts": float(sum(len(t.aborted) for t in trees)),
        "carl/root_value_mean": float(scored.node_value[arrays.parent < 0].mean()) if len(trees) else float("nan"),
        "carl/advantage_abs_mean": float(scored.advantage[scored.trained].abs().mean())
        if bool(scored.trained.any())
        else 0.0,
    }
    stats.update({f"carl/finish/{reason}": float(count) for reason, count in sorted(reasons.items())})
    # Undefined means (e.g. no state outside the fork points) are left out rather than logged as NaN.
    return {key: value for key, value in stats.items() if not math.isnan(value)}


def tree_records(trees: Sequence[RolloutTree], scored: ScoredTrees, config: CARLConfig) -> list[dict[str, Any]]:
    """One dump object per tree (format in the module docstring)."""
    arrays = scored.arrays
    h_hat, n_hat = compute_state_entropy(arrays.parent, arrays.action_entropy, arrays.parent.numel())
    value, adv, trained = scored.node_value.tolist(), scored.advantage.tolist(), scored.trained.tolist()
    records = []
    for b, tree in enumerate(trees):
        base = arrays.offsets[b]
        forks = Counter(tree.fork_points)
        nodes = []
        for node in tree.nodes:
            g = base + node.id
            h = float(h_hat[g])
            nodes.append(
                {
                    "id": node.id,
                    "parent": node.parent,
                    "depth": node.depth,
                    "entropy": None if math.isnan(h) else h,
                    "action_entropy": None if node.action is None else node.action.entropy,
                    "num_children": int(n_hat[g]),
                    "value": value[g],
                    "advantage": adv[g],
                    "trained": bool(trained[g]),
                    "reward": node.reward if node.terminal else None,
                    "finish_reason": node.finish_reason,
                    "num_action_tokens": 0 if node.action is None else len(node.action.token_ids),
                    "forked": forks.get(node.id, 0),
                }
            )
        records.append(
            {
                "uid": tree.uid,
                "n0": config.n0,
                "n_forks": config.n_forks,
                "update_set": config.update_set,
                "value_aggregation": config.value_aggregation,
                "nodes": nodes,
            }
        )
    return records


def write_jsonl(records: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Writes one JSON object per line, atomically: a reader (or a Ctrl-C) never sees a half-written file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_tree_record(record: dict[str, Any], atol: float = 1e-6) -> None:
    """Raises ValueError naming the first broken invariant of a dumped tree.

    Checked: one root with `parent: null`; rewards on leaves only and leaf value = reward; with `mean` aggregation,
    each inner value is the mean of its children's values; with the `critical` update set, exactly the actions whose
    source state has more than one child are trained, each with advantage V(v) - V(u), all others with 0.
    """
    uid = record.get("uid")
    nodes = {n["id"]: n for n in record["nodes"]}
    roots = [n for n in nodes.values() if n["parent"] is None]
    if len(roots) != 1:
        raise ValueError(f"tree {uid}: {len(roots)} roots (parent null); exactly one expected.")
    kids: dict[int, list[int]] = {i: [] for i in nodes}
    for n in nodes.values():
        if n["parent"] is not None:
            if n["parent"] not in nodes:
                raise ValueError(f"tree {uid}: node {n['id']} has missing parent {n['parent']}.")
            kids[n["parent"]].append(n["id"])
    for i, n in nodes.items():
        if n["num_children"] != len(kids[i]):
            raise ValueError(f"tree {uid}: node {i} says num_children={n['num_children']}, has {len(kids[i])}.")
        if kids[i]:
            if n["reward"] is not None:
                raise ValueError(f"tree {uid}: inner node {i} carries a reward.")
            if record.get("value_aggregation", "mean") == "mean":
                mean = sum(nodes[c]["value"] for c in kids[i]) / len(kids[i])
                if abs(n["value"] - mean) > atol:
                    raise ValueError(f"tree {uid}: V({i})={n['value']} is not the mean of its children ({mean}).")
        else:
            if n["reward"] is None:
                raise ValueError(f"tree {uid}: leaf {i} has no reward.")
            if abs(n["value"] - n["reward"]) > atol:
                raise ValueError(f"tree {uid}: leaf {i} has value {n['value']} != reward {n['reward']}.")
        if n["parent"] is None:
            if n["trained"]:
                raise ValueError(f"tree {uid}: the root is marked trained; only actions (edges) can be.")
            continue
        if record.get("update_set", "critical") == "critical":
            parent = nodes[n["parent"]]
            critical = len(kids[parent["id"]]) > 1
            if n["trained"] != critical:
                raise ValueError(
                    f"tree {uid}: action into node {i} has trained={n['trained']} but its source state has "
                    f"{len(kids[parent['id']])} children (trained iff more than one, Eq. 13)."
                )
            expected = n["value"] - parent["value"] if critical else 0.0
            if abs(n["advantage"] - expected) > atol:
                raise ValueError(f"tree {uid}: A(->{i})={n['advantage']}, expected V(v)-V(u)={expected}.")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
