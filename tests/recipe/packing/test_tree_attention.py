"""Packed rows through a real (tiny, random) transformers model: every token's log-prob and gradient equal the
per-path ones (fp32, 1e-5), with sdpa and eager masks, padded and remove-padding layouts; refusals by name."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
import torch

from benchmarks.bench_packing import tree_from_json
from carl_core import CARLConfig
from recipe.carl.cpu.tiny_model import build_tiny_model
from recipe.carl.packing.attention import (
    build_attention_mask,
    layout_rows,
    logits_from_predecessors,
    to_model_layout,
)
from recipe.carl.packing.layout import pack_tree
from tests.core.conftest import random_tree

SFT_POLICY = Path(__file__).resolve().parents[3] / "recipe" / "carl" / "tiny" / "checkpoints" / "sft_seed0"


@functools.lru_cache(maxsize=4)
def _model(attn: str):
    return build_tiny_model(vocab_size=320, attn_implementation=attn, seed=1)


def _trees(seed: int, n: int = 3):
    rng = random.Random(seed)
    trees = [random_tree(rng, CARLConfig(n0=2, n_forks=4, max_actions=3), uid=f"t{i}") for i in range(n)]
    trained = [[False] + [rng.random() < 0.6 for _ in t.nodes[1:]] for t in trees]
    return trees, trained


def _path_logprob(model, tree, node: int, observation: bool) -> torch.Tensor:
    """Log-probs of node's action (or observation) tokens, computed on the node's own per-path row."""
    ids = tree.prefix_ids(node)
    action = tree.nodes[node].action
    n_obs = len(action.observation_ids)
    start = len(ids) - n_obs - (0 if observation else len(action.token_ids))
    count = n_obs if observation else len(action.token_ids)
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(input_ids=x).logits[0], -1)
    return logp[start - 1 : start - 1 + count].gather(-1, x[0, start : start + count, None]).squeeze(-1)


def _packed_logprobs(model, rows, attn: str, packed_layout: bool, extra_plain: list[list[int]] = ()):
    """Per-row log-probs of every token (index t scores token t + 1), through mask + predecessor logits."""
    seqs = [r.prompt_ids + r.response_ids for r in rows] + list(extra_plain)
    runs = [r.tree_runs for r in rows] + [None] * len(extra_plain)
    lengths = [len(s) for s in seqs]
    positions, ends, preds = layout_rows(runs, lengths)
    if packed_layout:
        width = sum(lengths) + 3  # as verl's static padding would add
        ids = torch.tensor([sum(seqs, []) + [0, 0, 0]])
        pos = torch.cat([torch.as_tensor(positions), torch.arange(3)])[None]
    else:
        width = max(lengths)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        pos = torch.zeros(len(seqs), width, dtype=torch.long)
        flat = torch.as_tensor(positions).split(lengths)
        for b, p in enumerate(flat):
            pos[b, : len(p)] = p
    span_end, source = to_model_layout(ends, preds, width, packed=packed_layout)
    mask = build_attention_mask(span_end, attn)
    with logits_from_predecessors(model, lambda: source):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    logp = torch.log_softmax(logits, -1)
    labels = torch.roll(ids, -1, dims=1)
    token_logp = logp.gather(-1, labels[..., None]).squeeze(-1)
    if packed_layout:
        return list(token_logp[0, : sum(lengths)].split(lengths))
    return [token_logp[b, :n] for b, n in enumerate(lengths)]


def _expected(model, tree, row) -> torch.Tensor:
    """Per-path log-prob of each response token of a packed row, in row order."""
    out, col = [], 0
    nodes = [node for node, count in row.token_nodes for _ in range(count)]
    while col < len(nodes):
        v = nodes[col]
        if v >= 0:
            owner, obs = v, False
        else:
            owner, obs = nodes[col - 1], True
        vals = _path_logprob(model, tree, owner, obs)
        out.append(vals)
        col += len(vals)
    return torch.cat(out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packed_layout", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_logprobs_equal_per_path_logprobs(attn, packed_layout, seed):
    model = _model(attn)
    trees, trained = _trees(seed)
    rows, owners = [], []
    for tree, tr in zip(trees, trained, strict=True):
        for row in pack_tree(tree, tr, max_response_tokens=40):
            rows.append(row)
            owners.append(tree)
    plain = [[5, 6, 7, 8, 9, 10, 11]]  # an ordinary row in the same micro-batch stays causal
    with torch.no_grad():
        got = _packed_logprobs(model, rows, attn, packed_layout, plain)
        for row, tree, lp in zip(rows, owners, got, strict=False):
            p = len(row.prompt_ids)
            torch.testing.assert_close(lp[p - 1 : -1], _expected(model, tree, row), atol=1e-5, rtol=0)
        ref = torch.log_softmax(model(input_ids=torch.tensor(plain)).logits[0].float(), -1)
        torch.testing.assert_close(got[-1][:-1], ref[:-1].gather(-1, torch.tensor(plain[0][1:])[:, None])[:, 0])


def test_packed_gradient_equals_per_path_gradient():
    """Token-mean of A * log-prob over the trained tokens: the same gradient from one packed forward as from
    one forward per path (a shared prefix's last token feeds several branches; its gradients must add up)."""
    model = _model("sdpa")
    trees, trained = _trees(7, n=2)
    rows, owners = [], []
    for tree, tr in zip(trees, trained, strict=True):
        for row in pack_tree(tree, tr, max_response_tokens=1000):
            rows.append(row)
            owners.append(tree)
    weight = {}  # a fixed pseudo-advantage per (tree, node)
    for i, tree in enumerate(trees):
        for v in range(1, len(tree.nodes)):
            weight[(i, v)] = (-1) ** v * (0.5 + 0.1 * v + i)
    tree_of = {id(t): i for i, t in enumerate(trees)}

    model.zero_grad()
    got = _packed_logprobs(model, rows, "sdpa", packed_layout=True)
    terms = []
    for row, tree, lp in zip(rows, owners, got, strict=True):
        p = len(row.prompt_ids)
        nodes = [v for v, n in row.token_nodes for _ in range(n)]
        w = torch.tensor([weight[(tree_of[id(tree)], v)] if v >= 0 else 0.0 for v in nodes])
        terms.append((lp[p - 1 : -1] * w * torch.tensor(row.response_mask)).sum())
    n_tokens = sum(sum(r.response_mask) for r in rows)
    (torch.stack(terms).sum() / n_tokens).backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad()
    terms = []
    for i, (tree, tr) in enumerate(zip(trees, trained, strict=True)):
        for v in range(1, len(tree.nodes)):
            if tr[v]:
                terms.append(_path_logprob(model, tree, v, observation=False).sum() * weight[(i, v)])
    (torch.stack(terms).sum() / n_tokens).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(packed[k], p.grad, atol=1e-6, rtol=1e-4, msg=k)


def test_attention_without_tree_masks_is_refused_by_setting_name():
    with pytest.raises(ValueError, match="actor_rollout_ref.model.override_config.attn_implementation"):
        build_attention_mask(torch.ones(1, 4, dtype=torch.long), "flash_attention_2")


def test_lm_head_shape_mismatch_is_an_error():
    model = _model("sdpa")
    with (
        pytest.raises(ValueError, match="does not match the packed rows"),
        logits_from_predecessors(model, lambda: torch.zeros(1, 3, dtype=torch.long)),
    ):
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))


