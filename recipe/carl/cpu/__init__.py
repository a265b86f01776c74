"""CPU support for running verl 0.9.1 (and the CARL recipe) without a GPU or vLLM.

Public entry points:

* :func:`register` -- call once per process from the recipe's verl plugin module: registers the ``carl_hf``
  transformers rollout backend (always; it also serves on GPU where vLLM is absent) and activates the CPU
  platform when ``CARL_DEVICE=cpu``. Idempotent.
* :func:`recipe.carl.cpu.platform.activate` / :func:`recipe.carl.cpu.registry.register_rollout` -- the two halves.
* ``recipe/carl/config/device/cpu.yaml`` (``+device=cpu``) -- the config overrides a CPU run needs;
  ``cpu_vllm.yaml`` (``+device=cpu_vllm``) -- the same with verl's own vLLM rollout (vLLM's CPU build, see
  :mod:`recipe.carl.cpu.vllm_cpu`, whose weight-sync patch :func:`register` hooks onto vLLM in CPU processes).

Importing this package imports neither torch nor verl; :func:`register` imports only verl's platform module (under
``CARL_DEVICE=cpu``) and hooks the rest onto verl's own imports: the rollout backend is registered once a process
imports ``verl.workers.rollout``, the CPU engines once it imports ``verl.workers.engine``. Importing those here made
every process that imports verl load them (~150 MB on top of ``import verl``), the router and the reward workers
included, which use neither.
"""

from __future__ import annotations

from recipe.carl.cpu.registry import register_rollout


def register() -> bool:
    """Register the ``carl_hf`` rollout and, under ``CARL_DEVICE=cpu``, activate the CPU platform.

    Returns:
        True if the CPU platform is active in this process.
    """
    import wrapt

    from recipe.carl.cpu.platform import activate  # here, not at the top: it imports torch (see the docstring)

    active = activate()
    wrapt.register_post_import_hook(lambda _module: register_rollout(), "verl.workers.rollout")
    if active:
        # Not at the top: `python -m recipe.carl.cpu.vllm_cpu` would then run that module twice (runpy warns).
        from recipe.carl.cpu.vllm_cpu import install_hooks

        # Runs only where a process imports vLLM (the vLLM worker, the vLLM server actor); see vllm_cpu.
        install_hooks()
    return active


__all__ = ["register"]
