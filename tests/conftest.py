"""Suite-wide pytest hooks: tests marked `vllm` skip, with the reason, where vLLM's CPU build is not installed."""

import importlib.util
import os
import sys

import pytest

VLLM_SKIP_REASON = (
    f"vLLM is not installed in {sys.executable}: the tests marked `vllm` run in the vLLM venv "
    "(`bash scripts/install_cpu.sh --vllm`, then `.venv-vllm/bin/python -m pytest -m vllm`; "
    "`bash scripts/test_cpu.sh` does both)"
)


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason=VLLM_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


# No test trains the default SFT start by accident (28 min): a shipped start that does not fit the default data fails
# fast, naming the differing key fields (recipe.carl.tiny.warm_start). Subprocesses (the demo, the trainer) inherit it.
os.environ.setdefault("CARL_SFT_MUST_MATCH", "1")
