# carl-verl on verl 0.9.1's GPU stack: torch 2.11.0 (CUDA 13.0), vLLM 0.24.0, transformers 5.9.0, flash-attn 2.8.3.
#
#   docker build -t carl-verl .
#   docker run --gpus all --shm-size 16g --rm -it carl-verl python -m recipe.carl.gpu_stack
#
# The base is the one verl's install guide recommends for its vllm/fsdp extras (CUDA 13.0 devel, Ubuntu 24.04, whose
# python3 is 3.12). The install is scripts/install_gpu.sh itself, so the image and a bare node install the same pins
# in the same order (tests/test_dockerfile.py checks that nothing else is installed here). flash-attn comes from the
# prebuilt wheel verl's guide names for torch 2.11, CUDA 13.0 and CPython 3.12; `--build-arg FLASH_ATTN_WHEEL=`
# builds it from source instead (nvcc, gcc and the headers are in the image; `--build-arg FLASH_ATTN_CUDA_ARCHS=90`
# for H100s). The host needs NVIDIA driver >= 580
# (docs/gpu.md); nothing checks it while the image builds, `python -m recipe.carl.gpu_stack` does in the container.
# Not built in this project's CI (no Docker engine there): the tests lint it with hadolint and run its install
# command with install_gpu.sh --print.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
ARG FLASH_ATTN_WHEEL=https://github.com/mjun0812/flash-attention-prebuild-wheels/releases/download/v0.9.4/flash_attn-2.8.3+cu130torch2.11-cp312-cp312-linux_x86_64.whl
# For a source build (FLASH_ATTN_WHEEL empty): the GPU architectures, e.g. 90 for H100s (empty: the build machine's
# GPUs, or flash-attn's four when it has none)
ARG FLASH_ATTN_CUDA_ARCHS=

# Python with its headers, a C/C++ compiler (triton's launcher and flex attention's compiled kernels need both at
# run time, a flash-attn source build too), git for verl's tooling. Versions float with the base image's Ubuntu
# release, which takes its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv build-essential git \
    && rm -rf /var/lib/apt/lists/*

# Ubuntu 24.04's python3 is externally managed (PEP 668): the project gets a venv of its own.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/carl-verl
COPY . .
RUN FLASH_ATTN_WHEEL="$FLASH_ATTN_WHEEL" FLASH_ATTN_CUDA_ARCHS="$FLASH_ATTN_CUDA_ARCHS" PYTHON=python \
    bash scripts/install_gpu.sh
