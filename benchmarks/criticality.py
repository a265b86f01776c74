"""The paper's criticality study (§4, Eq. 5) on SynthHop: does a state's entropy track how much its action matters?

For each held-out question, one trajectory is sampled (T=1) from the policy. At every state s_t on it, k actions
a' are sampled (T=1) and each is continued greedily (T=0) to the end; the state's criticality is the spread of
the final rewards, C(s_t) = std_{a'}[R(tau_{s_t, a'})] (Eq. 5), and its entropy the Monte-Carlo estimate of Eqs. 6-8
over the k + 1 sampled actions (each action's length-normalised negative log-prob, `carl_core.action_entropy`).

Everything runs through the recipe's own pieces (`recipe.carl.tiny.local_agent.LocalAgent`): the agent loop's
`SearchEnvironment` (the same action parsing, observations, T_max and reward as training), `carl_core.rollout_from`,
and the CPU rollout server's batched engine (all questions run concurrently, so requests share forward passes).

Reported: Spearman's rank correlation of entropy with C, the share of states with near-zero C (the paper: more
than half), and the Brunner-Munzel test of entropy between high-C and near-zero-C states (the paper: p = 0.002).
And by action type, the paper's Fig. 5 (search and access more critical than read and answer): for the kind of the
action the trajectory took at each state, the states' mean criticality and entropy and their shares of high and
near-zero C (`by_kind`). `--action-space paper` studies SynthHop's pages variant (search, access, read, answer;
`--data` then names a folder written with `make_data --pages`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.carl_vs_grpo import PROTOCOL, REPO, prepare
from carl_core import Draw, RolloutTree, rollout_from
from recipe.carl.tiny.local_agent import LocalAgent


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of the study."""

    questions: int = 40
    """Held-out questions (the first ones of the test split)."""
    k: int = 8
    """Actions resampled per state."""
    near_zero: float = 0.05
    """C below this is 'near-zero' (rewards are F1 + 0.1 format, so 0.05 is half the format bonus)."""
    high: float = 0.4
    """C above this is 'high' (the paper's ~10% of states with std > 0.4)."""
    max_actions: int = 6
    max_action_tokens: int = 32
    response_length: int = 384
    topk: int = 2
    seed: int = 0
    action_space: str = "search_r1"
    """`paper`: SynthHop's pages variant (its data written with `make_data --pages`)."""
    page_chunk_chars: int = 64
    snippet_words: int = 5


def compute_criticality_stats(
    entropy: Sequence[float], reward_std: Sequence[float], near_zero: float = 0.05, high: float = 0.4
) -> dict[str, Any]:
    """Summary of the study (§4).

    Args:
        entropy: each state's entropy estimate [len: n_states].
        reward_std: each state's criticality C (Eq. 5) [len: n_states].
        near_zero: threshold below which C counts as near zero.
        high: threshold above which C counts as high.

    Returns:
        `spearman` (rank correlation, None when undefined), `frac_near_zero_std`, `n_states`, `frac_high_std`,
        `entropy_mean_high` / `entropy_mean_near_zero`, and `brunner_munzel_p` (None when a group is empty).
    """
    from scipy import stats

    h, c = np.asarray(entropy, dtype=float), np.asarray(reward_std, dtype=float)
    if h.shape != c.shape or h.ndim != 1:
        raise ValueError(f"entropy and reward_std must be 1-D of the same length, got {h.shape} and {c.shape}")
    n = int(h.size)
    low_mask, high_mask = c < near_zero, c > high
    rho = None
    if n >= 3 and np.ptp(h) > 0 and np.ptp(c) > 0:
        rho = float(stats.spearmanr(h, c).statistic)
    p_value = None
    if high_mask.sum() >= 2 and low_mask.sum() >= 2:
        p_value = float(stats.brunnermunzel(h[high_mask], h[low_mask]).pvalue)
        p_value = None if math.isnan(p_value) else p_value  # undefined when the two groups do not overlap at all
    return {
        "spearman": rho,
        "frac_near_zero_std": float(low_mask.mean()) if n else None,
        "frac_high_std": float(high_mask.mean()) if n else None,
        "n_states": n,
        "entropy_mean_high": float(h[high_mask].mean()) if high_mask.any() else None,
        "entropy_mean_near_zero": float(h[low_mask].mean()) if low_mask.any() else None,
        "brunner_munzel_p": p_value,
        "near_zero": near_zero,
        "high": high,
    }


def compute_kind_stats(
    kinds: Sequence[str],
    entropy: Sequence[float],
    reward_std: Sequence[float],
    near_zero: float = 0.05,
    high: float = 0.4,
) -> dict[str, dict[str, float | int]]:
    """Criticality and entropy by the kind of the action taken at each state (the paper's Fig. 5).

    Args:
        kinds: the kind of the action the sampled trajectory took at each state (search, access, read, answer,
            invalid) [len: n_states].
        entropy: each state's entropy estimate [len: n_states].
        reward_std: each state's criticality C (Eq. 5) [len: n_states].
        near_zero: threshold below which C counts as near zero.
        high: threshold above which C counts as high.

    Returns:
        Per kind: `n_states`, `criticality_mean`, `entropy_mean`, `frac_high_std`, `frac_near_zero_std`.
    """
    h, c = np.asarray(entropy, dtype=float), np.asarray(reward_std, dtype=float)
    if not len(kinds) == len(h) == len(c):
        raise ValueError(
            f"kinds, entropy and reward_std must have one value per state: {len(kinds)}, {len(h)}, {len(c)}"
        )
    out: dict[str, dict[str, float | int]] = {}
    for kind in sorted(set(kinds)):
        mask = np.array([k == kind for k in kinds])
        out[kind] = {
            "n_states": int(mask.sum()),
            "criticality_mean": float(c[mask].mean()),
            "entropy_mean": float(h[mask].mean()),
            "frac_high_std": float((c[mask] > high).mean()),
            "frac_near_zero_std": float((c[mask] < near_zero).mean()),
        }
    return out


