"""recipe.carl.cpu.vllm_cpu: the start-up checks, the weight-dispatch patch and its guards, the CPU-only hooks.

Tests marked `vllm` need vLLM's CPU build (they run in the vLLM venv, see tests/conftest.py); the rest fake vLLM.
"""

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from recipe.carl.cpu import vllm_cpu

REPO = Path(__file__).resolve().parents[3]
CONFIG_DIR = REPO / "recipe" / "carl" / "config"


# ----------------------------------------------------------------------------------------- start-up checks
def _fake_install(monkeypatch, *, importable=True, cpu="0.32.0", name="0.32.0+cpu"):
    real = vllm_cpu.importlib.util.find_spec
    monkeypatch.setattr(
        vllm_cpu.importlib.util,
        "find_spec",
        lambda mod, *a: (object() if importable else None) if mod == "vllm" else real(mod, *a),
    )
    versions = {vllm_cpu.VLLM_CPU_DIST: cpu, "vllm": name}
    monkeypatch.setattr(vllm_cpu, "_dist_version", versions.get)


def test_check_install_accepts_the_cpu_build_with_its_name_stub(monkeypatch):
    _fake_install(monkeypatch)
    assert vllm_cpu.check_install() == "0.32.0"


def test_missing_vllm_names_the_install_command(monkeypatch):
    _fake_install(monkeypatch, importable=False, cpu=None, name=None)
    with pytest.raises(RuntimeError, match="not installed.*scripts/install_cpu.sh --vllm"):
        vllm_cpu.check_install()


def test_a_cuda_vllm_wheel_is_refused_with_the_install_command(monkeypatch):
    _fake_install(monkeypatch, cpu=None, name="0.33.0")
    with pytest.raises(RuntimeError, match=r"0\.33\.0\) is not vLLM's CPU build.*install_cpu.sh --vllm"):
        vllm_cpu.check_install()


@pytest.mark.parametrize("name", [None, "0.32.0", "0.31.0+cpu"])
def test_missing_or_stale_name_stub_is_refused(monkeypatch, name):
    _fake_install(monkeypatch, name=name)
    with pytest.raises(RuntimeError, match=r"vllm-<version>\+cpu.dist-info.*install_cpu.sh --vllm"):
        vllm_cpu.check_install()


def test_vllm_python_names_the_install_command_when_there_is_none(monkeypatch, tmp_path):
    _fake_install(monkeypatch, importable=False)
    monkeypatch.setenv(vllm_cpu.VLLM_VENV_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="install_cpu.sh --vllm"):
        vllm_cpu.vllm_python()
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()
    monkeypatch.setenv(vllm_cpu.VLLM_VENV_ENV, str(tmp_path / "venv"))
    assert vllm_cpu.vllm_python() == str(tmp_path / "venv" / "bin" / "python")


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="carl_trainer", overrides=["actor_rollout_ref.model.path=/nonexistent", *overrides])


