"""`algorithm.carl.packing=tree` through the agent loop, verl's row post-processing and the CARL trainer's estimator.

The harness is `tests/recipe/test_carl_agent_loop.py`'s (scripted policy server, fake search tool, verl's real
`_agent_loop_postprocess`, padding template and `CARLTrainer._compute_advantage`).
"""

from __future__ import annotations

import re

import pytest
import torch

from carl_core import score_trees
from recipe.carl.packing import RUNS_KEY
from recipe.carl.packing.layout import compute_tree_layout
from recipe.carl.settings import read_settings
from tests.recipe.test_carl_agent_loop import (
    ScriptedServer,
    grow,
    make_config,
    padding_row,
    sample,
    searching_policy,
    trainer_advantage,
    verl_postprocess,
)


def _rows(config, monkeypatch, seed=1):
    samples = [sample("t0"), sample("t1", "who is the capital of q1")]
    outs = grow(config, ScriptedServer(searching_policy, seed=seed), *samples)
    rows = []
    for s, o in zip(samples, outs, strict=True):
        rows += verl_postprocess(o, monkeypatch, dict(s))
    return rows, [o.tree for o in outs]


def test_one_row_per_tree_with_every_trained_action_once(monkeypatch):
    config = make_config("algorithm.carl.packing=tree")
    rows, trees = _rows(config, monkeypatch)
    assert len(rows) == len(trees) == 2  # data.max_response_length=256 holds a whole tree here
    rows.append(padding_row(rows))
    advantages, _, metrics = trainer_advantage(rows, config, monkeypatch)
    carl = read_settings(config).carl
    scored = score_trees(trees, carl)
    seen = set()
    for i, row in enumerate(rows[:-1]):
        b = [t.uid for t in trees].index(f"{row['uid']}_0")
        tree, base = trees[b], scored.arrays.offsets[b]
        runs = row["extra_fields"][RUNS_KEY]
        assert sum(n for n, _ in runs) == len(row["prompts"]) + len(row["responses"])
        compute_tree_layout(runs)  # depth-first: no token can see a sibling branch
        mask, pos = row["response_mask"].tolist(), 0
        for node, count in row["extra_fields"]["carl_token_nodes"]:
            span = slice(pos, pos + count)
            if node >= 0:
                assert row["responses"][span].tolist() == tree.nodes[node].action.token_ids
            if any(mask[span]):
                assert all(mask[span]) and (tree.uid, node) not in seen
                seen.add((tree.uid, node))
                want = torch.full((count,), float(scored.advantage[base + node]))
                assert torch.allclose(advantages[i, span], want, atol=1e-6)
            else:
                assert advantages[i, span].abs().sum() == 0
            pos += count
    trained = {
        (t.uid, n.id) for b, t in enumerate(trees) for n in t.nodes if scored.trained[scored.arrays.offsets[b] + n.id]
    }
    assert seen == trained
    assert advantages[-1].abs().sum() == 0  # verl's padding row (it copies the first row's runs) trains nothing
    assert metrics["carl/trees"] == 2.0 and metrics["carl/leaves_per_tree"] == carl.n0 + carl.n_forks


def test_packed_rows_hold_fewer_tokens_than_per_path_rows(monkeypatch):
    packed, _ = _rows(make_config("algorithm.carl.packing=tree"), monkeypatch)
    per_path, _ = _rows(make_config(), monkeypatch)
    tokens = lambda rows: sum(len(r["prompts"]) + len(r["responses"]) for r in rows)  # noqa: E731
    trained = lambda rows: sum(int(r["response_mask"].sum()) for r in rows)  # noqa: E731
    assert trained(packed) == trained(per_path) > 0
    assert tokens(packed) < tokens(per_path) and len(packed) < len(per_path)
    assert all(RUNS_KEY not in r["extra_fields"] for r in per_path)


def test_a_tree_larger_than_the_row_budget_takes_several_rows(monkeypatch):
    # without dynamic batch sizes the budget is data.max_response_length (here 64 of the trees' ~150 tokens; merging
    # off, so that identical samples do not shrink the trees under it)
    config = make_config(
        "algorithm.carl.packing=tree",
        "actor_rollout_ref.actor.use_dynamic_bsz=False",
        "data.max_response_length=64",
        "algorithm.carl.merge=false",
    )
    rows, trees = _rows(config, monkeypatch)
    assert len(rows) > len(trees) and all(len(r["responses"]) <= 64 for r in rows)


def test_unknown_packing_mode_and_unfit_settings_are_refused():
    from carl_core import CARLConfigError
    from recipe.carl.settings import check_trainer_config

    with pytest.raises(CARLConfigError, match="packing='trees' is unknown"):
        read_settings(make_config("algorithm.carl.packing=trees"))
    bad = make_config("algorithm.carl.packing=tree", "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean")
    # carl_trainer.yaml keeps verl's GPU default, flash_attention_2, which cannot take a tree mask either
    with pytest.raises(CARLConfigError, match=r"loss_agg_mode in .*got 'seq-mean-token-mean'.*got 'flash_attention_2'"):
        check_trainer_config(bad)
    ok = make_config("algorithm.carl.packing=tree", "+actor_rollout_ref.model.override_config.attn_implementation=sdpa")
    ok.trainer.device = "cpu"  # sdpa's dense tree mask: CPU only
    assert check_trainer_config(ok).packing == "tree"


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # verl's default attention, flash_attention_2: the key is not in the config
        ["+device=cpu", "trainer.device=cuda"],  # the CPU yaml's sdpa on a GPU: the key is in the config
    ],
)
def test_the_attention_fix_is_an_override_hydra_accepts(overrides):
    """The refusal names the override in the form Hydra takes (`+key=` for a key not yet there); applied as given,
    the config passes."""
    from carl_core import CARLConfigError
    from recipe.carl.settings import check_trainer_config

    with pytest.raises(CARLConfigError) as refused:
        check_trainer_config(make_config("algorithm.carl.packing=tree", *overrides))
    fix = re.search(
        r"(\+?actor_rollout_ref\.model\.override_config\.attn_implementation=flex_attention) \(got", str(refused.value)
    )
    assert fix, str(refused.value)
    assert fix.group(1).startswith("+") == (not overrides)
    assert check_trainer_config(make_config("algorithm.carl.packing=tree", *overrides, fix.group(1))).packing == "tree"
