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
    assert lines[2] == "['carl_agent', 'carl_chain_agent', 'carl_tree_agent']"


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
print(loaded(*recipe), "carl_tree_agent" in _agent_loop_registry)
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
        "FSDPEngineWithLMHead",
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


def test_estimator_masks_and_rejects_nan():
    import torch

    from recipe.carl.estimator import compute_carl_advantage

    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    carl = torch.tensor([[0.5, 0.5, float("nan")], [1.0, 1.0, 1.0]])
    adv, ret = compute_carl_advantage(torch.zeros(2, 3), mask, carl_advantages=carl)
    assert adv.tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]] and torch.equal(adv, ret)
    with pytest.raises(ValueError, match="non-finite"):
        compute_carl_advantage(torch.zeros(1, 2), torch.ones(1, 2), carl_advantages=torch.tensor([[float("nan"), 0]]))
