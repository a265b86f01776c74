"""The rollout tree: states are nodes, actions are edges (paper §3; Alg. 1's T), and its compact description.

A node is a state: the token prefix (prompt, then every action and observation on the way down). The edge into a
node is the action that produced it, stored on the node it enters::

    root (prompt)                       node.action = None
     ├── a1 ──> s1  [obs1]              node.action = Action(token_ids=a1, observation_ids=obs1)
     │           ├── a2 ──> s2 (leaf, reward R2)
     │           └── a3 ──> s3 (leaf, reward R3)     s1 has two children: a2 and a3 are critical (Eq. 13)
     └── a4 ──> s4 (leaf, reward R4)

Tool output (`observation_ids`) belongs to the next state and is never trained. A state is a token prefix, so with
`merge=True` an action sampled again, token for token, at the same state (with the same observation after it) joins the
existing child instead of opening a copy of it: `Node.count` is how often the entering action was sampled, and the
rollout goes on below that child. `RolloutTree` is what a rollout grows; `describe_tree` reduces it to what the update
needs (per node: parent, leaf reward, action entropy, ...), a small dict of lists that travels with the training rows,
and `pack_descriptions` turns a batch of descriptions into the node-level tensors (`TreeArrays`) of the vectorised
`compute_*` functions.

Rollouts are numbered in the order the planner starts them, and every sample records its rollout (`Node.sampled_by`).
A rollout that can take no action at a state (an empty generation, a context overflow: the policy ended it) ends in
a *stop*: a terminal child with an empty action there, which has an outcome like any leaf. A state whose only child is
one stop is shown as that leaf itself (Alg. 1's literal tree), in `view` and after `canonicalize`. A rollout that the
environment ended (`NO_OUTCOME_FINISH`) counts nowhere: its samples are `lost` and weigh nothing in values. The tree is
thus a function of the rollouts' trajectories, not of the order in which concurrent rollouts happened to finish, and
`canonicalize` numbers its nodes by (first rollout, depth) so that two runs give the same ids.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from carl_core.entropy import action_entropy

NO_OUTCOME_FINISH = ("tool_error",)
"""Finish reasons (before any `:detail`) of leaves the environment ended, not the policy: no outcome, no value."""
CLOSED_FINISH = ("context_overflow",)
"""Stops after which no action can be sampled at that state at all (its prefix fills the context): never forked."""


def has_outcome(finish_reason: str | None) -> bool:
    return (finish_reason or "").split(":")[0] not in NO_OUTCOME_FINISH


class TreeError(ValueError):
    """A rollout tree is malformed; the message names the node and the problem."""


@dataclass
class Action:
    """One agent turn (think + tool call or answer): the edge from a state to the next one."""

    token_ids: list[int]  # sampled tokens of the action (these, and only these, can be trained)
    log_probs: list[float]  # log pi(a_j | prefix) of each sampled token, as the inference engine returned it
    observation_ids: list[int] = field(default_factory=list)  # tool output appended after it; never trained
    entropy: float = float("nan")  # h(a), Eq. 8; computed from `log_probs` when not given
    info: dict[str, Any] = field(default_factory=dict)  # metadata (kind, query, text) that `describe_tree` can copy

    def __post_init__(self) -> None:
        if math.isnan(self.entropy):
            self.entropy = action_entropy(self.log_probs)


@dataclass
class Node:
    """A state of the tree."""

    id: int
    parent: int | None
    depth: int  # actions between the root and this state
    action: Action | None = None  # the action that enters this node (None for the root)
    children: list[int] = field(default_factory=list)
    terminal: bool = False
    finish_reason: str | None = None  # why a leaf ended: `answer`, `max_actions`, `invalid:<reason>`, `tool_error`
    reward: float | None = None  # outcome reward R, on leaves only
    count: int = 1  # how often the entering action was sampled at the parent (> 1 only when identical ones merge)
    sampled_by: list[int] = field(default_factory=list)  # the rollout of each sample (empty: built by hand)
    lost: int = 0  # samples whose rollout the environment ended (no outcome): they weigh nothing (set by `view`)

    @property
    def is_stop(self) -> bool:
        """A leaf entered by an empty action: a rollout that could take no action at the parent state."""
        return self.action is not None and not self.action.token_ids


class RolloutTree:
    """A CARL rollout tree for one prompt, grown one action at a time by a driver (see `carl_core.forking`)."""

    def __init__(self, prompt_ids: Sequence[int], max_actions: int, uid: str = "", merge: bool = False) -> None:
        if max_actions < 1:
            raise TreeError(f"max_actions={max_actions} must be >= 1.")
        self.uid, self.merge = uid, merge
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.max_actions = max_actions
        self.nodes: list[Node] = [Node(id=0, parent=None, depth=0)]
        self.fork_points: list[int] = []  # states handed out as fork points, in order (Alg. 1, line 6)
        self.rollout_start: list[int] = []  # per rollout, in start order: the state it started from
        self.rollout_leaf: list[int | None] = []  # ... and the leaf it ended in (None while it runs)

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def add_action(
        self,
        parent_id: int,
        token_ids: Sequence[int],
        log_probs: Sequence[float],
        observation_ids: Sequence[int] = (),
        *,
        done: bool = False,
        finish_reason: str | None = None,
        info: dict[str, Any] | None = None,
        rollout: int | None = None,
    ) -> int:
        """Appends the action sampled at `parent_id` (by `rollout`, if given); returns the id of the state it enters.

        The new state is terminal when `done` is set (answer, invalid action, tool error, ...) or when it is the
        T_max-th action of its trajectory (`finish_reason="max_actions"`). With `merge`, an action equal to an existing
        child's (tokens, observation, end) is counted on that child, whose id is returned.
        """
        parent = self._node(parent_id)
        if parent.terminal:
            raise TreeError(f"node {parent_id} is terminal ({parent.finish_reason}); no action can be taken from it.")
        if len(token_ids) == 0:
            raise TreeError(f"empty action at node {parent_id}: a rollout that takes no action ends with `stop`.")
        if len(log_probs) != len(token_ids):
            raise TreeError(f"action at node {parent_id} has {len(token_ids)} tokens but {len(log_probs)} log-probs; "
                            "return one log-prob per sampled token (vLLM: logprobs=0).")  # fmt: skip
        if bad := [lp for lp in log_probs if not math.isfinite(lp) or lp > 1e-4]:
            raise TreeError(f"action at node {parent_id} has invalid log-probs {bad[:3]} (NaN, inf or > 0): "
                            "log-probs of sampled tokens must be finite and <= 0.")  # fmt: skip
        action = Action(
            token_ids=[int(t) for t in token_ids],
            log_probs=[float(lp) for lp in log_probs],
            observation_ids=[int(t) for t in observation_ids],
            info=dict(info or {}),
        )
        child = Node(id=len(self.nodes), parent=parent_id, depth=parent.depth + 1, action=action)
        if done:
            child.terminal, child.finish_reason = True, finish_reason or "done"
        elif child.depth >= self.max_actions:
            child.terminal, child.finish_reason = True, "max_actions"
        return self._attach(parent, child, rollout)

    def stop(self, node_id: int, finish_reason: str, rollout: int | None = None) -> int:
        """Ends a rollout at a state where it could take no action (an empty generation, a context overflow): a stop
        child with an empty action (a leaf with an outcome; merged with a stop of the same reason under `merge`).
        Returns its id."""
        parent = self._node(node_id)
        if parent.terminal:
            raise TreeError(f"node {node_id} is terminal ({parent.finish_reason}); no rollout can stop there.")
        child = Node(len(self.nodes), node_id, parent.depth + 1, Action([], [], entropy=0.0), terminal=True)
        child.finish_reason = finish_reason
        return self._attach(parent, child, rollout)

    def _attach(self, parent: Node, child: Node, rollout: int | None) -> int:
        action = child.action
        assert action is not None
        for twin in (self.nodes[c] for c in parent.children) if self.merge else ():
            old = twin.action
            assert old is not None
            same_end = (twin.terminal, twin.finish_reason) == (child.terminal, child.finish_reason)
            if same_end and (old.token_ids, old.observation_ids) == (action.token_ids, action.observation_ids):
                if rollout is not None and twin.sampled_by and rollout < min(twin.sampled_by):
                    twin.action = action  # the first rollout's sample (its log-probs), whichever ran first
                twin.count += 1
                twin.sampled_by += [] if rollout is None else [rollout]
                return twin.id
        child.sampled_by = [] if rollout is None else [rollout]
        self.nodes.append(child)
        parent.children.append(child.id)
        return child.id

    def terminate(self, node_id: int, finish_reason: str) -> None:
        """Ends the tree at a state before any rollout (e.g. a prompt longer than the prompt budget)."""
        node = self._node(node_id)
        if node.children:
            raise TreeError(f"node {node_id} already has children and cannot become a leaf ({finish_reason}).")
        node.terminal, node.finish_reason = True, finish_reason

    def set_reward(self, node_id: int, reward: float) -> None:
        """Sets the outcome reward of a leaf."""
        node = self._node(node_id)
        if not node.terminal:
            raise TreeError(f"reward {reward} given to inner node {node_id}: rewards belong to leaves only (Alg. 2).")
        if not math.isfinite(reward):
            raise TreeError(f"reward of leaf {node_id} is {reward}; rewards must be finite numbers.")
        node.reward = float(reward)

    def _node(self, node_id: int) -> Node:
        if not 0 <= node_id < len(self.nodes):
            raise TreeError(f"node {node_id} does not exist (the tree has {len(self.nodes)} nodes).")
        return self.nodes[node_id]

    def leaves(self) -> list[int]:
        return [n.id for n in self.nodes if n.terminal]

    def start_rollout(self, start: int) -> int:
        """Registers a rollout from state `start`; returns its number (rollouts are numbered in start order)."""
        self.rollout_start.append(self._node(start).id)
        self.rollout_leaf.append(None)
        return len(self.rollout_start) - 1

    def end_rollout(self, rollout: int, leaf: int) -> None:
        if not self._node(leaf).terminal or self.rollout_leaf[rollout] is not None:
            raise TreeError(f"rollout {rollout} cannot end at node {leaf}: not a leaf, or the rollout already ended.")
        self.rollout_leaf[rollout] = leaf

    def view(self, rollouts: set[int] | None = None) -> tuple[RolloutTree, list[int]]:
        """The tree that the given rollouts alone (all that ended: None) grew, stops folded, in canonical order.

        A node is in the view when one of its samples is (the root, and nodes built by hand, always are); its count
        is the view's samples, `lost` those whose rollout ended without an outcome. A state whose only child is one
        stop becomes that leaf. Nodes are numbered by (the first rollout that sampled them, depth), so the view does
        not depend on the order in which concurrent rollouts happened to run.

        Returns:
            The view (without rollout records) and, per view node, the id of the node it shows.
        """
        ended = {r: leaf for r, leaf in enumerate(self.rollout_leaf) if leaf is not None}
        keep = set(ended) if rollouts is None else rollouts
        failed = {r for r, leaf in ended.items() if not has_outcome(self.nodes[leaf].finish_reason)}
        own = {n.id: [r for r in n.sampled_by if r in keep] for n in self.nodes}
        shown = [n for n in self.nodes if n.parent is None or not n.sampled_by or own[n.id]]
        kids = Counter(n.parent for n in shown)
        folded = {n.parent: n for n in shown if n.is_stop and kids[n.parent] == 1}  # state -> its only child, a stop
        stops = {n.id for n in folded.values()}
        order = sorted(
            (n for n in shown if n.id not in stops), key=lambda n: (min(own[n.id], default=-1), n.depth, n.id)
        )
        new_id = {n.id: i for i, n in enumerate(order)}
        view = RolloutTree(self.prompt_ids, self.max_actions, self.uid, self.merge)
        view.nodes = []
        for n in order:
            end, mine = folded.get(n.id, n), own[n.id]
            parent = None if n.parent is None else new_id[n.parent]
            copy = Node(new_id[n.id], parent, n.depth, n.action, [], end.terminal, end.finish_reason, end.reward)
            copy.count, copy.sampled_by = (len(mine), mine) if n.sampled_by else (n.count, [])
            copy.lost = sum(r in failed for r in mine) if n.sampled_by else n.lost
            view.nodes.append(copy)
            if parent is not None:
                view.nodes[parent].children.append(copy.id)
        view.fork_points = [new_id[s] for s in self.fork_points if s in new_id]
        return view, [n.id for n in order]

    def canonicalize(self) -> dict[int, int]:
        """Replaces the nodes by `view()` of every rollout (stops folded, canonical ids, `lost` counted); returns old
        id -> new id (a folded stop maps to its state). Rollout records and fork points carry over."""
        view, ids = self.view()
        mapping = {old: new for new, old in enumerate(ids)}
        for node in self.nodes:
            if node.id not in mapping and node.parent is not None:  # a folded stop: the state it ended at
                mapping[node.id] = mapping[node.parent]
        self.nodes, self.fork_points = view.nodes, view.fork_points
        self.rollout_start = [mapping[s] for s in self.rollout_start]
        self.rollout_leaf = [None if leaf is None else mapping[leaf] for leaf in self.rollout_leaf]
        return mapping

    def path(self, node_id: int) -> list[int]:
        """Node ids from the root down to `node_id` (both included)."""
        out = [node_id]
        while (parent := self._node(out[-1]).parent) is not None:
            out.append(parent)
        return out[::-1]

    def prefix_ids(self, node_id: int) -> list[int]:
        """The state's tokens: the prompt, then each action and its observation down to `node_id`."""
        ids = list(self.prompt_ids)
        for nid in self.path(node_id)[1:]:
            action = self.nodes[nid].action
            assert action is not None
            ids += action.token_ids + action.observation_ids
        return ids

    def validate(self) -> None:
        """Raises `TreeError` naming the first structural problem: what Alg. 2 needs to back values up."""
        for i, node in enumerate(self.nodes):
            if node.id != i or (node.parent is None) != (i == 0) or (node.parent is not None and node.parent >= i):
                raise TreeError(f"node {i} (id {node.id}, parent {node.parent}): ids must be 0..n-1 in order, "
                                "the root is node 0 and every parent precedes its children.")  # fmt: skip
            kids = [c for c in node.children if self.nodes[c].parent == i]
            if len(kids) != len(node.children):
                raise TreeError(f"node {i} lists children {node.children} whose parent links disagree.")
            if node.parent is not None:
                if node.action is None or not (node.action.token_ids or node.terminal):
                    raise TreeError(f"node {i} has an empty action: only a stop (a leaf) has no sampled tokens.")
                if node.depth != self.nodes[node.parent].depth + 1 or i not in self.nodes[node.parent].children:
                    raise TreeError(f"node {i} is not a proper child of node {node.parent}.")
            if node.terminal == bool(node.children):
                what = "is terminal but has children" if node.terminal else "is neither terminal nor expanded"
                raise TreeError(f"node {i} {what}: every trajectory must end in exactly one leaf.")
            if not isinstance(node.count, int) or node.count < 1 or (node.parent is None and node.count != 1):
                raise TreeError(f"node {i} has count {node.count}: an action is sampled >= 1 times, the root once.")
            if not 0 <= node.lost <= node.count:
                raise TreeError(f"node {i} lost {node.lost} of its {node.count} samples: between 0 and the count.")
            if node.terminal != (node.reward is not None):
                what = f"leaf {i} ({node.finish_reason}) has no reward" if node.terminal else f"inner node {i} has one"
                raise TreeError(f"{what}: rewards belong to leaves, and every leaf needs one.")


