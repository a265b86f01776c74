"""The GPU stack a CUDA run needs (driver, torch's CUDA build, flash-attn), checked before any worker starts.

`pip install -e ".[gpu]"` selects verl 0.9.1's `vllm` and `fsdp` extras (`PINNED`). Two of their facts make a GPU
node fail late and far from the cause unless they are checked first:

- torch 2.11.0 on PyPI is built for CUDA 13.0, which needs an NVIDIA driver >= 580 (NVIDIA's minor-version
  compatibility: CUDA 13.x >= 580, 12.x >= 525, 11.x >= 450). On an R535/R550/R570 node `torch.cuda.is_available()`
  is False and verl's workers find no GPU;
- flash-attn 2.8.3 exists on PyPI only as a source distribution whose build imports torch, so it fails under pip's
  build isolation (`scripts/install_gpu.sh` builds it without); without it, verl's default attention
  (`flash_attention_2`) fails inside each worker when the model loads.

`probe` gathers the facts of this machine; `problems` (pure: tests inject the facts) turns them into messages that
name the fix; `report` is the one-screen summary that `python -m recipe.carl.gpu_stack`, `scripts/install_gpu.sh`
and `benchmarks/gpu_check.py` print. `recipe.carl.preflight` runs `problems` at start-up.

Standard library only at import (torch is imported inside `probe`): `benchmarks/gpu_check.py` runs this on machines
that have torch and transformers but no verl, and `install_gpu.sh` runs the driver check before torch is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

PINNED = {
    "verl": "0.9.1",
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "torchaudio": "2.11.0",
    "vllm": "0.24.0",
    "transformers": "5.9.0",
    "flash-attn": "2.8.3",
}
"""What `.[gpu]` (verl 0.9.1's `vllm` and `fsdp` extras) installs; tests check these against verl's own metadata and
against pip's resolution of the extra."""
INDEX_CUDA = "13.0"
"""The CUDA version of PyPI's torch 2.11.0 wheel (it requires `cuda-toolkit==13.0.*`; a test checks this)."""
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
"""Oldest NVIDIA driver branch that runs each CUDA major version (NVIDIA, "CUDA Compatibility": minor-version
compatibility, Linux)."""
FLASH_ATTENTION = "flash_attention_2"
"""verl's default `actor_rollout_ref.model.override_config.attn_implementation` (verl/workers/config/model.py)."""
DOCS = "docs/gpu.md"
INSTALL = "bash scripts/install_gpu.sh"


@dataclass(frozen=True)
class GpuStack:
    """What `problems` needs to know about a machine (`probe` fills it in; tests build it by hand)."""

    driver: str | None
    """NVIDIA kernel driver version (e.g. "535.183.01"); None: no NVIDIA driver on this machine."""
    torch: str | None = None
    """`torch.__version__`; None: torch is not installed."""
    torch_cuda: str | None = None
    """`torch.version.cuda` (e.g. "13.0"); None: a CPU build of torch (or no torch)."""
    cuda_available: bool = False
    """`torch.cuda.is_available()`."""
    gpus: tuple[str, ...] = ()
    """Names of the GPUs torch sees."""
    packages: Mapping[str, str | None] = field(default_factory=dict)
    """Installed version of each distribution of `PINNED` (None: not installed)."""
    flash_attn_error: str | None = None
    """Why `import flash_attn` failed although flash-attn is installed (None: it imports, or was not tried)."""


# ---- facts ------------------------------------------------------------------------------------------------------


def parse_proc_driver(text: str) -> str | None:
    """The driver in `/proc/driver/nvidia/version` ("NVRM version: NVIDIA UNIX ... Kernel Module  580.82.07 ...")."""
    match = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
    return match.group(1) if match else None


def read_driver(proc: str = "/proc/driver/nvidia/version") -> str | None:
    """This machine's NVIDIA driver version: from the kernel module (`proc`), else from `nvidia-smi`; None without."""
    try:
        with open(proc, encoding="utf-8") as f:
            found = parse_proc_driver(f.read())
        if found:
            return found
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    versions = re.findall(r"^\s*(\d+\.\d+(?:\.\d+)?)\s*$", out, flags=re.M)
    return versions[0] if versions else None


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe(import_flash_attn: bool = True) -> GpuStack:
    """The facts of this machine. Creates no CUDA context (`torch.cuda.is_available` only counts devices).

    Args:
        import_flash_attn: try `import flash_attn` when it is installed (it loads its CUDA extension).
    """
    packages = {name: installed(name) for name in PINNED}
    driver = read_driver()
    if packages["torch"] is None:
        return GpuStack(driver, packages=packages)
    import torch  # here, not at the top: the driver check runs before torch is installed (install_gpu.sh)

    available = bool(torch.version.cuda) and torch.cuda.is_available()
    gpus = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if available else ()
    error = None
    if import_flash_attn and packages["flash-attn"] is not None:
        try:
            import flash_attn  # noqa: F401
        except Exception as e:  # an ImportError, or an OSError/RuntimeError from its CUDA extension
            error = f"{type(e).__name__}: {e}"
    return GpuStack(driver, torch.__version__, torch.version.cuda, available, gpus, packages, error)


# ---- checks -----------------------------------------------------------------------------------------------------


def _major(version: str) -> int:
    return int(version.split(".")[0])


def driver_problem(driver: str, cuda: str) -> str | None:
    """Why `driver` cannot run code built for CUDA `cuda`, with the fixes; None when it can."""
    need = MIN_DRIVER.get(_major(cuda))
    if need is None or _major(driver) >= need:
        return None
    major, minor = cuda.split(".")[:2]
    return (
        f"NVIDIA driver {driver} is too old for CUDA {cuda}, which needs driver >= {need} (CUDA {major}.x "
        f"minor-version compatibility), so torch cannot use the GPUs (torch.cuda.is_available() is False). Fix: "
        f"upgrade the driver to the R{need} branch or newer; on data-center GPUs (H100, A100) NVIDIA's "
        f"forward-compatibility package cuda-compat-{major}-{minor} is an alternative (not tested with this recipe). "
        f"See {DOCS}, 'Older drivers'."
    )


def find_nvcc() -> str | None:
    """The nvcc that torch's extension builder uses: `$CUDA_HOME/bin/nvcc`, else nvcc on PATH, else /usr/local/cuda."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def nvcc_problem(nvcc_version: str | None, torch_cuda: str) -> str | None:
    """Why flash-attn cannot be built for a torch built with CUDA `torch_cuda`, with the fixes; None when it can.

    torch's extension builder refuses an nvcc of another CUDA major version than torch's own.

    Args:
        nvcc_version: the output of `nvcc --version`; None when no nvcc was found.
        torch_cuda: `torch.version.cuda`.
    """
    major = _major(torch_cuda)
    release = re.search(r"release (\d+)\.(\d+)", nvcc_version or "")
    if release and int(release.group(1)) == major:
        return None
    found = f"nvcc is CUDA {release.group(1)}.{release.group(2)}" if release else "no nvcc was found"
    return (
        f"building flash-attn {PINNED['flash-attn']} for a torch built with CUDA {torch_cuda} needs the CUDA {major}.x "
        f"toolkit's nvcc, and {found} (CUDA_HOME={os.environ.get('CUDA_HOME', '<unset>')}, then PATH, then "
        f"/usr/local/cuda). Install the CUDA {major}.x toolkit and export CUDA_HOME=<its folder>, or set "
        "FLASH_ATTN_WHEEL to a flash-attn wheel built for this torch, CUDA and Python."
    )


def problems(stack: GpuStack, attn_implementation: str = FLASH_ATTENTION) -> list[str]:
    """What keeps a CUDA run from starting on this machine, each with its fix (empty when all is well).

    A machine without an NVIDIA driver has nothing to check (a CPU run, or a driver process on a head node without
    GPUs): the workers' nodes are then checked by verl itself.

    Args:
        stack: the machine's facts (`probe`).
        attn_implementation: the model's attention (`actor_rollout_ref.model.override_config.attn_implementation`,
            verl's default `flash_attention_2`); flash-attn is needed only for that one.
    """
    if stack.driver is None:
        return []
    found = []
    if stack.torch is None:
        found.append(f"torch is not installed, on a machine with NVIDIA driver {stack.driver}: run {INSTALL}.")
    elif not stack.torch_cuda:
        found.append(
            f"torch {stack.torch} is a CPU build, on a machine with NVIDIA driver {stack.driver} (was "
            f"scripts/install_cpu.sh run here?): install the GPU stack into a fresh environment with {INSTALL}."
        )
    else:
        too_old = driver_problem(stack.driver, stack.torch_cuda)
        if too_old:
            found.append(f"torch {stack.torch}: {too_old}")
        elif not stack.cuda_available:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            found.append(
                f"torch {stack.torch} (CUDA {stack.torch_cuda}) sees no GPU although driver {stack.driver} supports "
                f"it (CUDA_VISIBLE_DEVICES={visible!r}): check that this process may use the GPUs (container GPU "
                "access, `nvidia-smi` works; after a driver upgrade, reboot: 'Driver/library version mismatch')."
            )
    if attn_implementation == FLASH_ATTENTION:
        version = stack.packages.get("flash-attn")
        setting = f"actor_rollout_ref.model.override_config.attn_implementation is {FLASH_ATTENTION} (verl's default)"
        if version is None:
            found.append(
                f"{setting}, but flash-attn is not installed. PyPI has flash-attn {PINNED['flash-attn']} only as "
                f"source, whose build imports torch: install it after torch with `pip install "
                f"flash-attn=={PINNED['flash-attn']} --no-build-isolation` ({INSTALL} does, and checks nvcc first)."
            )
        elif stack.flash_attn_error:
            found.append(
                f"{setting}, but flash-attn {version} does not import ({stack.flash_attn_error}): it was built for "
                f"another torch or CUDA. Rebuild it against this torch: `pip install --no-build-isolation "
                f"--no-cache-dir --force-reinstall --no-deps flash-attn=={version}`."
            )
    return found


def report(stack: GpuStack, attn_implementation: str = FLASH_ATTENTION) -> list[str]:
    """A few lines that say what this machine has against what `.[gpu]` pins, then every problem (or "ok")."""

    def have(name: str, extra: str = "", version: str | None = None) -> str:
        version, pin = version or stack.packages.get(name), PINNED[name]
        same = version is not None and version.split("+")[0] == pin
        return f"{name:<13} {version or 'not installed'}{extra}{'' if same else f'  (.[gpu] pins {pin})'}"

    lines = [f"driver        {stack.driver or 'none (no NVIDIA driver on this machine)'}"]
    if stack.torch:
        need = MIN_DRIVER.get(_major(stack.torch_cuda)) if stack.torch_cuda else None
        cuda = f"CUDA {stack.torch_cuda}, needs driver >= {need}" if stack.torch_cuda else "CPU build"
        lines.append(have("torch", f" ({cuda})", stack.torch))
        gpus = f"{len(stack.gpus)} x {stack.gpus[0]}" if stack.gpus else "none"
        lines.append(f"GPUs          {gpus} (torch.cuda.is_available() = {stack.cuda_available})")
    lines += [have(name) for name in PINNED if not (name == "torch" and stack.torch)]
    found = problems(stack, attn_implementation)
    lines += [f"PROBLEM: {p}" for p in found] or [
        "no NVIDIA driver: nothing to check here" if stack.driver is None else "ok: driver, torch and flash-attn fit"
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Checks this machine's GPU stack for carl-verl (exit 1 on a problem).")
    p.add_argument("--attn", default=FLASH_ATTENTION, help="the model's attn_implementation (default: verl's)")
    p.add_argument(
        "--nvcc", metavar="CUDA", help="only check that nvcc can build flash-attn for this torch CUDA version"
    )
    p.add_argument("--driver", metavar="CUDA", help="only check the driver against this CUDA version (e.g. 13.0)")
    args = p.parse_args(argv)
    if args.nvcc:
        nvcc = find_nvcc()
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else None
        found = nvcc_problem(version, args.nvcc)
        print(f"nvcc {nvcc or 'none'}: " + (f"PROBLEM: {found}" if found else f"ok for CUDA {args.nvcc}"), flush=True)
        return 1 if found else 0
    if args.driver:
        driver = read_driver()
        found = driver_problem(driver, args.driver) if driver else None
        verdict = f"PROBLEM: {found}" if found else f"ok for CUDA {args.driver}" if driver else "not checked"
        print(f"NVIDIA driver {driver or 'none on this machine'}: {verdict}", flush=True)
        return 1 if found else 0
    stack = probe()
    print("\n".join(report(stack, args.attn)), flush=True)
    return 1 if problems(stack, args.attn) else 0


if __name__ == "__main__":
    sys.exit(main())
