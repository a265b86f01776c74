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