async def _resample(tree: RolloutTree, state: int, sample_env, greedy_env) -> tuple[float, float]:
    """One a' ~ pi(.|s) then a greedy continuation; returns (h(a'), final reward)."""
    draw = tree.start_rollout(state)
    step = await sample_env.step(tree, state, Draw(draw, 0))
    if len(step.token_ids) == 0:
        return float("nan"), float("nan")
    child = tree.add_action(
        state, step.token_ids, step.log_probs, step.observation_ids, done=step.done, finish_reason=step.finish_reason
    )
    h = tree.nodes[child].action.entropy
    if tree.nodes[child].terminal:
        tree.set_reward(child, float(await greedy_env.score(tree, child)))
        return h, tree.nodes[child].reward
    leaf = await rollout_from(tree, tree.start_rollout(child), greedy_env)
    return h, tree.nodes[leaf].reward  # a stop (no action) is the policy's outcome too


async def _study_question(agent, row: dict, cfg: StudyConfig, uid: str) -> list[tuple[float, float, str]]:
    sample_env, greedy_env = agent.env(row, 1.0, uid), agent.env(row, 0.0, uid)
    tree = agent.new_tree(row, uid)
    leaf = await rollout_from(tree, tree.start_rollout(0), sample_env)
    # Every state on the sampled trajectory at which an action was taken (a stop is no action).
    states = tree.path(leaf)[: -2 if tree.nodes[leaf].is_stop else -1]
    results = []
    for state in states:
        taken = tree.nodes[tree.nodes[state].children[0]].action  # the action the trajectory took here
        first, kind = taken.entropy, str(taken.info.get("kind"))
        draws = await asyncio.gather(*[_resample(tree, state, sample_env, greedy_env) for _ in range(cfg.k)])
        hs = [first] + [h for h, _ in draws if not math.isnan(h)]
        rewards = [r for _, r in draws if not math.isnan(r)]
        if len(rewards) >= 2:
            results.append((float(np.mean(hs)), float(np.std(rewards)), kind))
    return results


def run_study(policy_dir: str | Path, data_dir: str | Path, cfg: StudyConfig) -> dict[str, Any]:
    """Runs the study on the policy in `policy_dir` over SynthHop's test split in `data_dir`."""
    import torch

    torch.manual_seed(cfg.seed)
    agent = LocalAgent(
        policy_dir,
        data_dir,
        topk=cfg.topk,
        max_actions=cfg.max_actions,
        max_action_tokens=cfg.max_action_tokens,
        response_length=cfg.response_length,
        seed=cfg.seed,
        action_space=cfg.action_space,
        page_chunk_chars=cfg.page_chunk_chars,
        snippet_words=cfg.snippet_words if cfg.action_space == "paper" else None,
    )
    rows = agent.rows("test", cfg.questions)

    async def run_all():
        return await asyncio.gather(*[_study_question(agent, row, cfg, f"crit{i}") for i, row in enumerate(rows)])

    states = [state for question in asyncio.run(run_all()) for state in question]
    entropy, spread, kinds = [h for h, _, _ in states], [c for _, c, _ in states], [k for _, _, k in states]
    out = compute_criticality_stats(entropy, spread, cfg.near_zero, cfg.high)
    out["by_kind"] = compute_kind_stats(kinds, entropy, spread, cfg.near_zero, cfg.high)
    out.update(questions=len(rows), k=cfg.k, policy=str(policy_dir), action_space=cfg.action_space)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m benchmarks.criticality [--policy DIR --data DIR]`: the study, by default on the shipped SFT start
    and the experiment's SynthHop data (made in `runs/carl_vs_grpo/shared` if missing)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.criticality", description=__doc__.split("\n")[0])
    p.add_argument("--policy", type=Path, help="a policy folder (default: the experiment's SFT start)")
    p.add_argument("--data", type=Path, help="a SynthHop folder with test.parquet (default: the experiment's data)")
    p.add_argument("--questions", type=int, default=StudyConfig.questions, help="held-out questions studied")
    p.add_argument("--k", type=int, default=StudyConfig.k, help="actions resampled per state")
    p.add_argument(
        "--action-space",
        choices=["search_r1", "paper"],
        default="search_r1",
        help="paper: SynthHop's pages variant (search, access, read, answer; --data written with make_data --pages)",
    )
    p.add_argument("--max-actions", type=int, default=None, help="T_max (default 6; 14 with --action-space paper)")
    args = p.parse_args(argv)
    if args.questions < 1 or args.k < 2:
        raise SystemExit(f"error: --questions {args.questions} must be >= 1 and --k {args.k} >= 2 (a spread).")
    if (args.policy is None) != (args.data is None):
        raise SystemExit("error: give both --policy and --data, or neither (the experiment's SFT start and data).")
    if args.action_space == "paper" and args.policy is None:
        raise SystemExit("error: --action-space paper needs --policy and --data (a pages-variant SFT start and data).")
    if args.policy is None:
        shared = prepare(REPO / "runs" / "carl_vs_grpo", PROTOCOL)
        args.policy, args.data = shared / "policy_sft", shared / "data"
    paper = args.action_space == "paper"
    sizes = {"max_actions": args.max_actions or (14 if paper else StudyConfig.max_actions)}
    if paper:
        sizes["response_length"] = 768
    cfg = StudyConfig(questions=args.questions, k=args.k, action_space=args.action_space, **sizes)
    result = run_study(args.policy, args.data, cfg)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