def test_cpu_vllm_config_reuses_cpu_and_sets_what_vllm_needs():
    cfg, base = _compose("+device=cpu_vllm"), _compose("+device=cpu")
    rollout = cfg.actor_rollout_ref.rollout
    assert rollout.name == "vllm" and rollout.enable_sleep_mode is False and rollout.free_cache_engine is False
    assert rollout.enforce_eager is True and rollout.dtype == "float32" and rollout.gpu_memory_utilization <= 0.2
    assert rollout.engine_kwargs.vllm.kv_cache_memory_bytes == 2**30
    assert rollout.checkpoint_engine.update_weights_bucket_megabytes == 64
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars == {"CARL_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    # Everything else is cpu.yaml's.
    assert cfg.actor_rollout_ref.actor == base.actor_rollout_ref.actor and cfg.trainer == base.trainer
    assert cfg.ray_kwargs.ray_init.num_gpus == base.ray_kwargs.ray_init.num_gpus


def test_check_rollout_config(monkeypatch):
    checked = []
    monkeypatch.setattr(vllm_cpu, "check_install", lambda: checked.append(1))
    monkeypatch.delenv("CARL_DEVICE", raising=False)
    vllm_cpu.check_rollout_config(_compose("+device=cpu_vllm"))  # not a CPU run: nothing checked
    monkeypatch.setenv("CARL_DEVICE", "cpu")
    vllm_cpu.check_rollout_config(_compose("+device=cpu"))  # carl_hf: nothing checked
    assert checked == []
    vllm_cpu.check_rollout_config(_compose("+device=cpu_vllm"))
    assert checked == [1]
    with pytest.raises(ValueError, match=r"\+device=cpu_vllm.*enable_sleep_mode"):
        vllm_cpu.check_rollout_config(_compose("+device=cpu", "actor_rollout_ref.rollout.name=vllm"))


# ------------------------------------------------------------------------------------- the patch's guards
def test_patch_fails_loudly_when_vllm_moves_the_function():
    with pytest.raises(RuntimeError, match="dispatch_cpu_unquantized_gemm is missing"):
        vllm_cpu.patch_cpu_gemm_dispatch(types.ModuleType("vllm.model_executor.layers.utils"))
    moved = types.ModuleType("vllm.model_executor.layers.utils")
    moved.dispatch_cpu_unquantized_gemm = lambda layer, keep_weight: None
    with pytest.raises(RuntimeError, match="not \\(layer, remove_weight\\)"):
        vllm_cpu.patch_cpu_gemm_dispatch(moved)


def test_caller_check_fails_loudly_when_a_caller_stops_using_the_name():
    module = types.ModuleType("vllm.model_executor.layers.linear")

    class UnquantizedLinearMethod:
        def process_weights_after_loading(self, layer):
            from somewhere import dispatch_cpu_unquantized_gemm  # noqa: F401

    module.UnquantizedLinearMethod = UnquantizedLinearMethod
    vllm_cpu.check_gemm_callers(module)

    class Renamed:
        def process_weights_after_loading(self, layer):
            from somewhere import prepack_cpu_gemm  # noqa: F401

    module.UnquantizedLinearMethod = Renamed
    with pytest.raises(RuntimeError, match="no longer calls dispatch_cpu_unquantized_gemm"):
        vllm_cpu.check_gemm_callers(module)


# ------------------------------------------------------------------------------------- on real vLLM
@pytest.fixture
def patched_utils(monkeypatch):
    import vllm.model_executor.layers.utils as utils

    monkeypatch.setattr(utils, vllm_cpu.GEMM_NAME, getattr(utils, vllm_cpu.GEMM_NAME))  # restored after the test
    vllm_cpu.patch_cpu_gemm_dispatch()
    return utils


def _layer(out_features=48, in_features=32):
    layer = torch.nn.Module()
    weight = torch.nn.Parameter(torch.randn(out_features, in_features), requires_grad=False)
    weight.weight_loader = lambda param, loaded: param.data.copy_(loaded)  # what vLLM's load_weights calls
    layer.weight = weight
    return layer


@pytest.mark.vllm
def test_linear_and_lm_head_use_the_live_weight_after_the_patch(patched_utils):
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    x = torch.randn(5, 32)
    for method in (UnquantizedLinearMethod(), UnquantizedEmbeddingMethod()):
        layer = _layer()
        weight = layer.weight
        method.process_weights_after_loading(layer)  # vLLM's own call path on CPU
        assert layer.weight is weight and hasattr(layer.weight, "weight_loader"), type(method).__name__
        before = method.apply(layer, x)
        torch.testing.assert_close(before, x @ weight.T)
        layer.weight.weight_loader(layer.weight, 2 * weight.detach().clone())  # a weight sync, in place
        torch.testing.assert_close(method.apply(layer, x), 2 * before)  # vLLM's own dispatch: a stale copy here
        method.process_weights_after_loading(layer)  # verl re-runs it after a full sync: still the live weight
        assert layer.weight is weight
        torch.testing.assert_close(method.apply(layer, x), 2 * before)


@pytest.mark.vllm
def test_without_the_patch_vllm_drops_the_weight(patched_utils):
    # What the patch prevents (and so what the test above would catch): vLLM's own dispatch leaves an empty
    # Parameter without weight_loader, which verl's load_weights cannot load into.
    original = getattr(patched_utils, vllm_cpu.GEMM_NAME)._carl_original
    layer = _layer()
    original(layer, remove_weight=True)
    assert layer.weight.numel() == 0 and not hasattr(layer.weight, "weight_loader")


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", ""])
def test_hooks_patch_vllm_only_on_the_cpu_device(device):
    # A fresh process, as a vLLM worker is: importing verl loads the recipe's plugin, which hooks the patch onto
    # vLLM's layer utilities only under CARL_DEVICE=cpu.
    code = (
        "import verl, vllm.model_executor.layers.linear, vllm.model_executor.layers.utils as u;"
        "print('PATCHED' if getattr(u.dispatch_cpu_unquantized_gemm, '_carl_live_weight', False) else 'ORIGINAL')"
    )
    env = {**os.environ, "CARL_DEVICE": device, "PYTHONPATH": str(REPO), "CARL_RAY_PENDING_TIMEOUT_S": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == ("PATCHED" if device == "cpu" else "ORIGINAL")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="checks the error of a Python without vLLM")
def test_main_carl_refuses_cpu_vllm_without_vllm_before_any_worker_starts(tmp_path):
    env = {**os.environ, "CARL_DEVICE": "cpu", "PYTHONPATH": str(REPO), "CARL_RAY_PENDING_TIMEOUT_S": "0"}
    cmd = [sys.executable, "-m", "recipe.carl.main_carl", "+device=cpu_vllm", "actor_rollout_ref.model.path=/none"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "bash scripts/install_cpu.sh --vllm" in out.stderr, out.stderr[-2000:]
    assert "ray.init" not in out.stderr and "TaskRunner" not in out.stderr  # refused before Ray started