def describe_tree(tree: RolloutTree, info_keys: Sequence[str] = ()) -> dict[str, Any]:
    """The tree as the update needs it: one entry per node in each list, plus the fork points.

    Keys: `uid`; `parent` (-1 at the root); `reward` (leaves); `entropy` (h of the entering action), `tokens` (its
    length), `count` (its samples) and `lost` (those whose rollout had no outcome); `finish` (leaves' finish
    reasons); `forks` (fork points in pick order); and per key of `info_keys`, that key of each node's `Action.info`.
    """
    tree.validate()
    nodes = tree.nodes
    return {
        "uid": tree.uid,
        "parent": [-1 if n.parent is None else n.parent for n in nodes],
        "reward": [n.reward for n in nodes],
        "entropy": [None if n.action is None else n.action.entropy for n in nodes],
        "tokens": [0 if n.action is None else len(n.action.token_ids) for n in nodes],
        "count": [n.count for n in nodes],
        "lost": [n.lost for n in nodes],
        "finish": [n.finish_reason for n in nodes],
        "forks": list(tree.fork_points),
        **{key: [None if n.action is None else n.action.info.get(key) for n in nodes] for key in info_keys},
    }


@dataclass
class TreeArrays:
    """A batch of trees as node-level tensors [each shape: (num_nodes,)], tree b's nodes after tree b-1's. `parent`
    is -1 at roots and a parent's global id is smaller than its children's: a pass in id order is top-down."""

    parent: torch.Tensor
    depth: torch.Tensor
    is_leaf: torch.Tensor
    has_outcome: torch.Tensor  # leaves whose reward enters the backup (not ended by the environment: NO_OUTCOME_FINISH)
    reward: torch.Tensor  # leaf reward (float64), 0 on inner nodes
    tree_index: torch.Tensor
    action_entropy: torch.Tensor  # h(a) of the entering action (float64), NaN at roots
    num_tokens: torch.Tensor  # tokens of the entering action, 0 at roots
    count: torch.Tensor  # how often the entering action was sampled (1 at roots; > 1 for merged identical actions)
    lost: torch.Tensor  # of those samples, the ones whose rollout the environment ended (no outcome)
    forked: torch.Tensor  # how often each state was handed out as a fork point
    offsets: list[int]  # global id of each tree's root
    finish: list[str | None]  # finish reason of each node (leaves only)

    @property
    def num_trees(self) -> int:
        return len(self.offsets)

    @property
    def weight(self) -> torch.Tensor:
        """Samples with an outcome, `count - lost`: a child's weight in its parent's value and in the loss."""
        return self.count - self.lost


