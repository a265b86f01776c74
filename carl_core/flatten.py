"""Flattening trained actions of a batch of trees into training rows in verl's layout.

A row is a prompt plus a response: the actions and observations along one root-to-leaf path, cut right after the
last action the row trains. verl's FSDP engine recomputes every token of every row, so the cost of a layout is the
number of tokens it feeds the actor (old log-probs, reference, update):

    one row per trained action:  prompt + full prefix for each of |D_upd| rows   (prefix recomputed per action)
    one row per leaf path:       N0 + N rows, shared prefixes recomputed per leaf, untrained tails computed too
    this module:                 only leaf paths that hold a not-yet-covered trained action, each cut after its
                                 last such action; every trained action is trained in exactly one row

Choosing, for each leaf in id order, the still-uncovered trained actions on its path covers every trained action
exactly once (mask 1 in that row, 0 in any other row that carries it as context). Actions outside the update set
get no row of their own and mask 0 where they appear as context; observation tokens always have mask 0. Shared
prefixes are still recomputed once per row: verl's engine has no tree attention, so that is the floor here.

Row diagram for a tree whose root was forked once (a1, a4 critical) and whose s1 was forked once (a2, a3)::

    prompt | a1 obs1 a2 obs2          row 1: mask a1=1, a2=1 (obs 0)
    prompt | a1 obs1 a3               row 2: mask a1=0 (already covered), a3=1; cut after a3
    prompt | a4                       row 3: mask a4=1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from carl_core.tree import RolloutTree
from carl_core.update_set import ScoredTrees


@dataclass
class TrainingRow:
    """One training sequence (unpadded), in verl's naming."""

    uid: str
    """The tree's uid (verl's `index` / GRPO group key)."""
    tree_index: int
    leaf: int
    """Local id of the leaf whose path the row follows."""
    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    """1 on the tokens of actions this row trains, 0 on observations and on context actions."""
    advantages: list[float]
    """The action's advantage on each of its trained tokens, 0 elsewhere."""
    rollout_log_probs: list[float]
    """Inference-engine log-prob of every action token, 0 on observation tokens."""
    token_node: list[int]
    """Local node id of the action each token belongs to, -1 on observation tokens."""


