"""`benchmarks/carl_vs_grpo.py` and its report: the protocol wiring, the statistics glue against hand-made runs, the
decision rules, and (slow, CI) the smoke mode end to end through verl's trainer."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import carl_vs_grpo as exp
from benchmarks import carl_vs_grpo_report as report
from recipe.carl.evaluate.stats import Interval

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ the protocol
def test_every_arm_differs_from_the_shared_settings_only_where_it_says():
    base = exp.demo_config(exp.PROTOCOL, "carl", 0)
    for arm, changes in exp.ARMS.items():
        cfg = exp.demo_config(exp.PROTOCOL, arm, 3)
        differ = {k for k in vars(cfg) if getattr(cfg, k) != getattr(base, k)} - {"rl_seed"}
        assert differ == set(changes) - {k for k, v in changes.items() if getattr(base, k) == v}, arm
        assert cfg.rl_seed == 3 and cfg.full_determinism and cfg.test_freq == exp.PROTOCOL.eval_every
    grpo = exp.demo_config(exp.PROTOCOL, "grpo", 0)
    assert (grpo.grpo_group or grpo.n0 + grpo.n_forks) == base.n0 + base.n_forks  # as many trajectories as leaves
    assert exp.PROTOCOL.steps() == [0, 10, 20, 30] and exp.PROTOCOL.seeds >= 4


def test_the_trainer_validates_nothing_and_saves_every_evaluated_step(tmp_path):
    cfg = exp.demo_config(exp.PROTOCOL, "carl_spread", 1)
    cmd = exp.trainer_command(cfg, tmp_path / "run", tmp_path / "shared", tmp_path / "tool.yaml")
    assert cmd[1:4] == ["-m", "recipe.carl.main_carl", "+demo=tiny_cpu"]
    wanted = ["trainer.val_before_train=False", "trainer.test_freq=-1", "trainer.save_freq=10", "data.seed=1"]
    wanted += ["algorithm.carl.selection=spread", "algorithm.carl.packing=tree"]
    wanted += ["actor_rollout_ref.rollout.full_determinism=True", "actor_rollout_ref.rollout.seed=1"]
    for override in wanted:
        assert override in cmd, override
    assert sum(o.startswith("trainer.save_freq=") for o in cmd) == 1


def test_a_folder_started_with_another_protocol_is_refused(tmp_path):
    (tmp_path / "protocol.json").write_text(json.dumps({"protocol": {"seeds": 99}, "arms": {}}))
    with pytest.raises(SystemExit, match="started with another protocol"):
        exp.main(["--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="holds no experiment"):
        exp.main(["--out", str(tmp_path / "empty"), "--report"])


# ----------------------------------------------------------------------------------------- statistics glue
def test_reach_ratio_by_hand():
    # CARL's mean curve 0.30, 0.34, 0.38, 0.40 at 0, 100, 200, 300 trained actions; GRPO ends at 0.36 after 1,000.
    # 0.36 is half-way between 0.34 and 0.38, so CARL reaches it at 150 actions: 150 / 1000 = 0.15.
    acc_c = np.broadcast_to(np.array([0.30, 0.34, 0.38, 0.40]), (2, 3, 4))
    trained_c = np.broadcast_to(np.array([0.0, 100, 200, 300]), (2, 3, 4))
    acc_g = np.broadcast_to(np.array([0.30, 0.31, 0.33, 0.36]), (2, 3, 4))
    trained_g = np.broadcast_to(np.array([0.0, 300, 600, 1000]), (2, 3, 4))
    assert report.reach_ratio(acc_c, trained_c, acc_g, trained_g) == pytest.approx(0.15)
    assert report.reach_ratio(acc_g, trained_g, acc_c, trained_c) == math.inf  # GRPO never reaches 0.40
    assert report.reach_ratio(acc_c, trained_c, acc_c * 0 + 0.2, trained_g) == 0.0  # the start is already there


def test_verdicts():
    assert report.verdict(Interval(0.05, 0.01, 0.09, 0.95, 10)) == "better"
    assert report.verdict(Interval(-0.05, -0.09, -0.01, 0.95, 10)) == "worse"
    assert report.verdict(Interval(0.0, -0.01, 0.015, 0.95, 10)) == "no difference detected (within +-2 points)"
    assert report.verdict(Interval(0.0, -0.03, 0.015, 0.95, 10)) == "no difference detected"


def fake_experiment(out: Path, accuracy: dict[str, np.ndarray], budgets: dict[str, dict[str, float]]) -> None:
    """An experiment folder with hand-made scores: accuracy[arm] has shape (seeds, questions, points) and point 0 is
    the shared start; budgets[arm] gives each step's generated/trained actions (the same every step)."""
    arms = list(accuracy)
    seeds, questions, points = accuracy[arms[0]].shape
    protocol = {"seeds": seeds, "demo": {"steps": points - 1, "batch_prompts": 2}, "eval_every": 1}
    (out / "protocol.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps({"protocol": protocol, "arms": {a: {} for a in arms}}))
    qs = [f"q{i}" for i in range(questions)]
    start = accuracy[arms[0]][0, :, 0]
    (out / "start_eval.json").write_text(json.dumps({"questions": qs, "sampled": start.tolist(),
                                                      "greedy": start.tolist()}))  # fmt: skip
    for arm in arms:
        for s in range(seeds):
            run = out / "runs" / arm / f"seed{s}"
            (run / "eval").mkdir(parents=True)
            (run / "done.json").write_text(json.dumps({"wall_s": 60.0, "load_before": [1.0, 1.0, 1.0],
                                                       "commit": "abc"}))  # fmt: skip
            b = budgets[arm]
            rows = [{"step": t, "carl/questions": 2.0, "carl/actions_generated_per_question": b["generated"] / 2,
                     "carl/actions_trained_per_question": b["trained"] / 2, "carl/tokens_trained": 10 * b["trained"],
                     "carl/tokens_generated": 10 * b["generated"], "timing_s/step": 5.0, "carl/trees": 2.0,
                     "carl/zero_advantage_fraction": 0.2 + 0.1 * s, "critic/score/mean": 0.5}
                    for t in range(1, points)]  # fmt: skip
            for r in rows:  # CARL logs its trees, GRPO (trainer.baseline_signal_stats) its groups
                r.update({"carl/actions_trained_per_tree": b["trained"] / 2, "carl/degenerate_tree_fraction": 0.25,
                          "carl/entropy_at_forks": 0.5 + 0.1 * s, "carl/entropy_elsewhere": 0.1}
                         if arm != "grpo" else {"carl/no_signal_group_fraction": 0.25})  # fmt: skip
            lines = [json.dumps({"step": r.pop("step"), "data": r}) for r in rows]  # verl's file logger's layout
            (run / "metrics.jsonl").write_text("\n".join(lines))
            for p in range(1, points):
                a = accuracy[arm][s, :, p]
                (run / "eval" / f"step_{p:03d}.json").write_text(json.dumps({"questions": qs, "sampled": a.tolist(),
                                                                             "greedy": a.tolist()}))  # fmt: skip


def test_report_on_hand_made_runs(tmp_path):
    rng = np.random.default_rng(0)
    start = rng.integers(0, 2, size=(1, 40, 1)).astype(float)
    grpo = np.concatenate([np.repeat(start, 2, axis=0), rng.random((2, 40, 2))], axis=2)
    carl = grpo.copy()
    carl[:, :, 1:] += 0.05  # CARL is GRPO + 5 points on every trained point: a difference of exactly 0.05
    fake_experiment(tmp_path, {"grpo": grpo, "carl": carl},
                    {"grpo": {"generated": 64, "trained": 64}, "carl": {"generated": 60, "trained": 20}})  # fmt: skip
    result = report.build_report(tmp_path)
    arms = result["arms"]
    # Means by hand: the final point averaged over seeds and questions.
    assert arms["grpo"]["final_sampled"]["estimate"] == pytest.approx(grpo[:, :, -1].mean())
    assert arms["carl"]["final_sampled"]["estimate"] == pytest.approx(carl[:, :, -1].mean())
    # A constant paired shift has a zero-width interval: [0.05, 0.05].
    diff = result["vs_grpo"]["carl"]["sampled"]
    assert [diff["estimate"], diff["low"], diff["high"]] == pytest.approx([0.05] * 3)
    assert diff["verdict"] == "better" and result["claims"]["C1"]["holds"]
    # Budgets: 64 generated per step for 2 steps -> 128 at the end; CARL trained 20 per step -> 40.
    assert arms["grpo"]["actions_generated"] == 128 and arms["carl"]["actions_trained"] == 40
    assert [p["actions_trained"] for p in arms["carl"]["curve"]] == [0, 20, 40]
    # Trees: 1/4 without signal; trained actions with A != 0: 0.8 (seed 0) and 0.7 (seed 1), mean 0.75, within its band.
    assert arms["carl"]["no_signal_tree_share"]["estimate"] == pytest.approx(0.25)
    nonzero = arms["carl"]["nonzero_advantage_share"]
    assert nonzero["estimate"] == pytest.approx(0.75) and 0.7 - 1e-9 <= nonzero["low"] <= 0.75 <= nonzero["high"] <= 0.8
    # Entropy at the fork points against elsewhere: 0.5 (seed 0) and 0.6 (seed 1) against 0.1.
    assert arms["carl"]["entropy_at_forks"]["estimate"] == pytest.approx(0.55)
    assert arms["carl"]["entropy_elsewhere"]["estimate"] == pytest.approx(0.1)
    assert math.isnan(arms["grpo"]["entropy_at_forks"]["estimate"])
    # Of the generated actions: 20 trained of 60 per step, 0.8 and 0.7 of them with A != 0 -> 0.8/3 and 0.7/3.
    assert arms["carl"]["nonzero_generated_share"]["estimate"] == pytest.approx(0.75 / 3)
    # GRPO logs the same shares for its groups: 1/4 silent, every action trained, 0.8 / 0.7 of them with A != 0.
    assert arms["grpo"]["no_signal_tree_share"]["estimate"] == pytest.approx(0.25)
    assert arms["grpo"]["nonzero_generated_share"]["estimate"] == pytest.approx(0.75)
    # Gain over the start in points per 1,000 generated actions, CARL minus GRPO, by hand.
    start = grpo[0, :, 0].mean()
    by_hand = 100 * (carl[:, :, -1].mean() - start) / 0.120 - 100 * (grpo[:, :, -1].mean() - start) / 0.128
    per_k = report.per_action(report.load(tmp_path), "carl", "grpo", "actions_generated")
    assert per_k["estimate"] == pytest.approx(by_hand)
    assert result["per_1k_actions_vs_grpo"]["carl"]["generated"]["estimate"] == pytest.approx(by_hand)
    assert Path(result["figure"]).stat().st_size > 0 and (tmp_path / "results.json").exists()
    assert "| CARL | 2 |" in result["table"]


def test_c1_fails_when_carl_is_clearly_worse(tmp_path):
    rng = np.random.default_rng(1)
    grpo = rng.random((2, 50, 3))
    grpo[:, :, 0] = grpo[0, :, 0]
    carl = grpo.copy()
    carl[:, :, 1:] -= 0.10
    fake_experiment(tmp_path, {"grpo": grpo, "carl": carl},
                    {"grpo": {"generated": 64, "trained": 64}, "carl": {"generated": 60, "trained": 20}})  # fmt: skip
    claims = report.build_report(tmp_path)["claims"]
    assert not claims["C1"]["holds"] and claims["C1"]["verdict"] == "worse"
    # GRPO's random finals do not beat the start: its gain's interval reaches 0, so C2 cannot be judged.
    assert claims["C2"]["grpo_gain"]["low"] <= 0 and not claims["C2"]["measurable"]


# ---------------------------------------------------------------------------------------------------- CI smoke
@pytest.mark.slow
def test_smoke_mode_end_to_end(tmp_path):
    """CI: GRPO and CARL with spread forks, 2 steps, 1 seed, through verl's trainer on CPU, scored, reported."""
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "benchmarks.carl_vs_grpo", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert set(result["arms"]) == set(exp.SMOKE_ARMS)
    for arm in exp.SMOKE_ARMS:
        run = out / "runs" / arm / "seed0"
        assert (run / "command.txt").read_text().startswith("-m recipe.carl.main_carl")
        scores = json.loads((run / "eval" / "step_002.json").read_text())
        assert len(scores["sampled"]) == result["held_out_questions"] > 0
        r = result["arms"][arm]
        assert 0 < r["actions_trained"] <= r["actions_generated"]
        assert [p["step"] for p in r["curve"]] == [0, 1, 2]
    assert result["arms"]["grpo"]["actions_trained"] == result["arms"]["grpo"]["actions_generated"]
    # Resuming a finished experiment runs nothing again.
    before = (out / "runs" / "grpo" / "seed0" / "done.json").stat().st_mtime
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and (out / "runs" / "grpo" / "seed0" / "done.json").stat().st_mtime == before


def test_fork_profile_by_hand(tmp_path):
    # Tree: root (forked twice; children 1 and 2 end with values 0.1 and 1.1: they differ), state 1 (forked once; its
    # children 3 and 4 both 0.1). 3 forks: mean depth (0 + 0 + 1) / 3, 2 of 3 at the root, 2 of 3 where children differ.
    # Samples: node 1 was sampled twice (merged), trained with A = -0.5; node 2 once, A = +0.5; nodes 3 and 4 once
    # each, trained with A = 0 (equal values) and not trained: 2 + 1 of 5 samples carry a signal.
    def node(i, parent, depth, forked, value, count=1, trained=False, advantage=0.0):
        return {"id": i, "parent": parent, "depth": depth, "forked": forked, "value": value, "count": count,
                "trained": trained, "advantage": advantage}  # fmt: skip

    nodes = [node(0, None, 0, 2, 0.6), node(1, 0, 1, 1, 0.1, 2, True, -0.5), node(2, 0, 1, 0, 1.1, 1, True, 0.5),
             node(3, 1, 2, 0, 0.1, 1, True), node(4, 1, 2, 0, 0.1)]  # fmt: skip
    (tmp_path / "step_000001.jsonl").write_text(json.dumps({"nodes": nodes}) + "\n")
    profile = report.fork_profile(tmp_path)
    wanted = {"trees": 1, "forks_per_tree": 3, "fork_depth_mean": 1 / 3, "fork_share_at_root": 2 / 3}
    assert profile == pytest.approx(
        {**wanted, "fork_share_where_children_differ": 2 / 3, "generated_share_with_signal": 3 / 5}
    )
    assert report.fork_profile(tmp_path / "none") is None
    (tmp_path / "step_000002.jsonl").write_text(json.dumps({"nodes": nodes[:3]}) + "\n")  # step 2: the root's forks
    assert report.fork_profile(tmp_path)["trees"] == 2 and report.fork_profile(tmp_path, upto=1) == profile


def test_reproduction_against_the_original_by_hand(tmp_path, capsys):
    rng = np.random.default_rng(1)
    acc = {"grpo": rng.integers(0, 2, size=(2, 50, 3)).astype(float)}
    acc["grpo"][:, :, 0] = acc["grpo"][0, :, 0]  # one shared start
    budgets = {"grpo": {"generated": 64, "trained": 64}}
    fake_experiment(tmp_path / "original", acc, budgets)
    rerun = {"grpo": acc["grpo"][:1].copy()}  # seed 0 again ...
    rerun["grpo"][0, :5, -1] = 1 - rerun["grpo"][0, :5, -1]  # ... with 5 of 50 final scores flipped
    fake_experiment(tmp_path / "rerun", rerun, budgets)
    result = report.reproduction(tmp_path / "rerun", tmp_path / "original")
    (run,) = result["runs"]
    final = run["points"][-1]["sampled"]
    flips = 1 - 2 * acc["grpo"][0, :5, -1]  # +1 where 0 became 1, -1 where 1 became 0
    assert final["difference"] == pytest.approx(flips.sum() / 50) and final["questions_changed"] == pytest.approx(0.1)
    assert run["points"][1]["sampled"]["difference"] == 0 and run["max_reward_difference"] == 0
    assert run["noise_half_width"] > 0.05 and run["within_noise"] == (
        abs(final["difference"]) <= run["noise_half_width"]
    )
    assert (tmp_path / "rerun" / "reproduction.json").exists() and "grpo seed 0" in capsys.readouterr().out


def test_reproduction_refuses_a_run_the_original_lacks(tmp_path):
    acc = {"grpo": np.zeros((1, 4, 2))}
    fake_experiment(tmp_path / "original", acc, {"grpo": {"generated": 8, "trained": 8}})
    fake_experiment(tmp_path / "rerun", {"carl": np.zeros((1, 4, 2))}, {"carl": {"generated": 8, "trained": 4}})
    with pytest.raises(ValueError, match="has no finished carl seed 0"):
        report.reproduction(tmp_path / "rerun", tmp_path / "original")


def test_seeds_outside_the_protocol_are_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"--seeds \[7\]: the protocol has seeds 0..3"):
        exp.main(["--out", str(tmp_path), "--seeds", "7"])
    with pytest.raises(SystemExit, match="--against compares finished runs; add --report"):
        exp.main(["--out", str(tmp_path), "--against", str(tmp_path)])
    fake_experiment(tmp_path / "rerun", {"grpo": np.zeros((1, 4, 2))}, {"grpo": {"generated": 8, "trained": 8}})
    with pytest.raises(SystemExit, match=r"nowhere holds no experiment \(no start_eval.json\)"):
        exp.main(["--out", str(tmp_path / "rerun"), "--report", "--against", str(tmp_path / "nowhere")])


