"""The rollout tree: states are nodes, actions are edges (paper §3; Alg. 1's T).

A node is a state: the token prefix (prompt, then every action and observation on the way down). The edge into a
node is the action that produced it, stored on the node it enters::

    root (prompt)                       node.action = None
     ├── a1 ──> s1  [obs1]              node.action = Action(token_ids=a1, observation_ids=obs1)
     │           ├── a2 ──> s2 (leaf, reward R2)
     │           └── a3 ──> s3 (leaf, reward R3)     s1 has two children: a2 and a3 are critical (Eq. 13)
     └── a4 ──> s4 (leaf, reward R4)

Tool output (`observation_ids`) belongs to the next state and is never trained. Nodes are plain dataclasses linked by
integer ids, so a tree serialises to JSON and travels through verl's `non_tensor_batch` as a dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from carl_core.entropy import action_entropy


class TreeError(ValueError):
    """A rollout tree is malformed; the message names the node and the problem."""


@dataclass
class Action:
    """One agent turn (think + tool call or answer): the edge from a state to the next one."""

    token_ids: list[int]
    """Sampled tokens of the action (these, and only these, can be trained)."""
    log_probs: list[float]
    """log pi(a_j | prefix) of each sampled token, as the inference engine returned it."""
    observation_ids: list[int] = field(default_factory=list)
    """Tokens the environment appended after the action (tool output, chat-template glue); never trained."""
    entropy: float = float("nan")
    """h(a), Eq. 8: length-normalised negative log-probability; filled from `log_probs` when not given."""
    info: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata (action kind, tool status, text) kept in dumps; never read by the algorithm."""

    def __post_init__(self) -> None:
        if math.isnan(self.entropy):
            self.entropy = action_entropy(self.log_probs) if self.token_ids else float("nan")


@dataclass
class Node:
    """A state of the tree."""

    id: int
    parent: int | None
    depth: int
    """Number of actions between the root and this state."""
    action: Action | None = None
    """The action that enters this node (None for the root)."""
    children: list[int] = field(default_factory=list)
    terminal: bool = False
    finish_reason: str | None = None
    """Why a leaf ended: e.g. `answer`, `max_actions`, `invalid_action`, `tool_error`, `context_overflow`."""
    reward: float | None = None
    """Outcome reward R; set on leaves only."""


