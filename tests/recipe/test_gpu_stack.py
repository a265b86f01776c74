"""The GPU stack check (`recipe.carl.gpu_stack`), its start-up use (`preflight.check_gpu_stack`), the GPU install
script (`scripts/install_gpu.sh --print`, with a fake `nvidia-smi` and `nvcc`) and, marked `network`, pip's
resolution of the pinned `.[gpu]` set from the package index (nothing is installed).

Driver minimums by hand from NVIDIA's "CUDA Compatibility" (minor-version compatibility, Linux): CUDA 13.x >= 580,
12.x >= 525, 11.x >= 450.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from packaging.requirements import Requirement

from carl_core import CARLConfigError
from recipe.carl import gpu_stack, preflight
from recipe.carl.gpu_stack import GpuStack, driver_problem, nvcc_problem, problems

REPO = Path(__file__).resolve().parents[2]
HAS_DRIVER = os.path.exists("/proc/driver/nvidia/version")

PROPRIETARY = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\nGCC version: gcc"
)
OPEN = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.82.07  Release Build  (dvs-builder@U16)  Wed Aug"
PINNED_OK = dict(gpu_stack.PINNED)


def _stack(**kw) -> GpuStack:
    """A healthy H100 node with the pinned stack; keyword arguments change one fact."""
    base = dict(
        driver="580.82.07",
        torch="2.11.0+cu130",
        torch_cuda="13.0",
        cuda_available=True,
        gpus=("NVIDIA H100 80GB HBM3",) * 8,
        packages=PINNED_OK,
    )
    return GpuStack(**{**base, **kw})


# ---- pins -------------------------------------------------------------------------------------------------------


def test_pins_are_verl_extras_pins():
    """PINNED is what verl 0.9.1's `vllm`, `fsdp` and `flash-attn-cu130torch211` extras require (its own metadata)."""
    assert importlib.metadata.version("verl") == gpu_stack.PINNED["verl"]
    pins = {}
    for line in importlib.metadata.requires("verl"):
        req = Requirement(line)
        extras = {
            e for e in ("vllm", "fsdp", "flash-attn-cu130torch211") if req.marker and req.marker.evaluate({"extra": e})
        }
        spec = str(req.specifier)
        if extras and spec.startswith("=="):
            pins.setdefault(req.name, spec[2:])
    assert {k: v for k, v in pins.items() if k in gpu_stack.PINNED} == {
        k: v for k, v in gpu_stack.PINNED.items() if k != "verl"
    }


# ---- facts ------------------------------------------------------------------------------------------------------


def test_driver_version_from_the_kernel_module():
    assert gpu_stack.parse_proc_driver(PROPRIETARY) == "535.183.01"
    assert gpu_stack.parse_proc_driver(OPEN) == "580.82.07"
    assert gpu_stack.parse_proc_driver("no driver here") is None


def _fake_tool(folder: Path, name: str, output: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / name
    tool.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\n")
    tool.chmod(0o755)
    return tool


def test_driver_version_from_nvidia_smi_without_the_kernel_module(tmp_path, monkeypatch):
    _fake_tool(tmp_path / "bin", "nvidia-smi", "570.124.06\n570.124.06")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert gpu_stack.read_driver(proc=str(tmp_path / "absent")) == "570.124.06"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_stack.read_driver(proc=str(tmp_path / "absent")) is None


@pytest.mark.skipif(HAS_DRIVER, reason="this machine has an NVIDIA driver")
def test_probe_on_a_machine_without_a_driver():
    import torch

    stack = gpu_stack.probe()
    assert stack.driver is None and stack.torch == torch.__version__
    assert stack.packages["verl"] == importlib.metadata.version("verl")
    assert problems(stack) == []  # nothing to check: a CPU machine, or a driver process on a head node


# ---- checks -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("driver", "cuda", "need"),
    [
        ("535.183.01", "13.0", 580),  # R535 (LTSB) with PyPI's torch 2.11.0
        ("570.124.06", "13.0", 580),
        ("579.99", "13.1", 580),
        ("580.65.06", "13.0", None),
        ("580.82.07", "13.0", None),
        ("535.183.01", "12.8", None),  # CUDA 12.x runs on >= 525
        ("520.61.05", "12.1", 525),
        ("450.80.02", "11.8", None),
    ],
)
def test_driver_against_cuda(driver, cuda, need):
    message = driver_problem(driver, cuda)
    if need is None:
        assert message is None
    else:
        assert f"driver {driver} is too old for CUDA {cuda}, which needs driver >= {need}" in message
        assert f"R{need}" in message and f"cuda-compat-{cuda.replace('.', '-')}" in message


