#!/usr/bin/env bash
# Installs carl-verl on a GPU node into the active Python environment (a fresh venv or conda env, Python 3.10-3.12),
# in the one order that works (docs/gpu.md):
#   1. torch 2.11.0, torchvision 0.26.0, torchaudio 2.11.0 (verl 0.9.1's pins). PyPI's torch 2.11.0 is built for
#      CUDA 13.0, which needs NVIDIA driver >= 580: the driver is checked before anything is downloaded;
#   2. flash-attn 2.8.3 built against that torch with --no-build-isolation: PyPI has only its source, and its build
#      imports torch (pip's default isolated build fails with "No module named 'torch'"). The build needs the nvcc of
#      torch's CUDA major version, a C++ compiler in torch's range and the Python headers (all checked first), and up
#      to ~9 GB of RAM per job (MAX_JOBS). It compiles for this node's GPUs only (FLASH_ATTN_CUDA_ARCHS, e.g. 90 on
#      H100s; flash-attn's own default is four architectures). FLASH_ATTN_WHEEL=<path or URL> installs a wheel built
#      for this torch, CUDA and Python instead (docs/gpu.md names verl's for Python 3.12);
#   3. pip install -e ".[gpu]": verl 0.9.1 with its vllm and fsdp extras (vLLM 0.24.0, transformers 5.9.0, ...);
#      torch and flash-attn are in place, so pip builds nothing;
#   4. python -m recipe.carl.gpu_stack: driver, torch's CUDA, the GPUs, flash-attn (main_carl checks the same).
#
#   bash scripts/install_gpu.sh           # install
#   bash scripts/install_gpu.sh --print   # run the checks, print the install commands instead of running them
#
# Environment: PYTHON (default python3); TORCH_INDEX_URL (a PyTorch wheel index for another CUDA build of torch
# 2.11.0, e.g. https://download.pytorch.org/whl/cu128: not tested, and vLLM 0.24.0 from PyPI is a CUDA 13 build;
# the driver is then checked only in step 4); FLASH_ATTN_WHEEL; FLASH_ATTN_CUDA_ARCHS (';'-separated, of 80 90 100
# 120; default: this node's GPUs); MAX_JOBS; CUDA_HOME (the toolkit that builds flash-attn; default: nvcc on PATH);
# CXX (the C++ compiler, default c++).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DRY=0
for arg in "$@"; do
  case "$arg" in
    --print) DRY=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "install_gpu.sh: unknown argument '$arg' (use --print or nothing)" >&2; exit 2 ;;
  esac
done

run() {
  if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi
}
# The pins and checks live in recipe/carl/gpu_stack.py (standard library only: it runs before torch is installed).
stack() { "$PYTHON" -c "from recipe.carl import gpu_stack as s; print($1)"; }

"$PYTHON" -c 'import sys; v = sys.version_info[:2]; (3, 10) <= v <= (3, 12) or sys.exit(
    f"install_gpu.sh: Python {v[0]}.{v[1]}; carl-verl needs 3.10-3.12 (setup.py python_requires): use another env")'

# 1. torch, after checking the driver against the CUDA build it would get
if [ -z "${TORCH_INDEX_URL:-}" ]; then
  "$PYTHON" -m recipe.carl.gpu_stack --driver "$(stack s.INDEX_CUDA)"
fi
torch_args=("torch==$(stack "s.PINNED['torch']")" "torchvision==$(stack "s.PINNED['torchvision']")"
            "torchaudio==$(stack "s.PINNED['torchaudio']")")
if [ -n "${TORCH_INDEX_URL:-}" ]; then torch_args+=(--index-url "$TORCH_INDEX_URL"); fi
run "$PYTHON" -m pip install "${torch_args[@]}"

# 2. flash-attn against that torch
flash="flash-attn==$(stack "s.PINNED['flash-attn']")"
if [ -n "${FLASH_ATTN_WHEEL:-}" ]; then
  run "$PYTHON" -m pip install "$FLASH_ATTN_WHEEL"
else
  if [ "$DRY" = 1 ]; then
    torch_cuda="$(stack s.INDEX_CUDA)"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then torch_cuda=""; fi  # not known before that torch is installed
  else
    torch_cuda="$("$PYTHON" -c 'import torch; print(torch.version.cuda or "")')"
    if [ -z "$torch_cuda" ]; then
      echo "install_gpu.sh: the torch just installed is a CPU build (TORCH_INDEX_URL=${TORCH_INDEX_URL:-}): use a CUDA index" >&2
      exit 1
    fi
  fi
  force=()
  if [ -n "$torch_cuda" ]; then
    "$PYTHON" -m recipe.carl.gpu_stack --nvcc "$torch_cuda"
  fi
  "$PYTHON" -m recipe.carl.gpu_stack --build-tools "$torch_cuda"  # gcc in torch's range for this CUDA, Python.h
  archs="$("$PYTHON" -m recipe.carl.gpu_stack --flash-attn-archs)"  # $FLASH_ATTN_CUDA_ARCHS checked, else the GPUs'
  if [ -n "$archs" ]; then force+=(FLASH_ATTN_CUDA_ARCHS="$archs"); fi
  # flash-attn's setup.py first looks for a prebuilt wheel on its GitHub releases, and for any torch built with CUDA
  # 12 or newer it asks for the CUDA 12 build ("+cu12..."), which cannot load next to torch's CUDA 13 runtime:
  # build from source for CUDA 13.
  if [ "${torch_cuda%%.*}" -ge 13 ] 2>/dev/null; then force=(FLASH_ATTENTION_FORCE_BUILD=TRUE ${force[@]+"${force[@]}"}); fi
  run "$PYTHON" -m pip install setuptools wheel packaging psutil ninja einops
  run env ${force[@]+"${force[@]}"} "$PYTHON" -m pip install --no-build-isolation "$flash"
fi

# 3. the project with verl's GPU extras
run "$PYTHON" -m pip install -e ".[gpu]"

# 4. the start-up check
run "$PYTHON" -m recipe.carl.gpu_stack