def test_export_scores_is_exact_and_compact(tmp_path):
    from benchmarks.carl_vs_grpo_report import export_scores

    questions = ["q1", "q2", "q3"]
    (tmp_path / "protocol.json").write_text(json.dumps({"protocol": {"eval_samples": 4}}))
    (tmp_path / "start_eval.json").write_text(json.dumps({"questions": questions, "sampled": [0.25, 1.0, 0.0],
                                                          "greedy": [1.0, 1.0, 0.0]}))  # fmt: skip
    for arm, seed, step, sampled in (("grpo", 0, 10, [0.5, 0.75, 0.0]), ("carl", 1, 30, [1.0, 0.25, 0.5])):
        folder = tmp_path / "runs" / arm / f"seed{seed}" / "eval"
        folder.mkdir(parents=True)
        (folder / f"step_{step:03d}.json").write_text(json.dumps({"questions": questions, "sampled": sampled,
                                                                  "greedy": [0.0, 1.0, 1.0]}))  # fmt: skip
    out = export_scores(tmp_path, tmp_path / "scores.json")
    assert out == json.loads((tmp_path / "scores.json").read_text())
    # Sampled scores as correct episodes of 4: 0.5 -> 2, 0.75 -> 3; greedy as 0/1.
    assert out["runs"]["grpo"]["0"]["10"] == {"sampled": [2, 3, 0], "greedy": [0, 1, 1]}
    assert out["runs"]["carl"]["1"]["30"]["sampled"] == [4, 1, 2] and out["start"]["sampled"] == [1, 4, 0]
    bad = tmp_path / "runs" / "carl" / "seed1" / "eval" / "step_030.json"
    bad.write_text(json.dumps({"questions": questions, "sampled": [0.3, 0.0, 0.0], "greedy": [0, 0, 0]}))
    with pytest.raises(ValueError, match="not multiples of 1/4"):
        export_scores(tmp_path, tmp_path / "scores.json")
