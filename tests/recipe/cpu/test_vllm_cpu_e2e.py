"""verl's own vLLM rollout on CPU (vLLM's CPU build), end to end through `python -m recipe.carl.main_carl`:
2 GRPO steps with weight sync, the negative control without it, and 2 CARL steps of the shipped SFT start of the
tiny SynthHop policy against a live retriever, with the vLLM server's request log (recipe.carl.cpu.vllm_cpu).

Runs in the vLLM venv (`bash scripts/install_cpu.sh --vllm`; marker `vllm`, skipped elsewhere), one run at a time
(each starts its own Ray cluster and vLLM server; two at once would also share verl's weight-sync socket path).
About 11 minutes for the three runs on 2 cores; peak ~7.5 GB (summed PSS).
"""

import importlib
import json
from pathlib import Path

import pytest

try:  # tests/recipe/cpu is a package in this repo; keep working if it stops being one
    from .grpo_smoke import SHIPPED_SFT, run_smoke
except ImportError:
    from grpo_smoke import SHIPPED_SFT, run_smoke

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DIFF_KEY = "training/rollout_probs_diff_max"
#: CARL run: 2 questions per step, trees of N0 = 2 root rollouts + N = 4 forks handed out 2 at a time (so two
#: forks of a tree are in the server together), at most 4 actions per trajectory.
CARL = {"n0": 2, "n_forks": 4, "forks_in_flight": 2, "max_actions": 4}


def check_tree_record(record: dict) -> None:
    """carl_core's dump invariant check, wherever the refactor of issue 17 puts it."""
    for module in ("tests.core.support", "carl_core", "carl_core.stats"):
        try:
            check = importlib.import_module(module).check_tree_record
        except (ImportError, AttributeError):
            continue
        return check(record)
    pytest.fail("check_tree_record is in none of tests.core.support, carl_core, carl_core.stats")


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    return run_smoke(steps=2, device="cpu_vllm", workdir=tmp_path_factory.mktemp("vllm_synced"), timeout_s=600)