def pack_descriptions(descriptions: Sequence[dict[str, Any]]) -> TreeArrays:
    """Concatenates `describe_tree` outputs into `TreeArrays`, checking the structure Alg. 2 relies on (a
    description without `count`, e.g. from an older dump, counts every action once)."""
    parent: list[int] = []
    offsets: list[int] = []
    for b, d in enumerate(descriptions):
        offsets.append(len(parent))
        n = len(d["parent"])
        if not n or d["parent"][0] != -1 or any(not 0 <= p < i for i, p in enumerate(d["parent"][1:], start=1)):
            raise TreeError(f"tree {d.get('uid', b)!r}: parents must be -1 for node 0, else an earlier node.")
        for key in ("reward", "entropy", "tokens", "finish"):
            if len(d[key]) != n:
                raise TreeError(f"tree {d.get('uid', b)!r}: {len(d[key])} values of {key!r} for {n} nodes.")
        parent += [p + offsets[-1] if p >= 0 else -1 for p in d["parent"]]
    parent_t = torch.tensor(parent, dtype=torch.long)
    depth = [0] * len(parent)
    for i, p in enumerate(parent):  # parents precede children: one pass in id order
        depth[i] = depth[p] + 1 if p >= 0 else 0
    reward, sizes = [r for d in descriptions for r in d["reward"]], [len(d["parent"]) for d in descriptions]
    entropy = [math.nan if h is None else h for d in descriptions for h in d["entropy"]]
    count = [c for d in descriptions for c in d.get("count") or [1] * len(d["parent"])]
    lost = [x for d in descriptions for x in d.get("lost") or [0] * len(d["parent"])]
    if len(count) != len(parent) or min(count, default=1) < 1:
        raise TreeError("`count` needs one integer >= 1 per node in every description.")
    if len(lost) != len(parent) or any(not 0 <= x <= c for x, c in zip(lost, count, strict=True)):
        raise TreeError("`lost` needs one integer per node, between 0 and the node's count, in every description.")
    forked = [0] * len(parent)
    for base, d in zip(offsets, descriptions, strict=True):
        for s in d["forks"]:
            forked[base + s] += 1
    finish = [f for d in descriptions for f in d["finish"]]
    is_leaf = [r is not None for r in reward]
    outcome = [leaf and has_outcome(f) for leaf, f in zip(is_leaf, finish, strict=True)]
    return TreeArrays(
        parent=parent_t,
        depth=torch.tensor(depth, dtype=torch.long),
        is_leaf=torch.tensor(is_leaf, dtype=torch.bool),
        has_outcome=torch.tensor(outcome, dtype=torch.bool),
        reward=torch.tensor([0.0 if r is None else r for r in reward], dtype=torch.float64),
        tree_index=torch.repeat_interleave(torch.arange(len(descriptions)), torch.tensor(sizes, dtype=torch.long)),
        action_entropy=torch.tensor(entropy, dtype=torch.float64),
        num_tokens=torch.tensor([t for d in descriptions for t in d["tokens"]], dtype=torch.long),
        count=torch.tensor(count, dtype=torch.long),
        lost=torch.tensor(lost, dtype=torch.long),
        forked=torch.tensor(forked, dtype=torch.long),
        offsets=offsets,
        finish=finish,
    )


def pack_trees(trees: Sequence[RolloutTree]) -> TreeArrays:
    """`pack_descriptions` of finished trees (each is validated)."""
    return pack_descriptions([describe_tree(t) for t in trees])