@pytest.mark.slow
def test_flex_attention_block_mask_equals_dense_mask():
    """The GPU path (flex_attention + BlockMask from the same span ends), run on CPU: same log-probs as sdpa."""
    trees, trained = _trees(3, n=2)
    rows = [r for t, tr in zip(trees, trained, strict=True) for r in pack_tree(t, tr, 1000)]
    with torch.no_grad():
        dense = _packed_logprobs(_model("sdpa"), rows, "sdpa", packed_layout=True)
        flex = _packed_logprobs(_model("flex_attention"), rows, "flex_attention", packed_layout=True)
    for a, b in zip(dense, flex, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


DEMO_TREES = Path(__file__).with_name("demo_trees.jsonl")
"""4 trees the demo's shipped SFT policy grew on SynthHop training questions in the agent loop's environment
(N0 = 2, N = 6, T = 0.7): `python benchmarks/bench_packing.py --workloads demo --dump-demo-trees <file>`."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_real_demo_trees_logprobs_equal_per_path_logprobs(dtype):
    """fp32: trained tokens within 1e-5 (+1e-6 relative), the untrained ones (observations, down to log-probs of -30)
    within 2e-5 relative: fp32 rounding alone moves them by up to 2.4e-5 between a per-path row computed alone and
    in a padded batch. fp64: every token to 1e-10, so what differs in fp32 is rounding, not the layout."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(SFT_POLICY), attn_implementation="sdpa").eval().to(dtype)
    trees = [tree_from_json(json.loads(line)) for line in DEMO_TREES.read_text().splitlines()]
    for tree in trees:
        # Eq. 13: an action is trained when its source state was forked
        trained = [n.parent is not None and len(tree.nodes[n.parent].children) > 1 for n in tree.nodes]
        (row,) = pack_tree(tree, trained, max_response_tokens=4096)
        with torch.no_grad():
            (got,) = _packed_logprobs(model, [row], "sdpa", packed_layout=False)
            got, expected = got[len(row.prompt_ids) - 1 : -1], _expected(model, tree, row)
        if dtype == torch.float64:
            torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
        else:
            on = torch.tensor(row.response_mask, dtype=torch.bool)
            assert on.sum() > 0
            torch.testing.assert_close(got[on], expected[on], atol=1e-5, rtol=1e-6)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=2e-5)
