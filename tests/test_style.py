"""ruff's lint (import order and complexity included) and its formatting, with the project's rules (pyproject.toml),
over the whole checkout: the README's test command, and so CI, runs them. mypy --strict on carl_core runs in
tests/core/test_imports.py."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command):
    if importlib.util.find_spec("ruff") is None:
        pytest.fail(f"ruff is not installed in {sys.executable}: pip install -e '.[test]' (or .[cpu]), then rerun")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--no-cache", "."], cwd=REPO, capture_output=True, text=True
    )
    fix = "ruff check --fix ." if command == ["check"] else "ruff format ."
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\nFix with `{fix}` (then read the diff)."
