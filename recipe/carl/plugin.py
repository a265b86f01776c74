"""verl plugin entry point (`setup.py`: `verl.plugins: carl = recipe.carl.plugin`).

`import verl` imports this module in every process (driver, TaskRunner actor, trainer ranks, agent-loop and reward
workers, rollout server, router). Each registration runs when verl imports the registry it writes to (a post-import
hook), so a process pays only for the verl modules it uses itself:

- `algorithm.adv_estimator=carl`  -> `recipe.carl.estimator.compute_carl_advantage`, once
  `verl.trainer.ppo.core_algos` (verl's estimator registry) is imported;
- `trainer.v1.trainer_mode=carl`  -> `recipe.carl.trainer.CARLTrainer`, once `verl.trainer.ppo.v1` (the trainer
  registry) is imported;
- agent loops `carl_agent` / `carl_chain_agent` -> `recipe.carl.agent_loop`, once
  `verl.experimental.agent_loop` (the agent-loop registry) is imported; the agent-loop yaml registers the same names
  with their constructor arguments in the workers;
- the actor's and reference's FSDP engine -> `recipe.carl.packing.engine.TreePackedFSDPEngine` (verl's engine plus
  tree attention for tree-packed rows, `algorithm.carl.packing=tree`), once `verl.workers.engine` is imported;
- the `file` metrics logger -> `recipe.carl.metrics_file.ResumingFileLogger` (a resumed run keeps the earlier steps'
  lines), once `verl.utils.tracking` is imported.

Importing all three eagerly made `import verl` cost 542 instead of 364 MB PSS. Most verl processes import these
modules anyway; the router and the reward workers do not, and are ~60 MB smaller each in a CPU run.

verl swallows plugin import errors (DEBUG log), so `main_carl` calls `check_registered()`, which re-raises them.
With `CARL_DEVICE=cpu`, the CPU rollout backend and platform of `recipe.carl.cpu` are activated as well.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

# wrapt's post-import hooks (PEP 369's API, which the standard library never adopted).
import wrapt

from recipe.carl.settings import AUTO_AGENT, CHAIN_AGENT, ESTIMATOR, TRAINER_MODE

CPU_MODULE = "recipe.carl.cpu"

#: verl module -> recipe module that registers into it; the recipe module is imported right after the verl one.
REGISTRATIONS = {
    "verl.trainer.ppo.core_algos": "recipe.carl.estimator",
    "verl.trainer.ppo.v1": "recipe.carl.trainer",
    "verl.experimental.agent_loop": "recipe.carl.agent_loop",
    "verl.workers.engine": "recipe.carl.packing.register",
    # Not a registry: verl's `file` logger truncates its metrics file on resume; this makes it resumable.
    "verl.utils.tracking": "recipe.carl.metrics_file",
}


def _activate_cpu() -> bool:
    """Runs `recipe.carl.cpu.register()` (idempotent) when `CARL_DEVICE=cpu`; False when not asked for or absent."""
    if os.environ.get("CARL_DEVICE", "").lower() != "cpu":
        return False
    if importlib.util.find_spec(CPU_MODULE) is None:
        raise RuntimeError(f"CARL_DEVICE=cpu but {CPU_MODULE} is not importable: reinstall with pip install -e .")
    # register() adds the carl_hf rollout backend and activates the CPU platform (gloo, CPU engines) in this process.
    return bool(importlib.import_module(CPU_MODULE).register())


# First, before anything imports verl's engine workers: the CPU platform patches the process-group backend, which
# only takes effect if it runs before `verl.workers.engine_workers` is imported.
CPU_ACTIVE = _activate_cpu()


def _register_when_imported() -> None:
    """Hooks each recipe module of `REGISTRATIONS` onto its verl module (at once where verl already imported it).

    A registration that fails makes that verl import fail, with the recipe's error.
    """
    for verl_module, recipe_module in REGISTRATIONS.items():
        wrapt.register_post_import_hook(lambda _module, name=recipe_module: importlib.import_module(name), verl_module)


_register_when_imported()


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
    missing += [f"agent loop {name!r}" for name in (AUTO_AGENT, CHAIN_AGENT) if name not in _agent_loop_registry]
    if missing:
        raise RuntimeError(
            f"verl does not resolve {', '.join(missing)}: the `verl.plugins` entry point did not run. Reinstall the "
            "project (`pip install -e .`) so `carl = recipe.carl.plugin` is registered, and check that "
            "`python -c 'import recipe.carl.plugin'` imports without error."
        )