def test_a_healthy_node_has_no_problem():
    assert problems(_stack()) == []
    assert problems(_stack(), "flex_attention") == []


def test_no_driver_means_nothing_to_check():
    assert problems(GpuStack(driver=None, torch="2.13.0+cpu", packages={})) == []


def test_old_driver_and_missing_flash_attn_are_both_named():
    found = problems(_stack(driver="535.183.01", cuda_available=False, packages={**PINNED_OK, "flash-attn": None}))
    assert len(found) == 2
    assert "torch 2.11.0+cu130: NVIDIA driver 535.183.01 is too old for CUDA 13.0" in found[0]
    assert "flash-attn is not installed" in found[1] and "--no-build-isolation" in found[1]
    assert "bash scripts/install_gpu.sh" in found[1]


def test_flash_attn_is_needed_for_flash_attention_2_whatever_the_override():
    no_flash = _stack(packages={**PINNED_OK, "flash-attn": None})
    for allow in (False, True):
        (message,) = problems(no_flash, allow_no_flash_attn=allow)
        assert "attn_implementation is flash_attention_2 (verl's default)" in message
        assert gpu_stack.ALLOW_NO_FLASH_ATTN_ENV not in message  # no override: the model cannot load without it


@pytest.mark.parametrize("attn", ["flex_attention", "sdpa"])
def test_a_gpu_run_without_flash_attn_is_refused_with_its_cost_unless_allowed(attn, monkeypatch):
    """verl's log-prob code loops in Python over every token without flash-attn's cross-entropy kernel (F4)."""
    no_flash = _stack(packages={**PINNED_OK, "flash-attn": None})
    (message,) = problems(no_flash, attn, allow_no_flash_attn=False)
    assert (
        f"attention {attn} runs without flash-attn, but verl then computes every log-prob with a Python loop" in message
    )
    assert "logprobs_from_logits_v2" in message and "CARL_ALLOW_NO_FLASH_ATTN=1 to run without it" in message
    assert problems(no_flash, attn, allow_no_flash_attn=True) == []
    broken = _stack(flash_attn_error="ImportError: undefined symbol")  # verl would fall back the same way
    assert "does not import" in problems(broken, attn, allow_no_flash_attn=False)[0]
    assert problems(broken, attn, allow_no_flash_attn=True) == []
    # the default reads the environment
    monkeypatch.delenv(gpu_stack.ALLOW_NO_FLASH_ATTN_ENV, raising=False)
    assert len(problems(no_flash, attn)) == 1
    monkeypatch.setenv(gpu_stack.ALLOW_NO_FLASH_ATTN_ENV, "1")
    assert problems(no_flash, attn) == []


def test_flash_attn_that_does_not_import_is_rebuilt():
    (message,) = problems(_stack(flash_attn_error="ImportError: undefined symbol: _ZN3c104cuda"))
    assert "flash-attn 2.8.3 does not import (ImportError: undefined symbol" in message
    assert "--no-build-isolation --no-cache-dir --force-reinstall" in message


def test_cpu_torch_on_a_gpu_node():
    (message,) = problems(_stack(torch="2.13.0+cpu", torch_cuda=None, cuda_available=False), "flex_attention")
    assert "torch 2.13.0+cpu is a CPU build" in message and "bash scripts/install_gpu.sh" in message


def test_a_good_driver_but_no_visible_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (message,) = problems(_stack(cuda_available=False, gpus=()), "flex_attention")
    assert "sees no GPU although driver 580.82.07 supports it (CUDA_VISIBLE_DEVICES='')" in message


