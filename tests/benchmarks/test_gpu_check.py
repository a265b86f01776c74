"""`benchmarks/gpu_check.py`, the one-command GPU check: its recommendation rule (by hand, at and across each
threshold), the recompile check's graph count under `torch.compile` on the CPU with and without the engine's
`dynamic_lengths`, and a dry run on the CPU with tiny sizes, in a fresh interpreter, that prints every part and a
summary whose recommendation follows the rule from the printed numbers, and imports nothing of verl, vLLM, Ray or
Hydra."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch._dynamo

from benchmarks.gpu_check import (
    EXACT_TOL,
    GRAD_TOL,
    MAX_GRAPHS,
    MIN_LENGTHS,
    TIME_RATIO_MAX,
    TOKEN_RATIO_MAX,
    fields,
    graph_check,
    recommend,
)

REPO = Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--model", "tiny", "--layers", "1", "--scale", "0.05"]
TINY += ["--count-trees", "2", "--time-trees", "1", "--repeats", "1"]
NOT_NEEDED = ("verl", "vllm", "ray", "omegaconf", "hydra", "flash_attn", "tensordict")
"""What a bare GPU machine lacks: the check must never import these."""


def test_thresholds_are_the_readmes():
    assert (TIME_RATIO_MAX, TOKEN_RATIO_MAX) == (0.7, 0.5)


OK = (1e-6, 1e-2, 3)
"""Exactness, gradients and graphs that pass."""


@pytest.mark.parametrize(
    ("tokens", "time", "checks", "choice", "because"),
    [
        (0.35, 0.50, OK, "tree", "0.500x the per-path time (<= 0.7) on 0.350x the tokens"),
        (0.50, 0.70, (EXACT_TOL, GRAD_TOL, MAX_GRAPHS), "tree", "0.700x the per-path time"),  # bounds are inclusive
        (0.35, 0.71, OK, "path", "packed passes take 0.710x the per-path time (needs <= 0.7)"),
        (0.51, 0.50, OK, "path", "packed rows hold 0.510x the per-path tokens (needs <= 0.5)"),
        (0.35, 0.50, (2e-3, 1e-2, 3), "path", "the exactness check gave 2.00e-03 (needs <= 0.001)"),
        (0.35, 0.50, (None, 1e-2, 3), "path", "the exactness check did not run"),
        (0.35, 0.50, (1e-6, 0.3, 3), "path", "the gradient check gave 3.00e-01 (needs <= 0.05)"),
        (0.35, 0.50, (1e-6, None, 3), "path", "the gradient check did not run"),
        (0.35, 0.50, (1e-6, 1e-2, 9), "path", "9 graphs compiled for 12 packed lengths (needs <= 4)"),
        (0.35, 0.50, (1e-6, 1e-2, None), "path", "the recompile check did not run"),
        (0.35, float("nan"), OK, "path", "nanx the per-path time"),
        (None, None, OK, "path", "the 7B-shaped timing did not finish"),
    ],
)
def test_recommendation_rule(tokens, time, checks, choice, because):
    got, why = recommend(tokens, time, *checks)
    assert got == choice and because in why


def test_every_failed_condition_is_named():
    _, why = recommend(0.6, 0.9, 0.5, 0.5, 20)
    assert why.count("needs <=") == 5


def test_twelve_packed_lengths_compile_flex_attention_once():
    """The engine's way (`dynamic_lengths`, block dimensions marked dynamic): one graph of flex attention for 12
    packed micro-batches of distinct lengths under `torch.compile` on the CPU (no grad: flex attention has no CPU
    backward). Without `dynamic_lengths` dynamo compiles the first length statically, then again (the slow test)."""
    assert graph_check("cpu", 0.02) == {"graphs": 1, "lengths": MIN_LENGTHS, "modes": 1}


@pytest.mark.slow
def test_without_dynamic_lengths_the_graphs_grow_past_the_limit_when_lengths_are_not_generalised():
    """The CPU cannot show what torch 2.11 does on a GPU, where the recompile storm is feared (docs/gpu.md). On the
    CPU with torch 2.13 dynamo's default generalises the length after one recompile (2 graphs for 12 lengths); with
    that generalisation off (`automatic_dynamic_shapes=False`: every new length a new graph, as a dynamo that
    specialised the lengths would do) it passes `MAX_GRAPHS` and dynamo's own recompile limit of 8, and the engine's
    way still compiles one graph."""
    assert graph_check("cpu", 0.02, dynamic=False)["graphs"] == 2
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        assert graph_check("cpu", 0.02, dynamic=False)["graphs"] > max(MAX_GRAPHS, 8)
        assert graph_check("cpu", 0.02)["graphs"] == 1


def test_dry_run_on_cpu_prints_each_part_and_a_summary_that_follows_the_rule():
    probe = (
        "import runpy, sys; sys.argv = ['gpu_check.py', *sys.argv[1:]]; "
        "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__'); "
        f"print('IMPORTED', sorted({{m.split('.')[0] for m in sys.modules}} & {set(NOT_NEEDED)!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", probe, *TINY], cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    for part in ("1. install", "2. exactness", "3. recompiles", "4. speed", "SUMMARY"):
        assert f"######## {part}" in out
    assert out.splitlines()[-1] == "IMPORTED []"
    # the numbers the summary decides on are part 4's result line and parts 2 and 3's checks
    speed = fields([line for line in out.splitlines() if line.startswith("7B-shape ratio=")][-1])
    exact = float(re.search(r"exactness: max \|dlogp\| = (\S+)", out).group(1))
    grads = float(re.search(r"gradients: max relative \|dg\| = (\S+) over 5 parameters", out).group(1))
    graphs, lengths = map(int, re.search(r"recompiles: (\d+) graphs for (\d+) lengths x 1 grad mode", out).groups())
    assert lengths == MIN_LENGTHS and graphs <= MAX_GRAPHS and grads <= GRAD_TOL  # else the exit status is 1
    choice, why = recommend(speed["ratio"], speed["time_ratio"], exact, grads, graphs)
    assert f"recommendation  algorithm.carl.packing: {choice} ({why})" in out
    for label in ("install ", "exactness ", "gradients ", "graphs ", "tokens ", "time ", "first round "):
        assert re.search(rf"^{label}\s+\S", out, flags=re.M), label
