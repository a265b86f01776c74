"""Register the ``carl_hf`` rollout backend with verl 0.9.1 (cheap: nothing heavy is imported here).

verl resolves a rollout backend twice, by ``actor_rollout_ref.rollout.name``:

* ``verl.workers.rollout.replica.get_rollout_replica_class(name)`` reads ``RolloutReplicaRegistry`` (public
  ``register(name, loader)``), in the TaskRunner, to start servers;
* ``verl.workers.rollout.base.get_rollout_class(name, "async")`` reads the module-private dict
  ``_ROLLOUT_REGISTRY[(name, mode)] = "module.Class"``, in every trainer rank, to build the weight-sync adapter.
  verl has no ``register`` function for it, so :func:`_set_rollout_class` writes it, guarded.

Both entries are lazy (a loader and a dotted path), so registering costs nothing until the backend is used.
"""

from __future__ import annotations

from typing import Any

ROLLOUT_NAME = "carl_hf"
_ADAPTER_FQDN = "recipe.carl.cpu.rollout.HFServerAdapter"


def _load_replica_class():
    from recipe.carl.cpu.rollout import HFRolloutReplica  # here, not at the top: it imports torch and ray

    return HFRolloutReplica


def _set_rollout_class(name: str, mode: str, fqdn: str) -> None:
    """Write ``verl.workers.rollout.base._ROLLOUT_REGISTRY[(name, mode)] = fqdn``.

    PRIVATE-REGISTRY WRITE: ``get_rollout_class`` reads this module-level dict and verl 0.9.1 offers no function
    to add to it (unlike ``RolloutReplicaRegistry.register``). The guard checks that the dict still exists and
    still uses ``(name, mode) -> "module.Class"`` entries (as verl's own ``("vllm", "async")``), so a verl upgrade
    that moves it fails here with a clear message instead of an "unknown rollout" error later.

    Raises:
        RuntimeError: If verl moved or reshaped ``_ROLLOUT_REGISTRY``, or ``name`` is taken by another class.
    """
    import verl.workers.rollout.base as base

    registry: Any = getattr(base, "_ROLLOUT_REGISTRY", None)
    if not isinstance(registry, dict) or not isinstance(registry.get(("vllm", "async")), str):
        raise RuntimeError(
            "carl: verl symbol verl.workers.rollout.base._ROLLOUT_REGISTRY is missing or no longer maps "
            "(name, mode) -> 'module.Class' (checked via its ('vllm', 'async') entry); this code targets verl==0.9.1. "
            "Update recipe/carl/cpu/registry.py."
        )
    current = registry.get((name, mode))
    if current is not None and current != fqdn:
        raise RuntimeError(f"carl: rollout ({name!r}, {mode!r}) is already registered to {current}; pick another name")
    registry[(name, mode)] = fqdn


def register_rollout(name: str = ROLLOUT_NAME) -> None:
    """Make ``actor_rollout_ref.rollout.name=<name>`` select the transformers rollout backend. Idempotent.

    Args:
        name: Backend name to register (default ``carl_hf``).

    Raises:
        RuntimeError: If verl moved a registry this relies on (names the symbol).
    """
    from verl.workers.rollout import replica

    registry = getattr(replica, "RolloutReplicaRegistry", None)
    if registry is None or not callable(getattr(registry, "register", None)):
        raise RuntimeError(
            "carl: verl symbol verl.workers.rollout.replica.RolloutReplicaRegistry.register is missing; this code "
            "targets verl==0.9.1. Update recipe/carl/cpu/registry.py."
        )
    registry.register(name, _load_replica_class)
    _set_rollout_class(name, "async", _ADAPTER_FQDN)