@pytest.mark.parametrize(
    ("nvcc", "torch_cuda", "ok"),
    [
        ("Cuda compilation tools, release 13.0, V13.0.48", "13.0", True),
        ("Cuda compilation tools, release 13.1, V13.1.80", "13.0", True),  # a minor mismatch: torch only warns
        ("Cuda compilation tools, release 12.4, V12.4.131", "13.0", False),
        (None, "13.0", False),
        ("Cuda compilation tools, release 12.8, V12.8.93", "12.8", True),
    ],
)
def test_nvcc_for_the_flash_attn_build(nvcc, torch_cuda, ok):
    message = nvcc_problem(nvcc, torch_cuda)
    assert (message is None) == ok
    if not ok:
        assert "needs the CUDA 13.x toolkit's nvcc" in message and "FLASH_ATTN_WHEEL" in message
        assert ("nvcc is CUDA 12.4" if nvcc else "no nvcc was found") in message


def test_report_says_what_differs_from_the_pins_and_each_problem():
    lines = gpu_stack.report(_stack(driver="535.183.01", packages={**PINNED_OK, "transformers": "5.10.4"}))
    assert lines[0] == "driver        535.183.01"
    assert lines[1] == "torch         2.11.0+cu130 (CUDA 13.0, needs driver >= 580)"
    assert lines[2] == "GPUs          8 x NVIDIA H100 80GB HBM3 (torch.cuda.is_available() = True)"
    assert "transformers  5.10.4  (.[gpu] pins 5.9.0)" in lines
    assert "vllm          0.24.0" in lines
    assert lines[-1].startswith("PROBLEM: torch 2.11.0+cu130: NVIDIA driver 535.183.01 is too old")
    assert gpu_stack.report(_stack())[-1] == "ok: driver, torch and flash-attn fit"


# ---- start-up check ---------------------------------------------------------------------------------------------


def _config(device="cuda", attn=None):
    override = {} if attn is None else {"attn_implementation": attn}
    return OmegaConf.create(
        {"trainer": {"device": device}, "actor_rollout_ref": {"model": {"override_config": override}}}
    )


def test_start_up_check_stops_an_old_driver_with_the_fix():
    with pytest.raises(CARLConfigError, match="(?s)CARL_SKIP_GPU_CHECK=1.*driver 535.183.01 is too old.*>= 580"):
        preflight.check_gpu_stack(_config(), _stack(driver="535.183.01", cuda_available=False))
    preflight.check_gpu_stack(_config(), _stack())


def test_start_up_check_refuses_a_gpu_run_without_flash_attn_unless_told(monkeypatch):
    monkeypatch.delenv(gpu_stack.ALLOW_NO_FLASH_ATTN_ENV, raising=False)
    no_flash = _stack(packages={**PINNED_OK, "flash-attn": None})
    with pytest.raises(CARLConfigError, match="flash-attn is not installed"):
        preflight.check_gpu_stack(_config(), no_flash)  # verl's default: flash_attention_2
    with pytest.raises(CARLConfigError, match="(?s)Python loop.*CARL_ALLOW_NO_FLASH_ATTN=1"):
        preflight.check_gpu_stack(_config(attn="flex_attention"), no_flash)  # tree packing's attention
    monkeypatch.setenv(gpu_stack.ALLOW_NO_FLASH_ATTN_ENV, "1")
    preflight.check_gpu_stack(_config(attn="flex_attention"), no_flash)
    with pytest.raises(CARLConfigError, match="flash-attn is not installed"):
        preflight.check_gpu_stack(_config(), no_flash)


def test_start_up_checks_begin_with_the_gpu_stack(monkeypatch):
    """`preflight.run` (what main_carl calls) checks the GPU stack before anything else."""
    monkeypatch.setattr(gpu_stack, "probe", lambda **_: _stack(driver="550.163.01", cuda_available=False))
    with pytest.raises(CARLConfigError, match="driver 550.163.01 is too old"):
        preflight.run(_config())


def test_start_up_check_skips_cpu_runs_and_on_request(monkeypatch):
    bad = _stack(driver="470.256.02", cuda_available=False)
    preflight.check_gpu_stack(_config(device="cpu"), bad)
    monkeypatch.setenv(preflight.SKIP_GPU_ENV, "1")
    preflight.check_gpu_stack(_config(), bad)


# ---- scripts/install_gpu.sh ---------------------------------------------------------------------------------------