@dataclass
class FlatBatch:
    """Training rows of a batch of trees as flat token arrays (all rows back to back), before padding.

    Token-level arrays have shape (num_tokens,); row-level ones (num_rows,). Row r owns the tokens
    `row_start[r] : row_start[r] + row_length[r]`.
    """

    token_ids: np.ndarray
    response_mask: np.ndarray
    advantages: np.ndarray
    rollout_log_probs: np.ndarray
    token_node: np.ndarray
    row_start: np.ndarray
    row_length: np.ndarray
    row_tree: np.ndarray
    row_leaf: np.ndarray
    uids: list[str]
    """uid of each tree (index with `row_tree`)."""
    prompts: list[list[int]]
    """Prompt ids of each tree (index with `row_tree`)."""

    @property
    def num_rows(self) -> int:
        return int(self.row_length.size)

    def rows(self) -> list[TrainingRow]:
        """The rows as unpadded Python lists (what an agent loop returns to verl, one output per row)."""
        out = []
        for r in range(self.num_rows):
            sl = slice(int(self.row_start[r]), int(self.row_start[r] + self.row_length[r]))
            b = int(self.row_tree[r])
            out.append(
                TrainingRow(
                    uid=self.uids[b],
                    tree_index=b,
                    leaf=int(self.row_leaf[r]),
                    prompt_ids=list(self.prompts[b]),
                    response_ids=self.token_ids[sl].tolist(),
                    response_mask=self.response_mask[sl].tolist(),
                    advantages=self.advantages[sl].tolist(),
                    rollout_log_probs=self.rollout_log_probs[sl].tolist(),
                    token_node=self.token_node[sl].tolist(),
                )
            )
        return out

    def to_padded(
        self, response_length: int | None = None, pad_token_id: int = 0
    ) -> dict[str, torch.Tensor | np.ndarray]:
        """verl's `(bs, response_length)` tensors: responses right-padded, prompts left-padded.

        Args:
            response_length: pad responses to this length; a longer row is an error (raise the length or lower
                T_max), because cutting it would silently drop trained tokens. Default: the longest row.
            pad_token_id: id used for padding tokens.

        Returns:
            `prompts` (bs, prompt_length), `responses`, `response_mask`, `advantages`, `rollout_log_probs`,
            `token_node` (bs, response_length), and `index` (bs,), a numpy array of tree uids.
        """
        if self.num_rows == 0:
            raise ValueError("no rows to pad: no tree of the batch has a trained action.")
        longest = int(self.row_length.max())
        length = longest if response_length is None else response_length
        if longest > length:
            raise ValueError(
                f"a row has {longest} response tokens but response_length={length}: raise "
                "data.max_response_length or lower algorithm.carl.max_actions so whole trajectories fit."
            )
        bs = self.num_rows
        # Step 1: every token's (row, column) in the padded layout; one scatter per tensor.
        row_of = np.repeat(np.arange(bs), self.row_length)
        col = np.arange(row_of.size) - np.repeat(self.row_start, self.row_length)
        out: dict[str, torch.Tensor | np.ndarray] = {}
        for name, values, fill, dtype in (
            ("responses", self.token_ids, pad_token_id, torch.long),
            ("response_mask", self.response_mask, 0, torch.long),
            ("advantages", self.advantages, 0.0, torch.float32),
            ("rollout_log_probs", self.rollout_log_probs, 0.0, torch.float32),
            ("token_node", self.token_node, -1, torch.long),
        ):
            t = torch.full((bs, length), fill, dtype=dtype)
            t[torch.from_numpy(row_of), torch.from_numpy(col)] = torch.from_numpy(values).to(dtype)
            out[name] = t
        # Step 2: prompts are per tree; pad each tree's prompt once and gather it for its rows.
        p_len = max((len(p) for p in self.prompts), default=0)
        tree_prompts = torch.full((len(self.prompts), p_len), pad_token_id, dtype=torch.long)
        for b, p in enumerate(self.prompts):
            if p:
                tree_prompts[b, p_len - len(p) :] = torch.tensor(p)
        out["prompts"] = tree_prompts[torch.from_numpy(self.row_tree)]
        out["index"] = np.array(self.uids, dtype=object)[self.row_tree]
        return out


