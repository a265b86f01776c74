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