def _fake_smi(folder: Path, driver: str, compute_caps: str = "") -> None:
    """A fake `nvidia-smi` answering the driver query and, when given, the compute-capability query."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "nvidia-smi"
    tool.write_text(
        f'#!/bin/sh\ncase "$1" in\n  --query-gpu=compute_cap) printf "{compute_caps}" ;;\n  *) echo {driver} ;;\nesac\n'
    )
    tool.chmod(0o755)


def _fake_cxx(folder: Path, version: str) -> Path:
    """A fake g++ of `version` (what torch's extension builder reads: `--version`, `-dumpfullversion`)."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "g++"
    tool.write_text(
        f'#!/bin/sh\ncase "$1" in\n  --version) echo "g++ (GCC) {version}" ;;\n  *) echo {version} ;;\nesac\n'
    )
    tool.chmod(0o755)
    return tool


PYTHON_H = Path(sysconfig.get_paths()["include"]) / "Python.h"
needs_python_h = pytest.mark.skipif(not PYTHON_H.is_file(), reason=f"{PYTHON_H} is missing: the script would stop")


def _install(tmp_path, driver: str | None, nvcc: str, compute_caps: str = "", **env) -> subprocess.CompletedProcess:
    """`install_gpu.sh --print` with a fake nvidia-smi (driver, GPUs), a fake CUDA_HOME (nvcc) and a fake g++ 13."""
    path = [str(tmp_path / "bin")] if driver else []
    if driver:
        _fake_smi(tmp_path / "bin", driver, compute_caps)
    _fake_tool(tmp_path / "cuda" / "bin", "nvcc", nvcc)
    full = {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in ("TORCH_INDEX_URL", "FLASH_ATTN_WHEEL", "FLASH_ATTN_CUDA_ARCHS", "CXX")
        },
        "PATH": os.pathsep.join([*path, os.environ["PATH"]]),
        "CUDA_HOME": str(tmp_path / "cuda"),
        "CXX": str(_fake_cxx(tmp_path / "gcc13", "13.3.0")),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        **env,
    }
    return subprocess.run(
        ["bash", "scripts/install_gpu.sh", "--print"], cwd=REPO, env=full, capture_output=True, text=True, timeout=120
    )


def _commands(out: str) -> list[str]:
    return [line[2:].replace(sys.executable, "python") for line in out.splitlines() if line.startswith("+ ")]


@needs_python_h
@pytest.mark.skipif(HAS_DRIVER, reason="this machine's driver would be read instead of the fake nvidia-smi")
def test_install_order_torch_then_flash_attn_without_isolation_then_the_extra(tmp_path):
    proc = _install(tmp_path, "580.82.07", "Cuda compilation tools, release 13.0, V13.0.48")
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc.stdout) == [
        "python -m pip install torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0",
        "python -m pip install setuptools wheel packaging psutil ninja einops",
        "env FLASH_ATTENTION_FORCE_BUILD=TRUE python -m pip install --no-build-isolation flash-attn==2.8.3",
        "python -m pip install -e .[gpu]",
        "python -m recipe.carl.gpu_stack",
    ]
    assert "NVIDIA driver 580.82.07: ok for CUDA 13.0" in proc.stdout


@pytest.mark.skipif(HAS_DRIVER, reason="this machine's driver would be read instead of the fake nvidia-smi")
def test_install_stops_before_downloading_on_an_old_driver(tmp_path):
    proc = _install(tmp_path, "550.163.01", "Cuda compilation tools, release 13.0, V13.0.48")
    assert proc.returncode == 1 and _commands(proc.stdout) == []
    assert "driver 550.163.01 is too old for CUDA 13.0, which needs driver >= 580" in proc.stdout


@needs_python_h
@pytest.mark.skipif(HAS_DRIVER, reason="this machine's driver would be read instead of the fake nvidia-smi")
def test_install_stops_before_building_flash_attn_with_the_wrong_nvcc(tmp_path):
    proc = _install(tmp_path, "580.82.07", "Cuda compilation tools, release 12.4, V12.4.131")
    assert proc.returncode == 1
    assert _commands(proc.stdout) == ["python -m pip install torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"]
    assert "needs the CUDA 13.x toolkit's nvcc, and nvcc is CUDA 12.4" in proc.stdout
    # a prebuilt wheel needs no nvcc
    proc = _install(tmp_path, "580.82.07", "release 12.4", FLASH_ATTN_WHEEL="/wheels/flash_attn-2.8.3-cp311.whl")
    assert proc.returncode == 0, proc.stderr
    assert "python -m pip install /wheels/flash_attn-2.8.3-cp311.whl" in _commands(proc.stdout)


