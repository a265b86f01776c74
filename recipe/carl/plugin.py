"""verl plugin entry point (`setup.py`: `verl.plugins: carl = recipe.carl.plugin`).

`import verl` imports this module in every process (driver, TaskRunner actor, agent-loop and reward workers), which
is where verl's registries are read. Importing it registers:

- `algorithm.adv_estimator=carl`  -> `recipe.carl.estimator.compute_carl_advantage` (verl's estimator registry);
- `trainer.v1.trainer_mode=carl`  -> `recipe.carl.trainer.CARLTrainer` (verl's trainer registry);
- agent loops `carl_agent` / `carl_tree_agent` / `carl_chain_agent` -> `recipe.carl.agent_loop` (verl's agent-loop
  registry; the agent-loop yaml registers the same names with their constructor arguments in the workers).

verl swallows plugin import errors (DEBUG log), so `main_carl` calls `check_registered()`, which re-raises them.
With `CARL_DEVICE=cpu`, the CPU rollout backend and platform of `recipe.carl.cpu` are activated as well.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

CPU_MODULE = "recipe.carl.cpu"


def _activate_cpu() -> bool:
    """Runs `recipe.carl.cpu.register()` (idempotent) when `CARL_DEVICE=cpu`; False when not asked for or absent."""
    if os.environ.get("CARL_DEVICE", "").lower() != "cpu":
        return False
    if importlib.util.find_spec(CPU_MODULE) is None:
        raise RuntimeError(f"CARL_DEVICE=cpu but {CPU_MODULE} is not importable: reinstall with pip install -e .")
    # register() adds the carl_hf rollout backend and activates the CPU platform (gloo, CPU engines) in this process.
    return bool(importlib.import_module(CPU_MODULE).register())


# First, before anything imports verl's engine workers: the CPU platform patches the process-group backend, which
# only takes effect if it runs before `verl.workers.engine_workers` is imported (the trainer import below does that).
CPU_ACTIVE = _activate_cpu()

import recipe.carl.agent_loop  # noqa: E402, F401  (registers the agent loops)
import recipe.carl.estimator  # noqa: E402, F401  (registers the estimator)
import recipe.carl.trainer  # noqa: E402, F401  (registers the trainer)
from recipe.carl.settings import AUTO_AGENT, CHAIN_AGENT, ESTIMATOR, TRAINER_MODE, TREE_AGENT  # noqa: E402


def check_registered() -> None:
    """Raises RuntimeError, naming what is missing, unless verl resolves every `carl` name in this process."""
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn
    from verl.trainer.ppo.v1.trainer_base import get_trainer_cls

    missing = []
    try:
        get_adv_estimator_fn(ESTIMATOR)
    except ValueError:
        missing.append(f"estimator {ESTIMATOR!r}")
    try:
        get_trainer_cls(TRAINER_MODE)
    except ValueError:
        missing.append(f"trainer {TRAINER_MODE!r}")
    missing += [
        f"agent loop {name!r}" for name in (AUTO_AGENT, TREE_AGENT, CHAIN_AGENT) if name not in _agent_loop_registry
    ]
    if missing:
        raise RuntimeError(
            f"verl does not resolve {', '.join(missing)}: the `verl.plugins` entry point did not run. Reinstall the "
            "project (`pip install -e .`) so `carl = recipe.carl.plugin` is registered, and check that "
            "`python -c 'import recipe.carl.plugin'` imports without error."
        )
