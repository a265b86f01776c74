"""A run killed after a checkpoint and resumed keeps every step's metrics line exactly once (issue 13, item 12).

verl's own file logger opens metrics.jsonl for writing, so the resumed run used to erase steps 1..N. Here: CARL on
CPU through main_carl (its tree agent loop logs the per-step budgets that the totals add up), 4 steps with a
checkpoint every 2, SIGKILL as soon as step 3 is logged (its checkpoint is never written), then the same command
again: it resumes from step 2, runs steps 3 and 4, and the file must read steps 1, 2, 3, 4, each once (step 3 from the
resumed run). The running totals `carl/total/*` go on from the checkpoint's: at every step they are the sums of the
per-step counts of the steps logged before, resumed or not.

Slow (two trainer start-ups, about 2.5 min on 2 idle cores); run with ``pytest -m slow tests/recipe/cpu``.
"""

from pathlib import Path

import pytest

try:  # tests/recipe/cpu is a package in this repo; keep working if it stops being one
    from .grpo_smoke import run_smoke
except ImportError:
    from grpo_smoke import run_smoke

pytestmark = pytest.mark.slow

RESUMABLE = ["trainer.resume_mode=auto", "trainer.save_freq=2"]
CARL = {"algo": "carl", "timeout_s": 540}


def test_a_killed_and_resumed_run_keeps_every_steps_metrics_once(tmp_path):
    first = run_smoke(steps=4, workdir=tmp_path, **CARL, extra_overrides=RESUMABLE, kill_after_step=3)
    assert first.returncode != 0 and not first.timed_out, f"the run was not killed; see {first.log_path}"
    ckpt = Path(tmp_path) / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2", f"see {first.log_path}"
    assert [m["step"] for m in first.metrics] == [1, 2, 3]
    killed_step3 = first.metrics[2]["timing_s/step"]

    resumed = run_smoke(steps=4, workdir=tmp_path, **CARL, extra_overrides=RESUMABLE)
    assert resumed.returncode == 0 and not resumed.timed_out, f"see {resumed.log_path}"
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3, 4]
    assert resumed.metrics[:2] == first.metrics[:2]  # the earlier steps, untouched
    assert resumed.metrics[2]["timing_s/step"] != killed_step3  # step 3 is the resumed run's
    for i, step in enumerate(resumed.metrics):  # carl/total/*: step 2's totals (saved in its checkpoint) + 3 + 4
        so_far = resumed.metrics[: i + 1]
        generated = sum(m["carl/actions_generated_per_question"] * m["carl/questions"] for m in so_far)
        assert step["carl/total/actions_generated"] == round(generated), step
        assert step["carl/total/tokens_trained"] == sum(m["carl/tokens_trained"] for m in so_far), step
    assert (ckpt / "global_step_4" / "carl_totals.json").exists()
