"""The second protocol's runner and report: budget points by hand, the decision rules on made-up runs, the held-out
set's exclusions, and (slow) the smoke mode end to end through verl's trainer."""

import json

import numpy as np
import pytest

from benchmarks import carl_vs_grpo_2 as runner
from benchmarks import carl_vs_grpo_2_report as report


def test_budget_points_by_hand():
    # Cumulative generated actions 100, 250, 400, 550 against a budget of 450: 1/3 (150) first reached at step 2,
    # 2/3 (300) at step 3, all of it at step 4; a budget of 600 is never reached.
    cumulative = [100.0, 250.0, 400.0, 550.0]
    assert runner.budget_points(cumulative, 450.0, (1 / 3, 2 / 3, 1.0)) == {"0.333": 2, "0.667": 3, "1.000": 4}
    assert runner.budget_points(cumulative, 600.0, (1.0,)) == {"1.000": None}
    assert runner.budget_points([300.0], 300.0, (1.0,)) == {"1.000": 1}  # reaching it exactly counts


def make_data(shift_pool: float, shift_carl: float, n_q: int = 400, seeds=(0, 1, 2, 3)):
    """Made-up scored runs: every arm's per-question scores = the start's + a shift (per arm) at GRPO's budget."""
    rng = np.random.default_rng(0)
    start = rng.integers(0, 5, n_q) / 5  # at most 0.8: no score is clipped at 1
    shifts = {"grpo": 0.05, "carl": 0.05 + shift_carl, "carl_pool": 0.05 + shift_pool, "carl_k2": 0.05 + shift_carl,
              "grpo_pool": 0.05}  # fmt: skip
    runs = {}
    for arm, shift in shifts.items():
        runs[arm] = {}
        for s in seeds:
            scores = start + shift + rng.normal(0, 0.001, n_q)
            runs[arm][s] = {
                "points": {
                    "points": {"1.000": 30},
                    "cumulative": [100.0 * (i + 1) for i in range(30)],
                    "short": False,
                },  # fmt: skip
                "sampled": {30: scores},
                "greedy": {30: scores},
            }
    return {"protocol": {"fractions": [1.0], "equal_steps": [30]}, "start": {"sampled": start.tolist()},
            "runs": runs, "arms": list(shifts)}  # fmt: skip


def test_rules_on_made_up_runs():
    # The pool 3 points above CARL at the same cost (3,000 actions): R1 met (+1 point per 1k), R3 `better`;
    # CARL equal to GRPO: R2 non-inferior (interval around 0, above -1 point); K = 2 equal to CARL: R4 `same`.
    rules = report.rules(make_data(shift_pool=0.03, shift_carl=0.0))
    assert rules["R1"]["met"] and rules["R1"]["estimate"] == pytest.approx(1.0, abs=0.01)
    assert rules["R3"]["verdict"] == "better" and rules["R2"]["verdict"] == "non-inferior"
    assert rules["R4"]["verdict"] == "same" and rules["target"]["met"]
    assert rules["R5"]["verdict"] == "better"  # pooled CARL 3 points above pooled GRPO
    # CARL 3 points below GRPO: R2 neither; a pool no better than CARL: R1 not met, target not met.
    bad = report.rules(make_data(shift_pool=-0.03, shift_carl=-0.03))
    assert bad["R2"]["verdict"] == "neither" and not bad["R1"]["met"] and not bad["target"]["met"]


def test_the_fresh_held_out_set_excludes_every_earlier_question(tmp_path):
    rows = runner.heldout_rows(tmp_path, runner.SMOKE2)
    excluded = set(json.loads((tmp_path / "heldout2" / "excluded.json").read_text())["questions"])
    questions = [r["extra_info"]["question"] for r in rows]
    assert len(questions) == runner.SMOKE2.heldout_keep == len(set(questions)) and not set(questions) & excluded
    # The demo's training and test questions and the first protocol's test draw are all among the excluded.
    from recipe.carl.synthhop.make_data import SynthHopConfig, build

    cfg = runner.DemoConfig(**runner.SMOKE2.demo)
    kb = {"seed": cfg.seed, "n_entities": cfg.n_entities, "n_train": cfg.n_train}
    demo, first = build(SynthHopConfig(**kb, n_test=cfg.n_test)), build(SynthHopConfig(**kb, n_test=40))
    assert {q.text for q in demo.train + demo.test + first.test} <= excluded
    again = runner.heldout_rows(tmp_path, runner.SMOKE2)  # made once, read back
    assert [r["extra_info"]["question"] for r in again] == questions


