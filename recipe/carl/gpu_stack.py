"""The GPU stack a CUDA run needs (driver, torch's CUDA build, flash-attn), checked before any worker starts.

`pip install -e ".[gpu]"` selects verl 0.9.1's `vllm` and `fsdp` extras (`PINNED`). Two of their facts make a GPU
node fail late and far from the cause unless they are checked first:

- torch 2.11.0 on PyPI is built for CUDA 13.0, which needs an NVIDIA driver >= 580 (NVIDIA's minor-version
  compatibility: CUDA 13.x >= 580, 12.x >= 525, 11.x >= 450). On an R535/R550/R570 node `torch.cuda.is_available()`
  is False and verl's workers find no GPU;
- flash-attn 2.8.3 exists on PyPI only as a source distribution whose build imports torch, so it fails under pip's
  build isolation (`scripts/install_gpu.sh` builds it without, after checking nvcc, the C++ compiler and the Python
  headers); without it, verl's default attention (`flash_attention_2`) fails inside each worker when the model
  loads, and with any other attention verl's log-prob code falls back to a Python loop over every token
  (`NO_FLASH_ATTN_COST`): a GPU run needs flash-attn unless `CARL_ALLOW_NO_FLASH_ATTN=1` accepts that cost.

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
import sysconfig
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
ALLOW_NO_FLASH_ATTN_ENV = "CARL_ALLOW_NO_FLASH_ATTN"
"""Set to 1 to start a GPU run without flash-attn, whose attention is not `flash_attention_2` (`NO_FLASH_ATTN_COST`)."""
NO_FLASH_ATTN_COST = (
    "verl then computes every log-prob with a Python loop over the tokens of a micro-batch "
    "(verl/utils/torch_functional.py, logprobs_from_logits_v2: one log_softmax per token, about 28,000 per "
    "micro-batch at the 7B scripts' 28,672 tokens, in both the log-prob and the update passes) instead of "
    "flash-attn's fused cross-entropy kernel"
)
"""What a GPU run without flash-attn costs (verl 0.9.1 uses flash-attn's Triton cross-entropy when it imports)."""
FLASH_ATTN_WHEEL_CP312 = (
    "https://github.com/mjun0812/flash-attention-prebuild-wheels/releases/download/v0.9.4/"
    "flash_attn-2.8.3+cu130torch2.11-cp312-cp312-linux_x86_64.whl"
)
"""The prebuilt flash-attn 2.8.3 wheel verl's install guide routes its `flash-attn-cu130torch211` extra to: built for
torch 2.11 with CUDA 13.0, CPython 3.12, x86_64 Linux (`FLASH_ATTN_WHEEL` of `scripts/install_gpu.sh`; the
Dockerfile's default)."""
FLASH_ATTN_ARCHS = ("80", "90", "100", "120")
"""The GPU architectures flash-attn 2.8.3's build knows (its setup.py: `FLASH_ATTN_CUDA_ARCHS`, default all four; any
other entry is ignored). A GPU runs the build of its own major version (sm_86 and sm_89 run sm_80 code)."""
CUDA_GCC_VERSIONS = {
    "12.0": (6, 13), "12.1": (6, 13), "12.2": (6, 13), "12.3": (6, 14), "12.4": (6, 14), "12.5": (6, 14),
    "12.6": (6, 14), "12.7": (6, 14), "12.8": (6, 15), "12.9": (6, 15), "13.0": (6, 16),
}  # fmt: skip
"""gcc versions [min, max) torch's extension builder accepts for an nvcc of each CUDA version; it raises outside them
(torch.utils.cpp_extension.CUDA_GCC_VERSIONS, the same in torch 2.11 and 2.13)."""
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


def compiler_version(cxx: str) -> tuple[str, str] | None:
    """The C++ compiler `cxx` as torch's extension builder sees it: (its name, `-dumpfullversion -dumpversion`);
    None when it cannot be run."""
    path = shutil.which(cxx)
    if not path:
        return None
    try:
        banner = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        version = subprocess.run(
            [path, "-dumpfullversion", "-dumpversion"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return ("clang" if "clang" in banner.lower() else "gcc"), version


def build_tools_problems(
    cxx: str, compiler: tuple[str, str] | None, python_h: str, cuda: str | None = None
) -> list[str]:
    """What keeps flash-attn's source build from starting, besides nvcc (`nvcc_problem`), each with its fix.

    Args:
        cxx: the C++ compiler torch's extension builder runs (`$CXX`, default `c++`).
        compiler: (`gcc` or `clang`, version) of `cxx` (`compiler_version`); None when it is not there.
        python_h: where this Python's `Python.h` must be (`sysconfig`'s include folder).
        cuda: the CUDA version (major.minor) flash-attn is built with; its gcc range is checked (None: not checked).
    """
    found = []
    wheel = "or set FLASH_ATTN_WHEEL to a prebuilt wheel (no compiler needed; docs/gpu.md names one)"
    if compiler is None:
        found.append(
            f"no C++ compiler: `{cxx}` (CXX={os.environ.get('CXX', '<unset>')}) cannot be run, and flash-attn's build "
            f"compiles C++ and CUDA host code with it. Install gcc and g++ (Debian/Ubuntu: apt-get install "
            f"build-essential), {wheel}."
        )
    else:
        kind, version = compiler
        bounds = CUDA_GCC_VERSIONS.get(cuda or "")
        major = re.match(r"(\d+)", version)
        if kind == "gcc" and bounds and major and not bounds[0] <= int(major.group(1)) < bounds[1]:
            found.append(
                f"`{cxx}` is gcc {version}, and torch's extension builder accepts gcc >= {bounds[0]}, < {bounds[1]} "
                f"with CUDA {cuda}: it would stop the flash-attn build. Install a gcc in that range and export "
                f"CXX=g++-<version> CC=gcc-<version>, {wheel}."
            )
    if not os.path.isfile(python_h):
        minor = f"{sys.version_info.major}.{sys.version_info.minor}"
        found.append(
            f"the Python headers are missing ({python_h} does not exist), and flash-attn's C++ extension includes "
            f"Python.h. Install them (Debian/Ubuntu: apt-get install python{minor}-dev; RHEL: python3-devel), use a "
            f"Python that ships them (conda, uv, pyenv), {wheel}."
        )
    return found


def read_compute_caps() -> list[str]:
    """Compute capabilities ("9.0") of this machine's GPUs, from `nvidia-smi` (empty without it)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^\s*(\d+\.\d)\s*$", out, flags=re.M)


def flash_attn_archs(compute_caps: list[str]) -> str:
    """`FLASH_ATTN_CUDA_ARCHS` for GPUs of these compute capabilities: the flash-attn build of each one's major version
    (`FLASH_ATTN_ARCHS`), e.g. "9.0" -> "90", "8.6" -> "80"; "" when none has one (then flash-attn's default)."""
    archs = {f"{cap.split('.')[0]}0" for cap in compute_caps}
    return ";".join(a for a in FLASH_ATTN_ARCHS if a in archs)


def archs_problem(value: str) -> str | None:
    """Why `FLASH_ATTN_CUDA_ARCHS=value` would not build what it names; None when every entry is one flash-attn
    builds (it ignores others silently, and a build for no architecture runs nowhere)."""
    entries = [a.strip() for a in value.split(";") if a.strip()]
    unknown = [a for a in entries if a not in FLASH_ATTN_ARCHS]
    if entries and not unknown:
        return None
    return (
        f"FLASH_ATTN_CUDA_ARCHS={value!r}: flash-attn {PINNED['flash-attn']} builds only for "
        f"{';'.join(FLASH_ATTN_ARCHS)} and ignores {', '.join(unknown) or 'an empty list'}. Give ';'-separated entries "
        "of those (a GPU runs the build of its major version: 80 for sm_80, sm_86 and sm_89), or unset it to build for "
        "this machine's GPUs."
    )


def problems(
    stack: GpuStack, attn_implementation: str = FLASH_ATTENTION, allow_no_flash_attn: bool | None = None
) -> list[str]:
    """What keeps a CUDA run from starting on this machine, each with its fix (empty when all is well).

    A machine without an NVIDIA driver has nothing to check (a CPU run, or a driver process on a head node without
    GPUs): the workers' nodes are then checked by verl itself.

    Args:
        stack: the machine's facts (`probe`).
        attn_implementation: the model's attention (`actor_rollout_ref.model.override_config.attn_implementation`,
            verl's default `flash_attention_2`). flash-attn is needed for that one, and for the log-prob kernel of
            every other (`NO_FLASH_ATTN_COST`) unless `allow_no_flash_attn`.
        allow_no_flash_attn: accept a run without flash-attn when its attention is not `flash_attention_2`; None
            reads `CARL_ALLOW_NO_FLASH_ATTN`.
    """
    if allow_no_flash_attn is None:
        allow_no_flash_attn = os.environ.get(ALLOW_NO_FLASH_ATTN_ENV, "") not in ("", "0")
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
    version = stack.packages.get("flash-attn")
    if attn_implementation == FLASH_ATTENTION:
        setting = f"actor_rollout_ref.model.override_config.attn_implementation is {FLASH_ATTENTION} (verl's default)"
        override = ""
    elif not allow_no_flash_attn:
        setting = f"attention {attn_implementation} runs without flash-attn, but {NO_FLASH_ATTN_COST}"
        override = f"; or set {ALLOW_NO_FLASH_ATTN_ENV}=1 to run without it at that cost"
    else:
        return found
    if version is None:
        found.append(
            f"{setting}. flash-attn is not installed; PyPI has flash-attn {PINNED['flash-attn']} only as source, "
            f"whose build imports torch: install it after torch with `pip install flash-attn=={PINNED['flash-attn']} "
            f"--no-build-isolation` ({INSTALL} does, checking nvcc, the compiler and the Python headers first), or a "
            f"prebuilt wheel (FLASH_ATTN_WHEEL, {DOCS}){override}."
        )
    elif stack.flash_attn_error:
        found.append(
            f"{setting}. flash-attn {version} does not import ({stack.flash_attn_error}): it was built for another "
            f"torch or CUDA. Rebuild it against this torch: `pip install --no-build-isolation --no-cache-dir "
            f"--force-reinstall --no-deps flash-attn=={version}`{override}."
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


def _check_build_tools(cuda: str) -> int:
    cxx = os.environ.get("CXX", "c++")
    compiler = compiler_version(cxx)
    python_h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    found = build_tools_problems(cxx, compiler, python_h, cuda or None)
    seen = f"{compiler[0]} {compiler[1]}" if compiler else "missing"
    for line in [f"PROBLEM: {f}" for f in found] or [f"C++ compiler {cxx} ({seen}) and {python_h}: ok"]:
        print(line, flush=True)
    return 1 if found else 0


def _print_flash_attn_archs() -> int:
    given = os.environ.get("FLASH_ATTN_CUDA_ARCHS")
    if given:  # set and not empty (an empty one, as the Dockerfile's default build argument, means unset)
        found = archs_problem(given)
        if found:
            print(f"PROBLEM: {found}", file=sys.stderr, flush=True)
            return 1
        print(given)
        return 0
    caps = read_compute_caps()
    archs = flash_attn_archs(caps)
    if archs:
        why = (
            f"flash-attn is built for {archs}: this machine's GPUs (compute capability {', '.join(sorted(set(caps)))})"
        )
    else:
        why = (
            f"no GPU here that flash-attn builds for (compute capabilities: {', '.join(caps) or 'none found'}): "
            f"flash-attn is built with its default, {';'.join(FLASH_ATTN_ARCHS)}"
        )
    print(f"{why}; FLASH_ATTN_CUDA_ARCHS overrides it", file=sys.stderr, flush=True)
    print(archs)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Checks this machine's GPU stack for carl-verl (exit 1 on a problem).")
    p.add_argument("--attn", default=FLASH_ATTENTION, help="the model's attn_implementation (default: verl's)")
    p.add_argument(
        "--nvcc", metavar="CUDA", help="only check that nvcc can build flash-attn for this torch CUDA version"
    )
    p.add_argument("--driver", metavar="CUDA", help="only check the driver against this CUDA version (e.g. 13.0)")
    p.add_argument(
        "--build-tools",
        metavar="CUDA",
        help="only check the C++ compiler ($CXX or c++) and Python.h for a flash-attn build with CUDA ('': any)",
    )
    p.add_argument(
        "--flash-attn-archs",
        action="store_true",
        help="print FLASH_ATTN_CUDA_ARCHS for the build: $FLASH_ATTN_CUDA_ARCHS checked, else this machine's GPUs",
    )
    args = p.parse_args(argv)
    if args.build_tools is not None:
        return _check_build_tools(args.build_tools)
    if args.flash_attn_archs:
        return _print_flash_attn_archs()
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
