"""The README's answer ("Does CARL beat GRPO here?") and docs/measurements.md say what the committed results hold
(`benchmarks/results/carl_vs_grpo.json`, written by `python -m benchmarks.carl_vs_grpo --report`)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.carl_vs_grpo_report import pct, table

REPO = Path(__file__).resolve().parents[2]
RESULTS = json.loads((REPO / "benchmarks" / "results" / "carl_vs_grpo.json").read_text())


def section(path: Path, title: str) -> str:
    text = path.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start : end if end >= 0 else None]


def points(i: dict[str, float]) -> str:
    """A paired difference as the README writes it: points with a sign, its 95 % interval."""
    return pct(i, signed=True)


def test_the_readme_states_the_committed_answer_with_its_intervals():
    readme = section(REPO / "README.md", "## Does CARL beat GRPO here?")
    assert "RESULT:" not in readme and "is running" not in readme
    claims, arms = RESULTS["claims"], RESULTS["arms"]
    assert points(claims["C1"]) in readme  # CARL - GRPO, final sampled EM
    assert points(RESULTS["vs_grpo"]["carl_lite"]["sampled"]) in readme
    for arm in ("grpo", "carl"):
        assert pct(arms[arm]["final_sampled"]) in readme
    assert pct(RESULTS["start"]["sampled"]) in readme
    assert f"{claims['C3']['generated_ratio']['estimate']:.2f}" in readme
    spread = claims["spread_vs_density"]["per_1k_generated_actions"]
    assert f"{spread['estimate']:+.2f} [{spread['low']:+.2f}, {spread['high']:+.2f}]" in readme
    seeds = {len(arms[a]["seeds"]) for a in arms if arms[a]}
    assert seeds == {RESULTS["protocol"]["seeds"]}  # the answer rests on every seed of every arm


def test_measurements_hold_the_committed_table():
    measured = (REPO / "docs" / "measurements.md").read_text()
    assert RESULTS["table"] in measured
    assert table(RESULTS) == RESULTS["table"]  # the table is the report's, from the committed numbers