@pytest.mark.slow
def test_smoke_mode_end_to_end(tmp_path):
    runner.main(["--out", str(tmp_path), "--smoke"])
    result = runner.main(["--out", str(tmp_path), "--report"])
    assert set(result["arms"]) == {"grpo", "carl_pool", "grpo_pool"} and result["arms"]["carl_pool"]["points"]["1.000"]
    # The GRPO pool's groups (one session of chains per question) get GRPO's advantages, negative below a group's
    # mean: verl's multi-trajectory GRPO gave every chain the last chain's raw reward (>= 0) in a group of one.
    pooled = [json.loads(line)["data"] for line in (tmp_path / "runs" / "grpo_pool" / "seed0" / "metrics.jsonl").open()]
    assert min(r["critic/advantages/min"] for r in pooled if "critic/advantages/min" in r) < 0
    points = json.loads((tmp_path / "runs" / "carl_pool" / "seed0" / "points.json").read_text())
    assert points["budget"] > 0 and points["scored"] and (tmp_path / "accuracy_vs_generated.png").exists()
    full = points["points"]["1.000"] or len(points["cumulative"])  # short of B: its last step
    assert result["arms"]["carl_pool"]["steps_by_seed"]["0"]["1.000"] == full and full in points["scored"]
    kept = sorted(p.name for p in (tmp_path / "runs" / "carl_pool" / "seed0" / "ckpt").glob("global_step_*"))
    assert kept == sorted(f"global_step_{s}" for s in points["scored"])  # the unscored policies are deleted
    scores = runner.main(["--out", str(tmp_path), "--export-scores", str(tmp_path / "scores.json")])
    assert scores == json.loads((tmp_path / "scores.json").read_text())
    assert sorted(scores["runs"]["carl_pool"]["0"]) == sorted(str(s) for s in points["scored"])
    last = json.loads((tmp_path / "runs" / "carl_pool" / "seed0" / "eval" / f"step_{points['scored'][-1]:03d}.json")
                      .read_text())  # fmt: skip
    compact = scores["runs"]["carl_pool"]["0"][str(points["scored"][-1])]
    assert [k / scores["eval_samples"] for k in compact["sampled"]] == last["sampled"]
    assert compact["greedy"] == last["greedy"] and scores["questions"] == last["questions"]


def test_the_protocol_record_keeps_every_arm_run_in_the_folder(tmp_path):
    # A resume with `--arms grpo carl_k2` must not drop the other arms from protocol.json: the report reads its arms.
    runner.record_protocol(tmp_path, runner.PROTOCOL2, ["grpo", "carl_pool"])
    record = runner.record_protocol(tmp_path, runner.PROTOCOL2, ["grpo", "carl_k2"])
    assert list(record["arms"]) == ["grpo", "carl_k2", "carl_pool"]  # ARMS2's order
    assert json.loads((tmp_path / "protocol.json").read_text())["arms"]["carl_pool"] == runner.ARMS2["carl_pool"]
    with pytest.raises(SystemExit, match="started with another protocol"):
        runner.record_protocol(tmp_path, runner.SMOKE2, ["grpo"])
    saved = json.loads((tmp_path / "protocol.json").read_text())
    saved["arms"]["carl_pool"]["pool_floor"] = 2
    (tmp_path / "protocol.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="ran arm carl_pool with .*'pool_floor': 2.*use another --out"):
        runner.record_protocol(tmp_path, runner.PROTOCOL2, ["grpo"])
