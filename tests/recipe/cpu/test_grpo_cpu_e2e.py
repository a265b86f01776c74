"""End to end through `python -m recipe.carl.main_carl` on CPU (carl_hf rollout): 2 GRPO steps, a negative control
without weight sync, and 2 CARL steps (tree agent loop, carl estimator and trainer hook, tree dumps).

Slow (about 2.5 min for both runs on 2 cores); run with ``pytest -m slow tests/recipe/cpu``.
"""

from pathlib import Path

import pytest

try:  # tests/recipe/cpu is a package in this repo; keep working if it stops being one
    from .grpo_smoke import run_smoke
except ImportError:
    from grpo_smoke import run_smoke

pytestmark = pytest.mark.slow

DIFF_KEY = "training/rollout_probs_diff_max"


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    return run_smoke(steps=2, sync_weights=True, workdir=tmp_path_factory.mktemp("synced"), timeout_s=420)


@pytest.fixture(scope="module")
def unsynced(tmp_path_factory):
    return run_smoke(steps=2, sync_weights=False, workdir=tmp_path_factory.mktemp("unsynced"), timeout_s=420)


def test_grpo_runs_two_steps(synced):
    assert synced.returncode == 0 and not synced.timed_out, f"see {synced.log_path}"
    assert [m["step"] for m in synced.metrics] == [1, 2]
    # The toy reward is dense, so GRPO advantages and gradients are non-zero.
    assert all(g > 0 for g in synced.series("actor/grad_norm"))
    assert all(s > 0 for s in synced.series("critic/score/mean"))
    # 4 prompts x 2 samples, 4 prompts per update: one update of the 8 rows, no padding (verl's own schedule).
    assert synced.series("carl/updates_per_step") == [1.0, 1.0] and synced.series("carl/padding_rows") == [0.0, 0.0]


def test_rollout_logprobs_match_actor_while_synced(synced):
    diffs = synced.series(DIFF_KEY)
    assert len(diffs) == 2 and max(diffs) < 1e-3, diffs


def test_weights_reach_the_server_every_step(synced):
    # One sync at start-up, one after each step; lr=1e-3 moves the weights every time.
    assert len(synced.checksums) == 3, synced.checksums
    assert all(a != b for a, b in zip(synced.checksums, synced.checksums[1:], strict=False))


def test_negative_control_without_sync_diverges(synced, unsynced):
    assert unsynced.returncode == 0, f"see {unsynced.log_path}"
    assert unsynced.checksums == []
    diffs = unsynced.series(DIFF_KEY)
    # Step 1 still matches (the server loaded the same initial checkpoint); step 2 samples from stale weights.
    assert diffs[0] < 1e-3
    assert diffs[1] > 1e-2 and diffs[1] > 100 * synced.series(DIFF_KEY)[1], diffs


@pytest.fixture(scope="module")
def carl(tmp_path_factory):
    return run_smoke(steps=2, algo="carl", workdir=tmp_path_factory.mktemp("carl"), timeout_s=420)


def test_carl_runs_two_steps_through_the_tree_agent_and_estimator(carl):
    assert carl.returncode == 0 and not carl.timed_out, f"see {carl.log_path}"
    assert [m["step"] for m in carl.metrics] == [1, 2]
    # Trees of N0 + N = 4 leaves per prompt, 2 prompts: the tree agent loop and the carl trainer hook ran.
    assert carl.series("carl/leaves_per_tree") == [4.0, 4.0] and carl.series("carl/trees") == [2.0, 2.0]
    assert all(a > 0 for a in carl.series("carl/actions_trained_per_tree"))
    assert all(g > 0 for g in carl.series("actor/grad_norm"))
    assert max(carl.series(DIFF_KEY)) < 1e-3
    assert len(carl.checksums) == 3 and carl.checksums[0] != carl.checksums[-1]
    # One question per update: 2 updates a step, on as many real rows each (+-1), whatever the trees gave.
    assert carl.series("carl/updates_per_step") == [2.0, 2.0]
    low, high = carl.series("carl/real_rows_per_update_min"), carl.series("carl/real_rows_per_update_max")
    assert all(1 <= lo <= hi <= lo + 1 for lo, hi in zip(low, high, strict=True)), (low, high)


def test_carl_tree_dumps_satisfy_the_invariants(carl):
    from recipe.carl.io import read_jsonl
    from tests.core.support import check_tree_record

    dumps = sorted((Path(carl.log_path).parent / "ckpt" / "carl_trees").glob("step_*.jsonl"))
    assert [d.name for d in dumps] == ["step_000001.jsonl", "step_000002.jsonl"]
    for dump in dumps:
        records = read_jsonl(dump)
        assert len(records) == 2
        for record in records:
            check_tree_record(record)
