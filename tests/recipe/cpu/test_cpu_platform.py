"""The CPU platform: opt-in only, what it changes when active, and the guards of its verl dependencies.

Activation changes process-wide verl state, so it is tested in subprocesses; the guards are tested in-process
with the patched symbol removed (they raise before changing anything).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recipe.carl.cpu import platform as cpu_platform

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("CARL_DEVICE", "VERL_USE_EXTERNAL_MODULES")}
    full_env.update(PYTHONPATH=str(REPO), CARL_RAY_PENDING_TIMEOUT_S="0", PYTHONWARNINGS="ignore", **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True, timeout=240
    )


def test_not_active_without_carl_device(monkeypatch):
    monkeypatch.delenv("CARL_DEVICE", raising=False)
    assert not cpu_platform.is_requested()
    proc = _run(
        """
        import recipe.carl.cpu as cpu
        assert cpu.register() is False
        import verl.utils.distributed as d
        from verl.plugin.platform import PlatformRegistry
        assert not getattr(d.initialize_global_process_group_ray, "_carl_cpu_patched", False)
        assert "cpu" not in PlatformRegistry.registered_names()
        from verl.workers.rollout.base import get_rollout_class
        assert get_rollout_class("carl_hf").__name__ == "HFServerAdapter"  # the backend is registered regardless
        print("OK")
        """
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_unknown_carl_device_value_is_an_error(monkeypatch):
    monkeypatch.setenv("CARL_DEVICE", "tpu")
    with pytest.raises(ValueError, match="CARL_DEVICE='tpu'"):
        cpu_platform.is_requested()


def test_active_with_carl_device_cpu_via_verl_plugin_loading():
    proc = _run(
        """
        import verl  # loads recipe.carl.cpu.verl_plugin through VERL_USE_EXTERNAL_MODULES
        import torch.distributed as dist
        from verl.utils.device import get_device_name, get_nccl_backend, get_torch_device, get_device_id
        from verl.workers.engine import EngineRegistry
        import verl.workers.engine_workers as ew
        assert (get_device_name(), get_nccl_backend(), get_device_id()) == ("cpu", "gloo", "cpu")
        assert get_torch_device().get_device_name() == "CPU" and get_torch_device().memory_allocated() == 0
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
        engine = EngineRegistry.get_engine_cls("language_model", "fsdp2")  # the recipe's packed-row engine on verl's
        assert issubclass(engine, FSDPEngineWithLMHead), engine
        ew.initialize_global_process_group_ray(timeout_second=60)  # the patched name TrainingWorker calls
        assert dist.get_backend() == "gloo"
        from recipe.carl.cpu.platform import activate
        assert activate() is True  # idempotent
        print("OK")
        """,
        CARL_DEVICE="cpu",
        VERL_USE_EXTERNAL_MODULES="recipe.carl.cpu.verl_plugin",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        WORLD_SIZE="1",
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_empty_cache_hands_freed_heap_back_to_the_os():
    # verl's empty_cache calls (around each weight sync) are the CPU processes' chance to return a phase's memory.
    device_module = cpu_platform._build_device_module()
    assert device_module.empty_cache is cpu_platform.empty_host_cache

    def rss_mb() -> int:
        return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) // 1024

    chunks = [bytearray(64 * 1024) for _ in range(6000)]  # ~375 MB of blocks below glibc's mmap threshold
    keep = chunks[-1]  # the top block pins the heap, so freeing the rest alone returns nothing
    del chunks
    held = rss_mb()
    device_module.empty_cache()
    assert rss_mb() < held - 250
    assert len(keep) == 64 * 1024


def test_gloo_patch_guard_raises_when_symbol_missing(monkeypatch):
    import verl.utils.distributed as dist_mod

    monkeypatch.delattr(dist_mod, "initialize_global_process_group_ray")
    with pytest.raises(RuntimeError, match=r"verl\.utils\.distributed\.initialize_global_process_group_ray"):
        cpu_platform._patch_process_group_backend()


def test_gloo_patch_guard_checks_engine_workers_binding(monkeypatch):
    import verl.utils.distributed as dist_mod
    import verl.workers.engine_workers as ew

    original = dist_mod.initialize_global_process_group_ray
    monkeypatch.delattr(ew, "initialize_global_process_group_ray")
    try:
        with pytest.raises(RuntimeError, match=r"verl\.workers\.engine_workers\.initialize_global_process_group_ray"):
            cpu_platform._patch_process_group_backend()
    finally:
        dist_mod.initialize_global_process_group_ray = original


def test_engine_registry_guard_raises_when_symbol_missing(monkeypatch):
    import verl.workers.engine as engine_mod

    monkeypatch.delattr(engine_mod, "EngineRegistry")
    with pytest.raises(RuntimeError, match=r"verl\.workers\.engine\.EngineRegistry"):
        cpu_platform._register_cpu_engines()


def test_platform_registry_guard_raises_when_symbol_missing(monkeypatch):
    import verl.plugin.platform as platform_pkg

    monkeypatch.setenv("CARL_DEVICE", "cpu")
    monkeypatch.setattr(cpu_platform, "_activated", False)
    monkeypatch.delattr(platform_pkg, "PlatformRegistry")
    with pytest.raises(RuntimeError, match=r"verl\.plugin\.platform\.PlatformRegistry"):
        cpu_platform.activate()
