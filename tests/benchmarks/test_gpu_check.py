"""`benchmarks/gpu_check.py`, the one-command GPU check: its recommendation rule (by hand, at and across each
threshold) and a dry run on the CPU with tiny sizes, in a fresh interpreter, that prints every part and a summary
whose recommendation follows the rule from the printed numbers, and imports nothing of verl, vLLM, Ray or Hydra."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import EXACT_TOL, TIME_RATIO_MAX, TOKEN_RATIO_MAX, fields, recommend

REPO = Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--model", "tiny", "--layers", "1", "--scale", "0.05"]
TINY += ["--count-trees", "2", "--time-trees", "1", "--repeats", "1"]
NOT_NEEDED = ("verl", "vllm", "ray", "omegaconf", "hydra", "flash_attn", "tensordict")
"""What a bare GPU machine lacks: the check must never import these."""


def test_thresholds_are_the_readmes():
    assert (TIME_RATIO_MAX, TOKEN_RATIO_MAX) == (0.7, 0.5)


@pytest.mark.parametrize(
    ("tokens", "time", "exact", "choice", "because"),
    [
        (0.35, 0.50, 1e-6, "tree", "0.500x the per-path time (<= 0.7) on 0.350x the tokens"),
        (0.50, 0.70, EXACT_TOL, "tree", "0.700x the per-path time"),  # every bound is inclusive
        (0.35, 0.71, 1e-6, "path", "packed passes take 0.710x the per-path time (needs <= 0.7)"),
        (0.51, 0.50, 1e-6, "path", "packed rows hold 0.510x the per-path tokens (needs <= 0.5)"),
        (0.35, 0.50, 2e-3, "path", "the exactness check gave 2.00e-03 (needs <= 0.001)"),
        (0.35, 0.50, None, "path", "the exactness check did not run"),
        (0.35, float("nan"), 1e-6, "path", "nanx the per-path time"),
        (None, None, 1e-6, "path", "the 7B-shaped timing did not finish"),
    ],
)
def test_recommendation_rule(tokens, time, exact, choice, because):
    got, why = recommend(tokens, time, exact)
    assert got == choice and because in why


def test_every_failed_condition_is_named():
    _, why = recommend(0.6, 0.9, 0.5)
    assert why.count("needs <=") == 3


def test_dry_run_on_cpu_prints_each_part_and_a_summary_that_follows_the_rule():
    probe = (
        "import runpy, sys; sys.argv = ['gpu_check.py', *sys.argv[1:]]; "
        "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__'); "
        f"print('IMPORTED', sorted({{m.split('.')[0] for m in sys.modules}} & {set(NOT_NEEDED)!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", probe, *TINY], cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    for part in ("1. install", "2. exactness", "3. speed", "SUMMARY"):
        assert f"######## {part}" in out
    assert out.splitlines()[-1] == "IMPORTED []"
    # the numbers the summary decides on are part 3's result line and part 2's check
    speed = fields([line for line in out.splitlines() if line.startswith("7B-shape ratio=")][-1])
    exact = float(re.search(r"exactness: max \|dlogp\| = (\S+)", out).group(1))
    choice, why = recommend(speed["ratio"], speed["time_ratio"], exact)
    assert f"recommendation  algorithm.carl.packing: {choice} ({why})" in out
    for label in ("install ", "exactness ", "tokens ", "time ", "first round "):
        assert re.search(rf"^{label}\s+\S", out, flags=re.M), label
