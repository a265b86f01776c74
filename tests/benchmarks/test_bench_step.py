"""`benchmarks/bench_step.py`: the medians it reports, on hand-made metrics."""

import pytest

from benchmarks import bench_step


def row(step, total, gen, logp, update):
    parts = {
        "timing_s/step": total,
        "timing_s/gen": gen,
        "timing_s/old_log_prob": logp,
        "timing_s/update_actor": update,
    }
    return {"step": step, **parts}


def test_medians_leave_the_warm_up_step_out():
    rows = [row(1, 99.0, 50, 20, 29), row(2, 6.0, 4, 1, 1), row(3, 8.0, 5, 1, 2), row(4, 7.0, 4, 2, 1)]
    got = bench_step.summarize(rows, {"wall_s": 120.0, "load_before": [1.234, 1.0, 1.0]})
    assert got == {"step": 7.0, "gen": 4, "old_log_prob": 1, "update_actor": 1, "wall_s": 120.0, "load_before": 1.23}
    with pytest.raises(ValueError, match="at least 2 steps"):
        bench_step.summarize(rows[:1], {"wall_s": 1.0, "load_before": [0, 0, 0]})


def test_too_few_steps_are_refused():
    with pytest.raises(SystemExit, match="--steps 1 must be >= 2"):
        bench_step.main(["--steps", "1"])


def test_actions_generated_and_the_ratios_against_grpo_by_hand():
    # GRPO: 16 questions x 25 actions = 400 per step; CARL: 16 x 12.5 = 200 (medians over steps 2 on).
    grpo = [{**row(s, t, 1, 1, 1), "carl/questions": 16, "carl/actions_generated_per_question": 25.0}
            for s, t in ((1, 50.0), (2, 10.0), (3, 12.0), (4, 11.0))]  # fmt: skip
    carl = [{**row(s, t, 1, 1, 1), "carl/questions": 16, "carl/actions_generated_per_question": a}
            for s, t, a in ((1, 40.0, 1.0), (2, 8.0, 12.5), (3, 8.8, 12.0), (4, 9.0, 13.0))]  # fmt: skip
    done = {"wall_s": 1.0, "load_before": [1.0, 1.0, 1.0]}
    got = {"grpo": bench_step.summarize(grpo, done), "carl_pool": bench_step.summarize(carl, done)}
    assert got["grpo"]["actions_generated"] == 400 and got["carl_pool"]["actions_generated"] == 200
    ratios = bench_step.against_grpo(got)
    # step 8.8 / 11 = 0.8; per generated action (8.8 / 200) / (11 / 400) = 1.6
    assert ratios["carl_pool"]["step"] == pytest.approx(0.8)
    assert ratios["carl_pool"]["per_generated_action"] == pytest.approx(1.6)
    assert bench_step.against_grpo({"carl_pool": got["carl_pool"]}) == {}


def test_the_second_protocols_arms_run_with_its_fields():
    assert bench_step.VARIANTS["carl_pool"] == {"algo": "carl", "pool_floor": 3, "pool_prior": 4.0, "packing": "tree"}
    assert bench_step.VARIANTS["carl_k2"]["forks_in_flight"] == 2 and bench_step.VARIANTS["grpo_pool"]["algo"] == "grpo"
    assert bench_step.DEFAULT_VARIANTS == ("carl_path", "carl_tree", "grpo")