class RolloutTree:
    """A CARL rollout tree for one prompt, grown one action at a time by a driver (see `carl_core.forking`)."""

    def __init__(self, prompt_ids: Sequence[int], max_actions: int, uid: str = "") -> None:
        if max_actions < 1:
            raise TreeError(f"max_actions={max_actions} must be >= 1.")
        self.uid = uid
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.max_actions = max_actions
        self.nodes: list[Node] = [Node(id=0, parent=None, depth=0)]
        self.fork_points: list[int] = []
        """States handed out as fork points, in order (Alg. 1, line 6), for telemetry."""
        self.aborted: list[dict[str, Any]] = []
        """Rollouts that ended without a leaf (their start state already had children), with the reason."""

    # ----------------------------------------------------------------------------------------------- growing
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
    ) -> int:
        """Appends the action sampled at `parent_id` and returns the id of the state it leads to.

        The new state is terminal when `done` is set (answer, invalid action, tool error, ...) or when it is the
        T_max-th action of its trajectory (`finish_reason="max_actions"`).
        """
        parent = self._node(parent_id)
        if parent.terminal:
            raise TreeError(f"node {parent_id} is terminal ({parent.finish_reason}); no action can be taken from it.")
        if len(token_ids) == 0:
            raise TreeError(f"empty action at node {parent_id}: an action needs at least one sampled token.")
        if len(log_probs) != len(token_ids):
            raise TreeError(
                f"action at node {parent_id} has {len(token_ids)} tokens but {len(log_probs)} log-probs; "
                "return one log-prob per sampled token (vLLM: logprobs=0)."
            )
        bad = [lp for lp in log_probs if not math.isfinite(lp) or lp > 1e-4]
        if bad:
            raise TreeError(
                f"action at node {parent_id} has invalid log-probs {bad[:3]} (NaN, inf or > 0): "
                "log-probs of sampled tokens must be finite and <= 0."
            )
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
        self.nodes.append(child)
        parent.children.append(child.id)
        return child.id

    def terminate(self, node_id: int, finish_reason: str) -> None:
        """Ends a trajectory at a state where no action could be taken (e.g. the prefix overflows the context)."""
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

    # ----------------------------------------------------------------------------------------------- reading
    def _node(self, node_id: int) -> Node:
        if not 0 <= node_id < len(self.nodes):
            raise TreeError(f"node {node_id} does not exist (the tree has {len(self.nodes)} nodes).")
        return self.nodes[node_id]

    def leaves(self) -> list[int]:
        return [n.id for n in self.nodes if n.terminal]

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

    def state_entropy(self, node_id: int) -> tuple[float, int]:
        """(h_hat, n_hat) of a state: the mean entropy of the actions sampled from it and their count (Alg. 1)."""
        children = self._node(node_id).children
        if not children:
            return float("nan"), 0
        ents = [self.nodes[c].action.entropy for c in children]  # type: ignore[union-attr]
        return sum(ents) / len(ents), len(ents)

    def validate(self) -> None:
        """Raises `TreeError` naming the first structural problem: what Alg. 2 needs to back values up."""
        n = len(self.nodes)
        for i, node in enumerate(self.nodes):
            if node.id != i:
                raise TreeError(f"node at position {i} has id {node.id}; ids must be 0..{n - 1} in order.")
            if (node.parent is None) != (i == 0):
                raise TreeError(f"node {i}: only node 0 is the root (parent null); found parent={node.parent}.")
            if node.parent is not None and not 0 <= node.parent < n:
                raise TreeError(f"node {i} has parent {node.parent}, which does not exist.")
        reaches_root = [False] * n  # every node must reach the root: no cycle
        reaches_root[0] = True
        for node in self.nodes:
            seen, cur = [], node
            while not reaches_root[cur.id]:
                if cur.id in seen:
                    raise TreeError(f"cycle through node {cur.id}: parent links must lead to the root.")
                seen.append(cur.id)
                cur = self.nodes[cur.parent]  # type: ignore[index]
            for nid in seen:
                reaches_root[nid] = True
        kids_of: dict[int, list[int]] = {i: [] for i in range(n)}
        for node in self.nodes:
            if node.parent is not None:
                kids_of[node.parent].append(node.id)
        for node in self.nodes:
            kids = kids_of[node.id]
            if sorted(kids) != sorted(node.children):
                raise TreeError(f"node {node.id} lists children {node.children} but parents say {kids}.")
            if node.parent is not None:
                if node.action is None or not node.action.token_ids:
                    raise TreeError(f"node {node.id} has an empty action: every edge needs sampled tokens.")
                if node.depth != self.nodes[node.parent].depth + 1:
                    raise TreeError(f"node {node.id} has depth {node.depth}, parent depth + 1 expected.")
            if node.terminal and node.children:
                raise TreeError(f"node {node.id} is terminal but has children {node.children}.")
            if not node.terminal and not node.children:
                raise TreeError(f"node {node.id} is neither terminal nor expanded: an unfinished trajectory.")
            if node.reward is not None and not node.terminal:
                raise TreeError(f"inner node {node.id} carries reward {node.reward}: rewards belong to leaves only.")
            if node.terminal and node.reward is None:
                raise TreeError(f"leaf {node.id} ({node.finish_reason}) has no reward.")
        if not any(node.terminal for node in self.nodes):
            raise TreeError("the tree has no leaves: at least one finished trajectory is needed.")

    # ----------------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "prompt_ids": self.prompt_ids,
            "max_actions": self.max_actions,
            "fork_points": self.fork_points,
            "aborted": self.aborted,
            "nodes": [
                {
                    "id": n.id,
                    "parent": n.parent,
                    "depth": n.depth,
                    "children": n.children,
                    "terminal": n.terminal,
                    "finish_reason": n.finish_reason,
                    "reward": n.reward,
                    "action": None
                    if n.action is None
                    else {
                        "token_ids": n.action.token_ids,
                        "log_probs": n.action.log_probs,
                        "observation_ids": n.action.observation_ids,
                        "entropy": n.action.entropy,
                        "info": n.action.info,
                    },
                }
                for n in self.nodes
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutTree:
        """Inverse of `to_dict`; the result is validated."""
        tree = cls(data["prompt_ids"], data["max_actions"], data.get("uid", ""))
        tree.fork_points = list(data.get("fork_points", []))
        tree.aborted = list(data.get("aborted", []))
        tree.nodes = []
        for d in data["nodes"]:
            action = None if d["action"] is None else Action(**d["action"])
            tree.nodes.append(
                Node(
                    d["id"],
                    d["parent"],
                    d["depth"],
                    action,
                    list(d["children"]),
                    d["terminal"],
                    d["finish_reason"],
                    d["reward"],
                )
            )
        tree.validate()
        return tree


@dataclass
class TreeArrays:
    """A batch of trees flattened to node-level tensors (nodes of tree b follow those of tree b-1).

    All tensors have shape (num_nodes,). `parent` is -1 for roots; children always have a larger global id than
    their parent, so a pass over ids in order is a top-down pass.
    """

    parent: torch.Tensor
    depth: torch.Tensor
    is_leaf: torch.Tensor
    reward: torch.Tensor
    """Leaf reward, 0 on inner nodes."""
    tree_index: torch.Tensor
    """Which tree (0..num_trees-1) each node belongs to."""
    action_entropy: torch.Tensor
    """h(a) of the entering action, NaN at roots."""
    offsets: list[int]
    """Global id of each tree's root."""


def pack_trees(trees: Sequence[RolloutTree], validate: bool = True) -> TreeArrays:
    """Concatenates trees into node-level tensors for the vectorised `compute_*` functions."""
    parent, depth, is_leaf, reward, tree_index, ent, offsets = [], [], [], [], [], [], []
    base = 0
    for b, tree in enumerate(trees):
        if validate:
            tree.validate()
        offsets.append(base)
        for node in tree.nodes:
            parent.append(-1 if node.parent is None else node.parent + base)
            depth.append(node.depth)
            is_leaf.append(node.terminal)
            reward.append(node.reward if node.terminal and node.reward is not None else 0.0)
            tree_index.append(b)
            ent.append(float("nan") if node.action is None else node.action.entropy)
        base += len(tree.nodes)
    return TreeArrays(
        parent=torch.tensor(parent, dtype=torch.long),
        depth=torch.tensor(depth, dtype=torch.long),
        is_leaf=torch.tensor(is_leaf, dtype=torch.bool),
        reward=torch.tensor(reward, dtype=torch.float64),
        tree_index=torch.tensor(tree_index, dtype=torch.long),
        action_entropy=torch.tensor(ent, dtype=torch.float64),
        offsets=offsets,
    )
