"""Registration: a fresh process that only imports verl resolves every `carl` name (the plugin entry point)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import verl  # nothing else: the `verl.plugins` entry point must do the registering
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.trainer.ppo.v1.trainer_base import get_trainer_cls
fn = get_adv_estimator_fn("carl")
cls = get_trainer_cls("carl")
print(fn.__module__, fn.__name__)
print(cls.__module__, cls.__name__, [b.__name__ for b in cls.__mro__[1:3]])
print(sorted(k for k in _agent_loop_registry if k.startswith("carl")))
"""


def test_fresh_process_resolves_carl():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()[-3:]
    assert lines[0] == "recipe.carl.estimator compute_carl_advantage"
    assert lines[1] == "recipe.carl.trainer CARLTrainer ['PPOTrainerSync', 'PPOTrainer']"
    assert lines[2] == "['carl_agent', 'carl_chain_agent']"


LAZY_PROBE = """
import sys
import verl

def loaded(*names):
    return [n for n in names if n in sys.modules]

recipe = ("recipe.carl.estimator", "recipe.carl.trainer", "recipe.carl.agent_loop")
heavy = ("verl.workers.engine", "verl.workers.rollout", "verl.experimental.agent_loop", "verl.trainer.ppo.v1")
print(loaded(*recipe, *heavy))
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
print(loaded(*recipe), get_adv_estimator_fn("carl").__name__)
from verl.workers.rollout.replica import get_rollout_replica_class
print(loaded(*recipe), get_rollout_replica_class("carl_hf").__name__)
from verl.workers.engine import EngineRegistry
print(EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__)
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
print(loaded(*recipe), "carl_agent" in _agent_loop_registry)
from verl.trainer.ppo.v1.trainer_base import get_trainer_cls
print(loaded(*recipe), get_trainer_cls("carl").__name__)
"""


def test_each_registration_waits_for_its_verl_module():
    """`import verl` loads none of the recipe's registering modules; each arrives with the verl registry it fills."""
    env = {**os.environ, "CARL_DEVICE": "cpu"}
    out = subprocess.run([sys.executable, "-c", LAZY_PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-6:] == [
        "[]",
        "['recipe.carl.estimator'] compute_carl_advantage",
        "['recipe.carl.estimator'] HFRolloutReplica",
        "TreePackedFSDPEngine",  # verl's FSDP engine + tree-packed rows (recipe.carl.packing), via the plugin
        "['recipe.carl.estimator', 'recipe.carl.agent_loop'] True",
        "['recipe.carl.estimator', 'recipe.carl.trainer', 'recipe.carl.agent_loop'] CARLTrainer",
    ]


def test_check_registered_fails_loudly(monkeypatch):
    from verl.trainer.ppo import core_algos

    import recipe.carl.plugin as plugin

    plugin.check_registered()
    monkeypatch.delitem(core_algos.ADV_ESTIMATOR_REGISTRY, "carl")
    with pytest.raises(RuntimeError, match="estimator 'carl'.*pip install -e"):
        plugin.check_registered()


def test_estimator_through_verl_compute_advantage():
    """verl's own dispatcher resolves `carl`; without the CARL trainer it fails with the fix, not silently."""
    import numpy as np
    import torch
    from verl.protocol import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage

    data = DataProto.from_dict(
        tensors={"token_level_rewards": torch.zeros(2, 3), "response_mask": torch.ones(2, 3, dtype=torch.long)},
        non_tensors={"uid": np.array(["a", "b"], dtype=object)},
    )
    with pytest.raises(ValueError, match="trainer_mode=carl"):
        compute_advantage(data, adv_estimator="carl", config={})


def test_estimator_scores_the_batch_of_trees_by_hand():
    """Two rows of the fig tree (tests/core/conftest.py) through `carl_batch_from_rows` and the estimator.

    V = [0.75, 0.5, 1, 1, 0, 0, 1]; trained (critical) actions 1, 2, 4, 6 with A = -0.25, 0.5, -0.5, 0.25.
    """
    import torch

    from carl_core import describe_tree
    from recipe.carl.estimator import carl_batch_from_rows, compute_carl_advantage
    from tests.core.conftest import build_tree

    lp = [-0.5, -1.0]
    tree = build_tree([(0, lp, None), (1, lp, None), (2, lp, 1.0), (1, lp, None), (4, lp, 0.0), (0, lp, 1.0)])
    extra = [  # rows for leaves 3 and 5 (layout_rows' rows 1 and 2), then a padding row copying the first
        {"carl_tree_id": "t", "carl_leaf": 3, "carl_token_nodes": [[1, 2], [-1, 2], [2, 2]], "carl_tree": None},
        {"carl_tree_id": "t", "carl_leaf": 5, "carl_token_nodes": [[1, 2], [-1, 2], [4, 2]], "carl_tree": None},
    ]
    extra[0]["carl_tree"] = describe_tree(tree)
    extra.append(dict(extra[0]))
    batch = carl_batch_from_rows(extra, ["q", "q", "pad1"], width=6)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1], [0] * 6])
    config = {"carl": {"n0": 1}}
    adv, ret = compute_carl_advantage(torch.zeros(3, 6), mask, config=config, carl_batch=batch)
    assert adv.tolist() == [[-0.25, -0.25, 0, 0, 0.5, 0.5], [0, 0, 0, 0, -0.5, -0.5], [0.0] * 6]
    assert torch.equal(adv, ret) and batch.scored.node_value.tolist() == [0.75, 0.5, 1, 1, 0, 0, 1]
    assert batch.row_leaf == [3, 5, -1] and batch.row_length == [6, 6, 0]


def test_estimator_refuses_bad_batches():
    import torch

    from carl_core import describe_tree
    from recipe.carl.estimator import carl_batch_from_rows, compute_carl_advantage
    from tests.core.conftest import build_tree

    tree = build_tree([(0, [-1.0], 1.0), (0, [-1.0], 0.0)])
    row = {"carl_tree_id": "t", "carl_leaf": 1, "carl_token_nodes": [[1, 1]], "carl_tree": describe_tree(tree)}
    with pytest.raises(ValueError, match="trainer_mode=carl"):
        compute_carl_advantage(torch.zeros(1, 1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="tree 'other', whose description .* is not in the batch"):
        carl_batch_from_rows([row, {**row, "carl_tree_id": "other", "carl_tree": None}], ["q", "q"], width=1)
    nan = {**row, "carl_tree": {**row["carl_tree"], "reward": [None, float("nan"), 0.0]}}
    batch = carl_batch_from_rows([nan], ["q"], width=1)
    with pytest.raises(ValueError, match="non-finite"):
        compute_carl_advantage(torch.zeros(1, 1), torch.ones(1, 1), config={"carl": {}}, carl_batch=batch)
