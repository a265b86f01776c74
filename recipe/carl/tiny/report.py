"""What a demo run measured, with its noise: the trainer's metrics, the greedy check, `summary.json` and its table.

Every accuracy is printed with its standard error, and every change says whether it exceeds twice its noise
(`recipe.carl.tiny.noise` says how each is derived).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from recipe.carl.tiny.noise import binomial_se, change_text, paired_change, validation_size
from recipe.carl.tiny.run_folder import read_metrics

# ----------------------------------------------------------------------------------------------------- metrics


def val_accuracy_key(rows: list[dict]) -> str | None:
    """verl's validation metric of exact match on SynthHop (the reward's `em` component), mean over the samples."""
    for row in rows:
        for key in row:
            if re.fullmatch(r"val-.*synthhop.*/em/mean@\d+", key):
                return key
    return None


def weighted_share(rows: Sequence[Mapping], key: str, weight) -> float | None:
    """Mean of a per-step share over the steps that log it, each step weighted by `weight(row)` (None if none)."""
    pairs = [(row[key], weight(row)) for row in rows if key in row]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


NO_SIGNAL_KEYS = ("carl/degenerate_tree_fraction", "carl/no_signal_group_fraction")
"""The per-step share without signal: CARL's trees, or a baseline's question groups (`baseline_signal_stats`)."""


def no_signal_key(rows: Sequence[Mapping]) -> str:
    """Which of `NO_SIGNAL_KEYS` a run logged (CARL's trees unless only a baseline's groups are there)."""
    return next((key for key in NO_SIGNAL_KEYS if any(key in row for row in rows)), NO_SIGNAL_KEYS[0])


def tree_shares(rows: Sequence[Mapping]) -> dict:
    """Over the run: the share of trees (GRPO: groups of one question's chains) whose outcomes were all equal (no
    signal, every advantage 0), each step weighted by its questions, and the share of trained actions whose
    advantage was exactly 0, each step weighted by its trained actions."""
    return {
        "degenerate_tree_fraction": weighted_share(rows, no_signal_key(rows), lambda r: r["carl/questions"]),
        "zero_advantage_fraction": weighted_share(
            rows,
            "carl/zero_advantage_fraction",
            lambda r: r["carl/actions_trained_per_question"] * r["carl/questions"],
        ),
    }


# ------------------------------------------------------------------------------------------------ greedy check


def greedy_scores(policy_dir: Path, data_dir: Path, cfg) -> list[float]:
    """Greedy exact match of each held-out question, in the agent loop's own environment (`LocalAgent`).

    Args:
        policy_dir: a policy folder (`policy_sft`, `policy_rl`).
        data_dir: the run's SynthHop folder.
        cfg: the run's `DemoConfig` (documents per search, T_max, lengths).
    """
    import asyncio

    from recipe.carl.tiny.local_agent import LocalAgent  # here, not at the top: it imports torch

    agent = LocalAgent(
        policy_dir,
        data_dir,
        topk=cfg.topk,
        max_actions=cfg.max_actions,
        max_action_tokens=cfg.max_response_length,
        response_length=cfg.max_response_length,
        action_space=cfg.action_space,
        page_chunk_chars=cfg.page_chunk_chars,
        snippet_words=cfg.snippet_words if cfg.action_space == "paper" else None,
    )
    rows = agent.rows("test")

    async def run_all():  # LocalAgent.evaluate's rollouts, kept per question for the paired change
        return await asyncio.gather(*[agent.rollout(row, 0.0, f"greedy{i}") for i, row in enumerate(rows)])

    return [float(info.get("em", 0.0)) for _, _, info in asyncio.run(run_all())]


# ----------------------------------------------------------------------------------------------------- summary


def summarize(run_dir: Path, cfg, sft: dict, greedy: dict) -> dict:
    """The run's summary (the demo adds its phase times and writes it to `summary.json`), `learning_curve.png` and
    `tree.png`, from the trainer's outputs and the greedy check.

    Args:
        run_dir: the run folder.
        cfg: the run's `DemoConfig`.
        sft: what the SFT start was (`warm_start`'s info).
        greedy: `{"before": [em per question], "after": [...]}` of the greedy check.
    """
    from dataclasses import asdict

    from recipe.carl.tiny import plots  # here, not at the top: it imports matplotlib, which readers of metrics skip

    rows = read_metrics(run_dir / "metrics.jsonl")
    key = val_accuracy_key(rows)
    if key is None:
        raise SystemExit(f"error: no validation accuracy in {run_dir / 'metrics.jsonl'}; see {run_dir / 'train.log'}")
    n, k = cfg.n_test, cfg.val_samples  # k copies of each question, one episode each (launch.write_val_file)
    # Actions trained per step, for every estimator (the trainer logs the per-question budget for GRPO too).
    trained = {
        r["step"]: r["carl/actions_trained_per_question"] * r["carl/questions"] for r in rows if "carl/questions" in r
    }
    val = [(r["step"], r[key]) for r in rows if key in r]
    steps, acc = [s for s, _ in val], [a for _, a in val]
    curve = {
        "step": steps,
        "actions_trained": [sum(v for s, v in trained.items() if s <= step) for step in steps],
        "accuracy": acc,
        "se": [binomial_se(p, n * k) for p in acc],
    }
    before, after = (statistics.mean(greedy[name]) for name in ("before", "after"))
    delta, se = paired_change(greedy["before"], greedy["after"])
    summary = {
        "algo": cfg.algo,
        "config": asdict(cfg),
        "sft": sft,
        "accuracy_metric": key,
        "n_questions": n,
        "episodes_per_question": k,
        "accuracy_before": acc[0],
        "accuracy_after": acc[-1],
        "accuracy_se": [curve["se"][0], curve["se"][-1]],
        "accuracy_change": [acc[-1] - acc[0], math.hypot(curve["se"][0], curve["se"][-1])],
        "greedy_before": before,
        "greedy_after": after,
        "greedy_se": [binomial_se(before, len(greedy["before"])), binomial_se(after, len(greedy["after"]))],
        "greedy_change": [delta, se],
        **tree_shares(rows),
        "curve": curve,
        "policy_rl": str(run_dir / "policy_rl"),
    }
    summary["learning_curve"] = str(
        plots.plot_learning_curves(
            [{"label": f"{cfg.algo} (RL seed {cfg.rl_seed})", **{**curve, "actions": curve["actions_trained"]}}],
            run_dir / "learning_curve.png",
            sft_start=acc[0],
            title=f"Held-out accuracy, {k} episode(s) per question sampled at T={cfg.temperature}",
            note=plots.NOISE_NOTE.format(sizes=f"n={n} questions x k={k} episodes"),
        )
    )
    picture = plots.draw_tree(run_dir, run_dir / "tree.png")
    summary["tree_picture"] = str(picture) if picture else None
    return summary


def format_table(summary: Mapping) -> str:
    """The summary as the table printed at the end of a run."""

    def acc(p: float, se: float) -> str:
        return f"{100 * p:.1f} ± {100 * se:.1f} %"

    def share(x: float | None) -> str:
        return "- (not logged)" if x is None else f"{x:.0%}"

    n, k = validation_size(summary)
    se0, se1 = summary["accuracy_se"]
    g0, g1 = summary["greedy_se"]
    sft = summary["sft"]
    temperature = summary["config"]["temperature"]
    phases = summary.get("phases_s") or {}
    rows = [
        ("algorithm", summary["algo"]),
        (
            "SFT warm start",
            f"{sft.get('steps', 0)} steps" + (" (shipped)" if "shipped" in sft else f", {sft.get('wall_s', 0):.0f} s"),
        ),
        (
            f"held-out accuracy, sampled at T={temperature}",
            f"{acc(summary['accuracy_before'], se0)} -> {acc(summary['accuracy_after'], se1)} "
            f"({n} questions x {k} episodes)",
        ),
        ("  change", change_text(*summary["accuracy_change"], "independent samples")),
        (
            "held-out accuracy, greedy",
            f"{acc(summary['greedy_before'], g0)} -> {acc(summary['greedy_after'], g1)} ({n} questions)",
        ),
        ("  change", change_text(*summary["greedy_change"], "paired, same questions")),
        (
            "trees with no signal (all leaves equal)"
            if summary["algo"] == "carl"
            else "groups with no signal (all rewards equal)",
            share(summary.get("degenerate_tree_fraction")),
        ),
        ("trained actions with advantage 0", share(summary.get("zero_advantage_fraction"))),
        ("actions trained (total)", f"{summary['curve']['actions_trained'][-1]:.0f}"),
        ("trained policy", summary["policy_rl"]),
        (
            "wall time",
            f"{summary['wall_s'] / 60:.1f} min"
            + (f" ({', '.join(f'{name} {s:.0f} s' for name, s in phases.items())})" if phases else ""),
        ),
        ("learning curve", summary["learning_curve"]),
        ("rollout tree", summary.get("tree_picture") or "-"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
