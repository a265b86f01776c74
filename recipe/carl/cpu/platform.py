"""A CPU "platform" for verl 0.9.1, active only when ``CARL_DEVICE=cpu``.

verl 0.9.1 knows NVIDIA, Ascend and ROCm platforms and falls back to NVIDIA on a machine without accelerators,
which makes ``main_ppo`` ask for NCCL, CUDA devices and flash-attn. :func:`activate` makes the trainer run on CPU
through verl's own extension points wherever one exists:

1. ``PlatformRegistry.register("cpu")`` + ``set_platform``: a :class:`PlatformCPU` whose device is ``"cpu"``,
   whose collective backend is ``gloo`` and whose ``device_module`` is a ``torch.cpu`` shim with the memory and
   RNG calls verl makes on ``get_torch_device()``.
2. ``EngineRegistry.register(..., device="cpu")``: verl registers its FSDP engines for ``cuda``/``npu`` only;
   the same classes work on CPU with FSDP2 + gloo. (This replaces the ``VERL_ENGINE_DEVICE=cuda`` env hack.)
3. One monkeypatch, :func:`_patch_process_group_backend` (see there for why no public hook exists).
4. In the driver process only, :mod:`recipe.carl.cpu.watchdog`: a run whose Ray actors cannot get their
   resources fails with a message after ``CARL_RAY_PENDING_TIMEOUT_S`` (default 180 s) instead of hanging.

What stays in the config (``+device=cpu``): a fake logical Ray GPU, because verl's
resource pools always request the platform's accelerator resource and only count ``GPU``/``NPU`` keys; sdpa
attention; FSDP2; slim worker counts.

Nothing here runs unless ``CARL_DEVICE=cpu`` is set, so importing this module on a GPU node changes nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import types
from contextlib import contextmanager
from typing import Any

import torch
import wrapt

from recipe.carl.cpu import watchdog

logger = logging.getLogger(__name__)

#: Environment variable that turns the CPU platform on (value ``cpu``). It must be set in every process: the CPU
#: yaml forwards it to Ray workers through ``ray_kwargs.ray_init.runtime_env.env_vars``.
DEVICE_ENV = "CARL_DEVICE"

PLATFORM_NAME = "cpu"

_activated = False


def is_requested() -> bool:
    """Return True when this process was asked to run verl on CPU (``CARL_DEVICE=cpu``).

    Raises:
        ValueError: If ``CARL_DEVICE`` holds anything other than ``cpu`` or nothing.
    """
    value = os.environ.get(DEVICE_ENV, "").strip().lower()
    if value in ("", "auto", "gpu", "cuda"):
        return False
    if value != "cpu":
        raise ValueError(f"{DEVICE_ENV}={value!r} is not understood; set it to 'cpu' or unset it")
    return True


def is_active() -> bool:
    """Return True once :func:`activate` has switched this process to the CPU platform."""
    return _activated


def _mem_zero(*args, **kwargs) -> int:
    return 0


def _mem_get_info(*args, **kwargs) -> tuple[int, int]:
    # (free, total) of host memory: verl logs it and sizes nothing on CPU from it.
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        avail = os.sysconf("SC_AVPHYS_PAGES")
        return avail * page_size, pages * page_size
    except (ValueError, OSError):
        return 0, 0


def _noop(*args, **kwargs) -> None:
    return None


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def empty_host_cache(*args, **kwargs) -> None:
    """The CPU's ``empty_cache``: hand the heap's free pages back to the OS (glibc's ``malloc_trim``).

    glibc keeps freed memory for reuse, so without this each process of a CPU run holds on to its largest phase so
    far (the actor's update, a validation's generation) for the rest of the run, next to the other processes' peaks.
    verl calls ``empty_cache`` around every weight sync. A no-op where the C library is not glibc.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _build_device_module() -> types.ModuleType:
    """Return a ``torch.cpu`` look-alike with the ``torch.cuda`` calls verl 0.9.1 makes via ``get_torch_device()``.

    ``torch.cpu`` lacks the memory statistics, RNG state and device-name calls; they get host equivalents or
    zeros. Attributes not listed fall through to ``torch.cpu``.
    """
    shim = types.ModuleType("carl_cpu_device_module")
    shim.__dict__.update({k: getattr(torch.cpu, k) for k in dir(torch.cpu) if not k.startswith("__")})
    shim.__dict__.update(
        is_available=lambda: True,
        is_initialized=lambda: True,
        device_count=lambda: 1,
        current_device=lambda: "cpu",
        set_device=_noop,
        synchronize=_noop,
        empty_cache=empty_host_cache,
        ipc_collect=_noop,
        set_per_process_memory_fraction=_noop,
        reset_peak_memory_stats=_noop,
        memory_allocated=_mem_zero,
        memory_reserved=_mem_zero,
        max_memory_allocated=_mem_zero,
        max_memory_reserved=_mem_zero,
        mem_get_info=_mem_get_info,
        get_rng_state=lambda *a, **k: torch.get_rng_state(),
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        manual_seed=lambda seed: torch.manual_seed(seed),
        manual_seed_all=lambda seed: torch.manual_seed(seed),
        # flops_counter divides by the device's peak FLOPs looked up by name; an unknown name gives a 0 MFU.
        get_device_name=lambda *a, **k: "CPU",
        get_device_capability=lambda *a, **k: (None, None),
    )
    return shim


def _make_platform_class():  # noqa: C901  (a class built on call, as verl is imported then: its methods count)
    from verl.plugin.platform import PlatformBase

    class PlatformCPU(PlatformBase):
        """verl platform for CPU-only runs: device ``cpu``, gloo collectives, a fake Ray ``GPU`` resource."""

        _device_module = _build_device_module()

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> types.ModuleType:
            return self._device_module

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check: bool = False) -> bool:
            # Never auto-detected: CPU runs are opted into with CARL_DEVICE=cpu, which calls set_platform().
            return False

        def current_device(self) -> str:
            # verl passes this to `.to(...)` and `torch.device(...)`; "cpu" keeps tensors on the host (an int would
            # mean cuda:<int>).
            return "cpu"

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: int | None = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            empty_host_cache()

        def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            # Ray sets this for the fake logical GPU; nothing reads it on a CPU-only host.
            return "CUDA_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            # verl's ResourcePoolManager always reserves one accelerator per trainer rank and its availability
            # check counts only "GPU"/"NPU" keys, so CPU runs give Ray a fake logical GPU (ray_init.num_gpus).
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None

    return PlatformCPU