TORCH_ONLY = ["python -m pip install torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"]
BUILD = "python -m pip install --no-build-isolation flash-attn==2.8.3"


@needs_python_h
@pytest.mark.skipif(HAS_DRIVER, reason="this machine's driver would be read instead of the fake nvidia-smi")
@pytest.mark.parametrize(
    ("caps", "given", "archs"),
    [
        ("9.0\\n9.0\\n", None, "90"),  # 8 x H100: one architecture instead of flash-attn's four
        ("8.6\\n", None, "80"),  # an A10 runs the sm_80 build
        ("9.0\\n12.0\\n", None, "90;120"),
        ("9.0\\n", "80;90", "80;90"),  # FLASH_ATTN_CUDA_ARCHS wins
        ("7.0\\n", None, None),  # no GPU flash-attn builds for: its own default
    ],
)
def test_flash_attn_is_built_for_this_nodes_gpus(tmp_path, caps, given, archs):
    env = {} if given is None else {"FLASH_ATTN_CUDA_ARCHS": given}
    proc = _install(tmp_path, "580.82.07", "Cuda compilation tools, release 13.0, V13.0.48", caps, **env)
    assert proc.returncode == 0, proc.stderr
    arch_env = f" FLASH_ATTN_CUDA_ARCHS={archs}" if archs else ""
    assert f"env FLASH_ATTENTION_FORCE_BUILD=TRUE{arch_env} {BUILD}" in _commands(proc.stdout)


@pytest.mark.skipif(HAS_DRIVER, reason="this machine's driver would be read instead of the fake nvidia-smi")
def test_install_refuses_architectures_flash_attn_ignores(tmp_path):
    proc = _install(tmp_path, "580.82.07", "release 13.0, V13.0.48", "8.9\\n", FLASH_ATTN_CUDA_ARCHS="89")
    assert proc.returncode == 1 and _commands(proc.stdout) == TORCH_ONLY
    assert "FLASH_ATTN_CUDA_ARCHS='89': flash-attn 2.8.3 builds only for 80;90;100;120 and ignores 89" in proc.stderr


@pytest.mark.skipif(HAS_DRIVER, reason="this machine's driver would be read instead of the fake nvidia-smi")
@pytest.mark.parametrize(
    ("cxx", "problem"),
    [
        ("missing", "no C++ compiler"),
        ("16.1.0", "is gcc 16.1.0, and torch's extension builder accepts gcc >= 6, < 16 with CUDA 13.0"),
        ("5.4.0", "is gcc 5.4.0, and torch's extension builder accepts gcc >= 6, < 16 with CUDA 13.0"),
    ],
)
def test_install_stops_before_building_flash_attn_without_a_fitting_compiler(tmp_path, cxx, problem):
    compiler = str(tmp_path / "none" / "g++") if cxx == "missing" else str(_fake_cxx(tmp_path / "gcc", cxx))
    proc = _install(tmp_path, "580.82.07", "release 13.0, V13.0.48", CXX=compiler)
    assert proc.returncode == 1 and _commands(proc.stdout) == TORCH_ONLY
    assert problem in proc.stdout and "FLASH_ATTN_WHEEL" in proc.stdout
    # a prebuilt wheel needs no compiler
    wheel = gpu_stack.FLASH_ATTN_WHEEL_CP312
    proc = _install(tmp_path, "580.82.07", "release 13.0", CXX=compiler, FLASH_ATTN_WHEEL=wheel)
    assert proc.returncode == 0 and f"python -m pip install {wheel}" in _commands(proc.stdout)