def flatten_batch(trees: Sequence[RolloutTree], scored: ScoredTrees) -> FlatBatch:
    """Training rows for every trained action of a batch of trees, each action in exactly one row.

    Args:
        trees: the finished trees, in the order they were scored.
        scored: `score_trees(trees, config)`.

    Returns:
        The rows as flat arrays, grouped by tree and ordered by leaf id within a tree.
    """
    trained_all = scored.trained.tolist()
    adv_all = scored.advantage.tolist()
    # Step 1: one buffer with every node's action then observation tokens; remember where each segment starts.
    buf_ids: list[int] = []
    buf_logp: list[float] = []
    act_start: list[int] = []
    obs_start: list[int] = []
    for tree in trees:
        for node in tree.nodes:
            action = node.action
            act_start.append(len(buf_ids))
            if action is None:
                obs_start.append(len(buf_ids))
                continue
            buf_ids += action.token_ids
            buf_logp += action.log_probs
            obs_start.append(len(buf_ids))
            buf_ids += action.observation_ids
            buf_logp += [0.0] * len(action.observation_ids)
    # Step 2: choose rows and list their segments (start in the buffer, length, mask, advantage, node).
    seg_start: list[int] = []
    seg_len: list[int] = []
    seg_mask: list[int] = []
    seg_adv: list[float] = []
    seg_node: list[int] = []
    row_len: list[int] = []
    row_tree: list[int] = []
    row_leaf: list[int] = []
    for b, tree in enumerate(trees):
        base = scored.arrays.offsets[b]
        covered = [False] * len(tree.nodes)
        for leaf in tree.leaves():
            path = tree.path(leaf)[1:]
            new = [v for v in path if trained_all[base + v] and not covered[v]]
            if not new:
                continue
            last = path.index(new[-1])
            train_here = set(new)
            length = 0
            for pos, v in enumerate(path[: last + 1]):
                action = tree.nodes[v].action
                assert action is not None
                on = v in train_here
                seg_start.append(act_start[base + v])
                seg_len.append(len(action.token_ids))
                seg_mask.append(int(on))
                seg_adv.append(adv_all[base + v] if on else 0.0)
                seg_node.append(v)
                length += len(action.token_ids)
                if pos < last:  # the observation after the row's last trained action is never needed
                    seg_start.append(obs_start[base + v])
                    seg_len.append(len(action.observation_ids))
                    seg_mask.append(0)
                    seg_adv.append(0.0)
                    seg_node.append(-1)
                    length += len(action.observation_ids)
            for v in new:
                covered[v] = True
            row_len.append(length)
            row_tree.append(b)
            row_leaf.append(leaf)
    # Step 3: expand segments to tokens with one gather from the buffer.
    lens = np.asarray(seg_len, dtype=np.int64)
    total = int(lens.sum())
    starts = np.asarray(seg_start, dtype=np.int64)
    gather = np.arange(total) + np.repeat(starts - (np.cumsum(lens) - lens), lens)
    row_length = np.asarray(row_len, dtype=np.int64)
    return FlatBatch(
        token_ids=np.asarray(buf_ids, dtype=np.int64)[gather] if total else np.zeros(0, np.int64),
        response_mask=np.repeat(np.asarray(seg_mask, dtype=np.int64), lens),
        advantages=np.repeat(np.asarray(seg_adv, dtype=np.float64), lens),
        rollout_log_probs=np.asarray(buf_logp, dtype=np.float64)[gather] if total else np.zeros(0),
        token_node=np.repeat(np.asarray(seg_node, dtype=np.int64), lens),
        row_start=np.cumsum(row_length) - row_length,
        row_length=row_length,
        row_tree=np.asarray(row_tree, dtype=np.int64),
        row_leaf=np.asarray(row_leaf, dtype=np.int64),
        uids=[t.uid for t in trees],
        prompts=[t.prompt_ids for t in trees],
    )


def flatten_trees(trees: Sequence[RolloutTree], scored: ScoredTrees) -> list[TrainingRow]:
    """`flatten_batch(...).rows()`: the training rows as unpadded lists."""
    return flatten_batch(trees, scored).rows()


def collate_rows(
    rows: Sequence[TrainingRow], response_length: int | None = None, pad_token_id: int = 0
) -> dict[str, torch.Tensor | np.ndarray]:
    """Pads unpadded rows into verl's layout (see `FlatBatch.to_padded`)."""
    if not rows:
        raise ValueError("collate_rows got no rows: no tree of the batch has a trained action.")
    uids = sorted({r.uid for r in rows})
    tree_of = {u: i for i, u in enumerate(uids)}
    prompts = [[] for _ in uids]
    for r in rows:
        prompts[tree_of[r.uid]] = r.prompt_ids
    row_length = np.array([len(r.response_ids) for r in rows], dtype=np.int64)

    def cat(field: str, dtype: type) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(r, field), dtype=dtype) for r in rows])

    batch = FlatBatch(
        token_ids=cat("response_ids", np.int64),
        response_mask=cat("response_mask", np.int64),
        advantages=cat("advantages", np.float64),
        rollout_log_probs=cat("rollout_log_probs", np.float64),
        token_node=cat("token_node", np.int64),
        row_start=np.cumsum(row_length) - row_length,
        row_length=row_length,
        row_tree=np.array([tree_of[r.uid] for r in rows], dtype=np.int64),
        row_leaf=np.array([r.leaf for r in rows], dtype=np.int64),
        uids=uids,
        prompts=prompts,
    )
    return batch.to_padded(response_length, pad_token_id)
