"""The carl_hf backend resolves through verl's own lookups; the private-registry guard fails loudly."""

import pytest

from recipe.carl.cpu.registry import ROLLOUT_NAME, register_rollout


def test_rollout_resolves_through_verl_lookups():
    from verl.workers.rollout.base import BaseRollout, get_rollout_class
    from verl.workers.rollout.replica import RolloutReplica, get_rollout_replica_class

    register_rollout()
    register_rollout()  # idempotent
    adapter = get_rollout_class(ROLLOUT_NAME, "async")
    replica = get_rollout_replica_class(ROLLOUT_NAME)
    assert issubclass(adapter, BaseRollout) and adapter.__name__ == "HFServerAdapter"
    assert issubclass(replica, RolloutReplica) and replica.__name__ == "HFRolloutReplica"


def test_guard_raises_when_private_registry_moved(monkeypatch):
    import verl.workers.rollout.base as base

    monkeypatch.delattr(base, "_ROLLOUT_REGISTRY")
    with pytest.raises(RuntimeError, match=r"verl\.workers\.rollout\.base\._ROLLOUT_REGISTRY"):
        register_rollout("carl_hf_guard_test")


def test_guard_raises_when_private_registry_changed_shape(monkeypatch):
    import verl.workers.rollout.base as base

    monkeypatch.setattr(base, "_ROLLOUT_REGISTRY", {"vllm": object()})
    with pytest.raises(RuntimeError, match="_ROLLOUT_REGISTRY"):
        register_rollout("carl_hf_guard_test")


def test_guard_raises_when_replica_registry_moved(monkeypatch):
    import verl.workers.rollout.replica as replica

    monkeypatch.delattr(replica, "RolloutReplicaRegistry")
    with pytest.raises(RuntimeError, match="RolloutReplicaRegistry"):
        register_rollout("carl_hf_guard_test")


def test_name_clash_is_refused(monkeypatch):
    import verl.workers.rollout.base as base

    monkeypatch.setitem(base._ROLLOUT_REGISTRY, ("carl_hf_clash", "async"), "some.other.Adapter")
    with pytest.raises(RuntimeError, match="already registered"):
        register_rollout("carl_hf_clash")