def test_missing_python_headers_stop_the_build_check(tmp_path, monkeypatch, capsys):
    """What `install_gpu.sh` runs before the flash-attn build (`--build-tools`), no Python.h in sysconfig's place."""
    monkeypatch.setenv("CXX", str(_fake_cxx(tmp_path / "gcc", "13.3.0")))
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"include": str(tmp_path / "include")})
    assert gpu_stack.main(["--build-tools", "13.0"]) == 1
    out = capsys.readouterr().out
    assert f"the Python headers are missing ({tmp_path / 'include' / 'Python.h'} does not exist)" in out
    assert "-dev" in out and "FLASH_ATTN_WHEEL" in out
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "Python.h").write_text("")
    assert gpu_stack.main(["--build-tools", "13.0"]) == 0
    assert "(gcc 13.3.0)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("caps", "archs"),
    [(["9.0"] * 8, "90"), (["8.0", "8.6", "8.9"], "80"), (["10.0", "10.3"], "100"), (["12.0", "9.0"], "90;120"),
     (["7.0", "7.5"], ""), ([], "")],
)  # fmt: skip
def test_flash_attn_architectures_of_compute_capabilities(caps, archs):
    assert gpu_stack.flash_attn_archs(caps) == archs


@pytest.mark.parametrize(("value", "ok"), [("90", True), ("80;90;100;120", True), ("89", False), ("", False),
                                            ("90;86", False), ("sm_90", False)])  # fmt: skip
def test_architecture_lists_flash_attn_would_ignore_are_named(value, ok):
    assert (gpu_stack.archs_problem(value) is None) == ok


def test_gcc_ranges_are_torchs():
    """Against the installed torch's own table (torch 2.13 here; the review read the same ranges in torch 2.11)."""
    from torch.utils.cpp_extension import CUDA_GCC_VERSIONS

    for cuda, (low, high) in gpu_stack.CUDA_GCC_VERSIONS.items():
        assert CUDA_GCC_VERSIONS[cuda][0][0] == low and CUDA_GCC_VERSIONS[cuda][1] == (high, 0), cuda


# ---- the pinned set on the package index (network) --------------------------------------------------------------


def _index_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/verl/", timeout=10).close()
        return True
    except OSError:
        return False


def _stub_wheel(folder: Path, name: str, version: str) -> None:
    """An empty wheel that stands in for a package with no binary wheel on the index (flash-attn: source only)."""
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(text)}")
        whl.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")


def _resolve(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    """pip's resolution of `.[gpu]` (+ `extra`) from binary wheels only, flash-attn stubbed; installs nothing."""
    _stub_wheel(tmp_path, "flash-attn", gpu_stack.PINNED["flash-attn"])
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:"]
    cmd += ["--no-build-isolation", "--find-links", str(tmp_path), "--quiet", "--report", str(report), ".[gpu]"]
    proc = subprocess.run([*cmd, *extra], cwd=REPO, capture_output=True, text=True, timeout=600)
    return proc, json.loads(report.read_text()) if proc.returncode == 0 else {}


network = pytest.mark.skipif(not _index_reachable(), reason="the package index (pypi.org) is unreachable")


@pytest.mark.network
@pytest.mark.slow
@network
def test_gpu_extra_resolves_to_the_pinned_binary_stack(tmp_path):
    proc, report = _resolve(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = {i["metadata"]["name"].lower(): i for i in report["install"]}
    for name, pin in gpu_stack.PINNED.items():
        assert resolved[name]["metadata"]["version"] == pin, name
    # every package but the project and the stub is a binary wheel from the index
    urls = [i["download_info"]["url"] for n, i in resolved.items() if n not in ("carl-verl", "flash-attn")]
    assert all(url.endswith(".whl") for url in urls)
    # PyPI's torch is the CUDA 13.0 build (hence driver >= 580), and vLLM 0.24.0 a CUDA 13 build as well
    cuda = [r for r in resolved["torch"]["metadata"]["requires_dist"] if r.startswith("cuda-toolkit")]
    assert cuda and f"=={gpu_stack.INDEX_CUDA}." in cuda[0]
    assert any("cu13" in r for r in resolved["vllm"]["metadata"]["requires_dist"])


@pytest.mark.network
@network
def test_a_pin_the_index_cannot_meet_fails(tmp_path):
    proc, _ = _resolve(tmp_path, "torch==2.11.99")
    assert proc.returncode != 0 and "torch==2.11.99" in proc.stderr
