"""`benchmarks/carl_vs_grpo.py`: the bookkeeping on hand-made metrics, and the smoke mode end to end (CI)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.carl_vs_grpo import METHODS, aggregate, compare, first_crossing, main, run_metrics

REPO = Path(__file__).resolve().parents[2]
KEY = "val-aux/synthhop/em/mean@4"  # the demo validates 4 sampled episodes per question


def write_metrics(run_dir: Path, rows: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"step": r.pop("step"), "data": r}) + "\n" for r in rows)
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def budget(questions, generated, trained, tok_gen, tok_trained):
    return {
        "carl/questions": questions,
        "carl/actions_generated_per_question": generated,
        "carl/actions_trained_per_question": trained,
        "carl/tokens_generated": tok_gen,
        "carl/tokens_trained": tok_trained,
    }


@pytest.fixture
def two_step_run(tmp_path):
    # verl logs step 0's validation on its own line, then each step's training metrics (+ validation when due).
    return write_metrics(
        tmp_path / "run",
        [
            {"step": 0, KEY: 0.25},
            {"step": 1, **budget(4, 10.0, 5.0, 100.0, 40.0)},
            {"step": 2, **budget(4, 12.0, 7.0, 120.0, 60.0), KEY: 0.5},
        ],
    )


def test_run_metrics_by_hand(two_step_run):
    m = run_metrics(two_step_run)
    assert (m["start_accuracy"], m["final_accuracy"]) == (0.25, 0.5)
    assert m["actions_generated_per_question"] == 11.0 and m["actions_trained_per_question"] == 6.0
    assert (m["tokens_generated"], m["tokens_trained"]) == (220.0, 100.0)
    # Cumulative actions trained at the validations: 0 before training, 5*4 + 7*4 = 48 after step 2.
    assert m["curve"] == {
        "step": [0, 2],
        "accuracy": [0.25, 0.5],
        "actions_trained": [0.0, 48.0],
        "tokens_generated": [0.0, 220.0],
    }


def test_run_metrics_needs_validation_and_budget(tmp_path):
    with pytest.raises(SystemExit, match="no validation accuracy"):
        run_metrics(write_metrics(tmp_path / "a", [{"step": 1, **budget(1, 1, 1, 1, 1)}]))
    with pytest.raises(SystemExit, match="no carl/\\* budget metrics"):
        run_metrics(write_metrics(tmp_path / "b", [{"step": 0, KEY: 0.1}]))


def run(final, curve_acc, actions, gen=10.0, seed=0, greedy=None):
    return {
        "final_accuracy": final,
        "greedy_final_accuracy": greedy,
        "start_accuracy": curve_acc[0],
        "actions_generated_per_question": gen,
        "actions_trained_per_question": gen / 2,
        "tokens_generated": 100.0,
        "tokens_trained": 50.0,
        "wall_seconds": 60.0,
        "seed": seed,
        "curve": {"step": [0, 4, 8], "accuracy": curve_acc, "actions_trained": actions, "tokens_generated": actions},
    }


def test_aggregate_and_targets_by_hand():
    grpo = aggregate(
        [
            run(0.4, [0.1, 0.3, 0.4], [0, 100, 200], gen=20.0, greedy=0.5),
            run(0.2, [0.1, 0.2, 0.2], [0, 100, 200], 20.0, greedy=0.3),
        ]
    )
    assert grpo["final_accuracy"] == pytest.approx(0.3) and grpo["accuracy_std"] == pytest.approx(0.1414213562)
    assert grpo["greedy_final_accuracy"] == pytest.approx(0.4)
    assert grpo["curve"]["accuracy"] == pytest.approx([0.1, 0.25, 0.3])
    carl = aggregate([run(0.35, [0.1, 0.3, 0.35], [0, 40, 80])])
    lite = aggregate([run(0.3, [0.1, 0.2, 0.3], [0, 30, 60], gen=11.0)])
    assert carl["accuracy_std"] == 0.0 and carl["greedy_final_accuracy"] is None
    # CARL's curve first reaches GRPO's final 0.3 at the second validation, after 40 actions of GRPO's 200.
    assert first_crossing(carl["curve"], 0.3, "actions_trained") == 40
    assert first_crossing(carl["curve"], 0.9, "actions_trained") is None
    c = compare({"grpo": grpo, "carl": carl, "carl_lite": lite})
    assert c["carl_accuracy_minus_grpo"] == pytest.approx(0.05)
    assert c["grpo_gain_over_start"] == pytest.approx(0.3 - 0.1)
    assert c["carl_reach_fraction_of_grpo_actions"] == pytest.approx(40 / 200)
    assert c["carl_lite_actions_generated_ratio"] == pytest.approx(11 / 20)


def test_bad_arguments_name_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        main(["--steps", "0", "--out", str(tmp_path / "r.json")])
    held = tmp_path / "runs"
    (held / "grpo").mkdir(parents=True)
    with pytest.raises(SystemExit, match="already holds runs; pass --overwrite"):
        main(["--run-dir", str(held), "--out", str(tmp_path / "r.json")])


@pytest.mark.slow
def test_smoke_mode_end_to_end(tmp_path):
    """CI: every method, 2 steps, 1 seed, through verl's trainer on CPU; the JSON has the issue's schema."""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.carl_vs_grpo",
            "--smoke",
            "--out",
            str(out),
            "--run-dir",
            str(tmp_path / "r"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["methods"]) == set(METHODS)
    fields = {"final_accuracy", "accuracy_std", "actions_generated_per_question", "actions_trained_per_question"}
    fields |= {"tokens_generated", "tokens_trained", "wall_seconds", "curve"}
    for name, m in results["methods"].items():
        assert fields <= set(m), name
        assert m["curve"]["step"] == [0, 2], name
        assert 0 < m["actions_trained_per_question"] <= m["actions_generated_per_question"], name
        assert 0 < m["tokens_trained"] <= m["tokens_generated"], name
        assert 0.0 <= m["greedy_final_accuracy"] <= 1.0, name
    methods = results["methods"]
    # GRPO and update-all train every action; the critical set is a strict subset whenever a tree has a chain.
    assert methods["grpo"]["actions_trained_per_question"] == methods["grpo"]["actions_generated_per_question"]
    assert (
        methods["carl_update_all"]["actions_trained_per_question"]
        == methods["carl_update_all"]["actions_generated_per_question"]
    )
    assert {"spearman", "frac_near_zero_std", "n_states"} <= set(results["criticality"])
    assert results["criticality"]["n_states"] > 0
    for plot in results["plots"]:
        assert Path(plot).stat().st_size > 0