def _require_attr(module: Any, name: str, what: str) -> Any:
    """Return ``module.name`` or raise a RuntimeError naming the verl symbol this code depends on."""
    if not hasattr(module, name):
        raise RuntimeError(
            f"carl CPU platform: verl symbol {module.__name__}.{name} ({what}) is missing; this code targets "
            f"verl==0.9.1 (see recipe/carl/REQUIRED_VERL.txt). Update recipe/carl/cpu/platform.py for this verl."
        )
    return getattr(module, name)


def _patch_process_group_backend() -> None:
    """Make verl's trainer process group use plain ``gloo`` on CPU.

    MONKEYPATCH of ``verl.utils.distributed.initialize_global_process_group_ray``. Why no public hook exists:
    it builds the backend string ``f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"``; with device ``cpu``
    that is ``"cpu:gloo,cpu:gloo"``, which torch rejects ("Duplicate device type cpu"), and
    ``TrainingWorker.__init__`` calls it without a ``backend`` argument and without any config knob. The wrapper
    only fills in ``backend="gloo"`` when the caller passed none. ``verl.workers.engine_workers`` binds the name
    with ``from ... import`` at import time, so its binding is patched too when that module is already loaded.
    """
    import verl.utils.distributed as dist_mod

    original = _require_attr(dist_mod, "initialize_global_process_group_ray", "process-group init for Ray workers")
    if getattr(original, "_carl_cpu_patched", False):
        return

    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return original(timeout_second=timeout_second, backend=backend or "gloo")

    initialize_global_process_group_ray._carl_cpu_patched = True
    dist_mod.initialize_global_process_group_ray = initialize_global_process_group_ray
    engine_workers = sys.modules.get("verl.workers.engine_workers")
    if engine_workers is not None:
        _require_attr(engine_workers, "initialize_global_process_group_ray", "imported by TrainingWorker")
        engine_workers.initialize_global_process_group_ray = initialize_global_process_group_ray


def _register_cpu_engines() -> None:
    """Register verl's FSDP engines for device ``cpu`` through the public ``EngineRegistry.register``."""
    from verl.workers import engine as engine_mod

    registry = _require_attr(engine_mod, "EngineRegistry", "training-engine registry")
    lm_engine = _require_attr(engine_mod, "FSDPEngineWithLMHead", "FSDP language-model engine")
    from verl.workers.engine.fsdp import transformer_impl as fsdp_impl

    value_engine = _require_attr(fsdp_impl, "FSDPEngineWithValueHead", "FSDP value-model engine (critic)")
    for model_type, cls in (("language_model", lm_engine), ("value_model", value_engine)):
        try:
            registry.register(model_type=model_type, backend=["fsdp", "fsdp2"], device=PLATFORM_NAME)(cls)
        except AssertionError as e:
            # verl asserts on a duplicate key: fine when it is our own earlier registration of the same class.
            if "already" not in str(e):
                raise


def activate() -> bool:
    """Switch this process to the CPU platform if ``CARL_DEVICE=cpu``; otherwise do nothing.

    Idempotent and cheap to call from a verl plugin module in every process. Must run before verl code reads the
    platform (``import verl`` loading the plugin is early enough: verl resolves its platform lazily).

    Returns:
        True if the CPU platform is active in this process.

    Raises:
        RuntimeError: If a verl symbol this relies on moved (names it).
        ValueError: If ``CARL_DEVICE`` has an unknown value.
    """
    global _activated
    if _activated:
        return True
    if not is_requested():
        return False
    from verl.plugin import platform as platform_pkg

    registry = _require_attr(platform_pkg, "PlatformRegistry", "platform registry")
    set_platform = _require_attr(platform_pkg, "set_platform", "platform singleton setter")
    cls = registry.register(platform=PLATFORM_NAME)(_make_platform_class())
    set_platform(cls())
    _patch_process_group_backend()
    # When (and only where) verl's engines are imported: that module alone costs a process ~150 MB.
    wrapt.register_post_import_hook(lambda _module: _register_cpu_engines(), "verl.workers.engine")
    # CPU runs are where logical-CPU starvation hangs verl silently; fail them with a message instead.
    watchdog.start()
    _activated = True
    logger.info("carl: verl CPU platform active (CARL_DEVICE=cpu)")
    return True
