"""carl_core is framework-free: importing it pulls in none of verl, ray, vllm, transformers, hydra."""

import subprocess
import sys


def test_import_carl_core_imports_no_framework():
    code = (
        "import sys, carl_core\n"
        "bad = [m for m in ('verl', 'ray', 'vllm', 'transformers', 'hydra', 'omegaconf') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"carl_core imported {out}"


def test_carl_core_is_small_and_strictly_typed():
    """carl_core stays readable in one sitting (<= 1,500 lines) and passes `mypy --strict`."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "carl_core"
    lines = sum(len(p.read_text().splitlines()) for p in package.glob("*.py"))
    assert lines <= 1500, f"carl_core has {lines} lines; keep it <= 1,500 (test-only code belongs in tests/)"
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(package)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
