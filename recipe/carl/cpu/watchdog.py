"""Fail a run whose Ray actors or placement groups cannot get their resources, instead of hanging forever.

verl 0.9.1 starts a dozen Ray actors that each reserve a logical CPU (TaskRunner, TransferQueue controller and
storage units, agent-loop and reward workers) and waits on them without a timeout; on a cluster with too few
logical CPUs the run hangs silently. This watchdog runs as a daemon thread in the driver process, polls Ray's
public state API (``ray.util.state``) and, when an actor stays ``PENDING_CREATION`` or a placement group stays
``PENDING`` longer than the limit, prints what is waiting for which resources next to what the cluster has free,
then interrupts the driver (exit code != 0).

Started by :func:`recipe.carl.cpu.platform.activate` in the driver only (not in Ray worker processes).
``CARL_RAY_PENDING_TIMEOUT_S`` sets the limit in seconds (default 180; 0 disables it).
"""

from __future__ import annotations

import _thread
import logging
import os
import sys
import threading
import time

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "CARL_RAY_PENDING_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 180.0

_started = False


def _is_ray_worker_process() -> bool:
    # Ray starts every worker process as `python .../ray/_private/workers/default_worker.py`.
    return any(os.path.basename(a) == "default_worker.py" for a in sys.argv[:1])


def pending_for_too_long(first_seen: dict[str, float], now: float, timeout_s: float) -> list[str]:
    """Return the keys of ``first_seen`` (key -> first time seen pending) older than ``timeout_s``."""
    return [k for k, t in first_seen.items() if now - t >= timeout_s]


def _poll_pending() -> dict[str, str]:
    """Return ``{key: description}`` of actors and placement groups that are waiting for resources."""
    from ray.util.state import list_actors, list_placement_groups

    pending = {}
    for a in list_actors(filters=[("state", "=", "PENDING_CREATION")], detail=True, raise_on_missing_output=False):
        a = a if isinstance(a, dict) else a.__dict__
        pending[f"actor:{a.get('actor_id')}"] = (
            f"actor {a.get('class_name')} (name={a.get('name') or '-'}) needs {a.get('required_resources')}"
        )
    for pg in list_placement_groups(filters=[("state", "=", "PENDING")], detail=True, raise_on_missing_output=False):
        pg = pg if isinstance(pg, dict) else pg.__dict__
        bundles = [b.get("unit_resources") for b in (pg.get("bundles") or [])]
        pending[f"pg:{pg.get('placement_group_id')}"] = f"placement group {pg.get('name') or '-'} needs {bundles}"
    return pending


def _watch(timeout_s: float, poll_s: float) -> None:
    import ray

    while not ray.is_initialized():
        time.sleep(poll_s)
    first_seen: dict[str, float] = {}
    while ray.is_initialized():
        try:
            pending = _poll_pending()
        except Exception as e:  # the state API may be unavailable (e.g. no dashboard): stop quietly
            logger.warning("carl Ray watchdog disabled: state API unavailable (%s)", e)
            return
        now = time.time()
        first_seen = {k: first_seen.get(k, now) for k in pending}
        stuck = pending_for_too_long(first_seen, now, timeout_s)
        if stuck:
            lines = "\n  ".join(pending[k] for k in stuck)
            print(
                f"\nERROR carl Ray watchdog: waited more than {timeout_s:.0f}s for resources that never freed up:\n"
                f"  {lines}\n  cluster has free: {ray.available_resources()}\n"
                "Give Ray more logical CPUs (ray_kwargs.ray_init.num_cpus; they need not be real cores), "
                "fewer worker processes (rollout.agent.num_workers, reward.num_workers, "
                "transfer_queue.backend.SimpleStorage.num_data_storage_units), or a fake GPU "
                f"(+ray_kwargs.ray_init.num_gpus=1) on CPU. Set {TIMEOUT_ENV}=0 to disable this check.",
                file=sys.stderr,
                flush=True,
            )
            _thread.interrupt_main()
            time.sleep(30)
            os._exit(3)  # the main thread ignored the interrupt: never hang
        time.sleep(poll_s)


def start(timeout_s: float | None = None, poll_s: float = 2.0) -> bool:
    """Start the watchdog thread once, in the driver process only.

    Args:
        timeout_s: Seconds an actor or placement group may stay pending; defaults to ``CARL_RAY_PENDING_TIMEOUT_S``
            or 180. 0 disables the watchdog.
        poll_s: Polling period.

    Returns:
        True if a watchdog thread is running in this process.
    """
    global _started
    if _started:
        return True
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if timeout_s <= 0 or _is_ray_worker_process():
        return False
    threading.Thread(target=_watch, args=(timeout_s, poll_s), name="carl-ray-watchdog", daemon=True).start()
    _started = True
    return True