@pytest.fixture(scope="module")
def unsynced(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vllm_unsynced")
    return run_smoke(steps=2, sync_weights=False, device="cpu_vllm", workdir=workdir, timeout_s=600)


@pytest.fixture(scope="module")
def carl(tmp_path_factory):
    return run_smoke(
        steps=2,
        algo="carl",
        device="cpu_vllm",
        data="synthhop",
        model_dir=SHIPPED_SFT,
        workdir=tmp_path_factory.mktemp("vllm_carl"),
        timeout_s=720,
        extra_overrides=[f"algorithm.carl.{key}={value}" for key, value in CARL.items()],
    )


def test_grpo_on_vllm_runs_two_steps(synced):
    assert synced.returncode == 0 and not synced.timed_out, f"see {synced.log_path}"
    assert [m["step"] for m in synced.metrics] == [1, 2]
    assert all(g > 0 for g in synced.series("actor/grad_norm"))
    # Every generate() went through verl's vLLMHttpServer: 4 prompts x n=2 per step.
    assert len(synced.requests) == 16 and {r["stop_reason"] for r in synced.requests} == {"completed"}


def test_vllm_logprobs_match_the_actor_after_a_weight_sync(synced):
    # Step 2 samples with the weights synced after step 1's update (bucketed shared-memory transfer,
    # update_weights_from_ipc, the re-run of process_weights_after_loading, the patched live-weight GEMMs).
    diffs = synced.series(DIFF_KEY)
    assert len(diffs) == 2 and diffs[1] <= 1e-4 and diffs[0] <= 1e-4, diffs


def test_negative_control_without_weight_sync_diverges(synced, unsynced):
    assert unsynced.returncode == 0, f"see {unsynced.log_path}"
    diffs = unsynced.series(DIFF_KEY)
    # Step 1 matches (the start-up sync loaded the policy); step 2 samples from the weights before the update.
    assert diffs[0] <= 1e-4
    assert diffs[1] > 1e-2 and diffs[1] > 100 * synced.series(DIFF_KEY)[1], diffs


def test_carl_on_vllm_runs_two_steps_with_the_sft_start(carl):
    assert carl.returncode == 0 and not carl.timed_out, f"see {carl.log_path}"
    assert [m["step"] for m in carl.metrics] == [1, 2]
    leaves = CARL["n0"] + CARL["n_forks"]
    assert carl.series("carl/leaves_per_tree") == [leaves, leaves] and carl.series("carl/trees") == [2.0, 2.0]
    assert all(a > 0 for a in carl.series("carl/actions_trained_per_tree"))
    assert max(carl.series(DIFF_KEY)) <= 1e-4


def _dumps(result) -> list[list[dict]]:
    dumps = sorted((Path(result.log_path).parent / "ckpt" / "carl_trees").glob("step_*.jsonl"))
    assert [d.name for d in dumps] == ["step_000001.jsonl", "step_000002.jsonl"]
    return [[json.loads(line) for line in d.read_text().splitlines() if line.strip()] for d in dumps]


def test_carl_trees_fork_below_the_root_and_satisfy_the_invariants(carl):
    fork_depths = []
    for step, records in enumerate(_dumps(carl), start=1):
        assert len(records) == 2
        for record in records:
            check_tree_record(record)
        nodes = [n for record in records for n in record["nodes"]]
        depths = [n["depth"] for n in nodes for _ in range(n["forked"])]
        assert max(depths) >= 1, (step, depths)  # forks below the root in every step
        fork_depths += depths
        # The SFT start ends its actions at real </search> and </answer> stops (the stop strings CARL sends vLLM), so
        # its trajectories are several actions deep and most of them answer.
        actions = [n for n in nodes if n["parent"] is not None]
        at_stop = [n for n in actions if (n["text"] or "").rstrip().endswith(("</search>", "</answer>"))]
        assert len(at_stop) >= 0.9 * len(actions), (step, [n["text"] for n in actions])
        reasons = [n["finish_reason"] for n in nodes if n["num_children"] == 0]
        assert reasons.count("answer") >= len(reasons) / 2, (step, reasons)
        assert max(n["depth"] for n in nodes) >= 2, step
    # Forks land below the root (depth 0 is the prompt), some two or more actions deep.
    assert max(fork_depths) > 1, fork_depths


def _overlap(a: dict, b: dict) -> float:
    return min(a["t1"], b["t1"]) - max(a["t0"], b["t0"])


def fork_requests(requests: list[dict], n0: int) -> dict[tuple, list[dict]]:
    """The fork requests of each tree, rebuilt from the vLLM server's request log: ``{root prompt: [requests]}``.

    verl's client keeps a CARL tree on one server by the tree's request id but gives vLLM a fresh id per call, so
    trees and branches are told apart by content. A tree's root prompt is a logged prompt that extends no other.
    Going through a tree's calls in start order, a call whose prompt extends an earlier, finished call's prompt and
    output continues that call's trajectory (each call is continued at most once); the first ``n0`` calls at the root
    are the N0 root rollouts; every other call starts a new branch: a fork.
    """
    prompts = {tuple(r["prompt_ids"]) for r in requests}
    roots = [p for p in prompts if not any(len(q) < len(p) and p[: len(q)] == q for q in prompts)]
    forks = {}
    for root in roots:
        calls = sorted((r for r in requests if tuple(r["prompt_ids"][: len(root)]) == root), key=lambda r: r["t0"])
        continued, at_root, found = set(), 0, []
        for i, call in enumerate(calls):
            if tuple(call["prompt_ids"]) == root:
                at_root += 1
                if at_root <= n0:
                    continue
            parent = next(
                (
                    j
                    for j, q in enumerate(calls[:i])
                    if j not in continued
                    and q["t1"] <= call["t0"]
                    and call["prompt_ids"][: len(q["prompt_ids"]) + len(q["output_ids"])]
                    == q["prompt_ids"] + q["output_ids"]
                ),
                None,
            )
            if parent is None:
                found.append(call)
            else:
                continued.add(parent)
        forks[root] = found
    return forks


def test_vllm_server_overlaps_forks_of_a_tree_and_serves_their_prefix_from_cache(carl):
    requests = carl.requests
    forks = fork_requests(requests, CARL["n0"])
    # The rebuild is exact: 2 trees per step, N forks each.
    assert len(forks) == 4 and all(len(f) == CARL["n_forks"] for f in forks.values()), [len(f) for f in forks.values()]
    pairs = [(a, b) for f in forks.values() for i, a in enumerate(f) for b in f[i + 1 :] if _overlap(a, b) > 0]
    # forks_in_flight=2: two forks of one tree are in the vLLM server at the same time.
    assert pairs, "no two forks of one tree were in the vLLM server at the same time"
    lengths = [(a["prompt_tokens"], b["prompt_tokens"]) for a, b in pairs]
    print(f"{len(pairs)} pairs of concurrent forks; their prompt lengths: {lengths}")
    calls = [r for f in forks.values() for r in f]
    share = sum(r["cached_tokens"] for r in calls) / sum(r["prompt_tokens"] for r in calls)
    print(f"fork calls: {100 * share:.1f} % of their prompt tokens from the prefix cache")
    # vLLM's prefix cache (RequestOutput.num_cached_tokens) serves part of the prompts of every CARL step. With
    # vLLM's CPU block size of 128 tokens only prompts longer than 128 tokens can hit (GPU: 16).
    for step in sorted({r["global_steps"] for r in requests}):
        rs = [r for r in requests if r["global_steps"] == step]
        share = sum(r["cached_tokens"] for r in rs) / sum(r["prompt_tokens"] for r in rs)
        print(f"weights of step {step}: {len(rs)} requests, {100 * share:.1f} % of prompt tokens from the prefix cache")
        assert share > 0, step
