"""What a demo run measured, with its noise: the trainer's metrics, the greedy check, `summary.json` and its table.

Noise (the standard errors printed beside every accuracy):

* **Validation** is verl's mean@k exact match over n held-out questions with k episodes each, sampled at the rollout
  temperature. Its standard error is binomial over the n*k episodes, ``se = sqrt(p (1 - p) / (n k))``: how much the
  mean would move if the episodes were drawn again. It treats the episodes as independent; questions of unequal
  difficulty make the spread over *other* question sets larger than this.
* **Greedy** decoding is one deterministic episode per question: ``se = sqrt(p (1 - p) / n)``, the spread over other
  question sets of the same kind. Its change is paired (the same questions before and after):
  ``se = sd(after_i - before_i) / sqrt(n)``.
* A change smaller than twice its standard error is reported as "within noise".
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

NOISE_NOTE = "band: ±1 standard error, binomial over the validation's episodes, sqrt(p(1-p)/(n k)); {sizes}"


# ------------------------------------------------------------------------------------------------------- noise


def binomial_se(p: float, n: int) -> float:
    """Standard error of a mean of `n` independent 0/1 outcomes with mean `p`: sqrt(p (1 - p) / n)."""
    if n < 1 or not 0.0 <= p <= 1.0:
        raise ValueError(f"binomial_se needs n >= 1 and p in [0, 1], got p={p}, n={n}.")
    return math.sqrt(p * (1.0 - p) / n)


def paired_change(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """Mean change and its standard error for outcomes of the same questions: (mean(d), sd(d) / sqrt(n))."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_change needs two equally long non-empty lists, got {len(before)} and {len(after)}.")
    diff = [a - b for a, b in zip(after, before, strict=True)]
    sd = statistics.stdev(diff) if len(diff) > 1 else 0.0
    return statistics.mean(diff), sd / math.sqrt(len(diff))


def change_text(delta: float, se: float, how: str) -> str:
    """`+1.3 ± 3.2 points (paired; within noise)`: a change in points with its se and whether it exceeds 2 se."""
    verdict = "within noise" if abs(delta) <= 2 * se else "more than 2 s.e."
    return f"{100 * delta:+.1f} ± {100 * se:.1f} points ({how}; {verdict})"


def validation_size(summary: Mapping) -> tuple[int, int]:
    """(n questions, k episodes per question) of a run's validation, from its summary (older ones: its config)."""
    n = summary.get("n_questions") or summary["config"]["n_test"]
    k = summary.get("episodes_per_question") or episodes_per_question(summary["accuracy_metric"])
    return int(n), int(k)


def curve_se(summary: Mapping) -> list[float]:
    """The binomial standard error of each validation point of a run (see the module docstring)."""
    n, k = validation_size(summary)
    return [binomial_se(p, n * k) for p in summary["curve"]["accuracy"]]


# ----------------------------------------------------------------------------------------------------- metrics


def read_metrics(path: Path) -> list[dict]:
    """The trainer's metrics file (`VERL_FILE_LOGGER_PATH`) as `[{"step", **metrics}]`; a half-written line is
    skipped (the trainer may be writing it right now)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.append({"step": row["step"], **row["data"]})
    return rows


def val_accuracy_key(rows: list[dict]) -> str | None:
    """verl's validation metric of exact match on SynthHop (the reward's `em` component), mean over the samples."""
    for row in rows:
        for key in row:
            if re.fullmatch(r"val-.*synthhop.*/em/mean@\d+", key):
                return key
    return None


def episodes_per_question(key: str) -> int:
    """k of a `.../mean@k` metric name."""
    return int(key.rsplit("@", 1)[1])


def weighted_share(rows: Sequence[Mapping], key: str, weight) -> float | None:
    """Mean of a per-step share over the steps that log it, each step weighted by `weight(row)` (None if none)."""
    pairs = [(row[key], weight(row)) for row in rows if key in row]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def tree_shares(rows: Sequence[Mapping]) -> dict:
    """Over the run: the share of trees whose leaves all had the same reward (no signal, every advantage 0), and
    the share of trained actions whose advantage was exactly 0. CARL runs only (GRPO scores no trees)."""
    return {
        "degenerate_tree_fraction": weighted_share(rows, "carl/degenerate_tree_fraction", lambda r: r["carl/trees"]),
        "zero_advantage_fraction": weighted_share(
            rows, "carl/zero_advantage_fraction", lambda r: r["carl/actions_trained_per_tree"] * r["carl/trees"]
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

    from recipe.carl.tiny.local_agent import LocalAgent

    agent = LocalAgent(
        policy_dir,
        data_dir,
        topk=cfg.topk,
        max_actions=cfg.max_actions,
        max_action_tokens=cfg.max_response_length,
        response_length=cfg.max_response_length,
    )
    rows = agent.rows("test")

    async def run_all():  # LocalAgent.evaluate's rollouts, kept per question for the paired change
        return await asyncio.gather(*[agent.rollout(row, 0.0, f"greedy{i}") for i, row in enumerate(rows)])

    return [float(info.get("em", 0.0)) for _, _, info in asyncio.run(run_all())]


# ----------------------------------------------------------------------------------------------------- summary


def ground_truths(data_dir: Path) -> dict[str, object]:
    """`{question: ground truth}` of a SynthHop folder's training and test splits (to mark a tree's answers)."""
    import pandas as pd

    out = {}
    for split in ("train", "test"):
        path = data_dir / f"{split}.parquet"
        if path.exists():
            frame = pd.read_parquet(path, columns=["extra_info", "reward_model"])
            for extra, reward in zip(frame["extra_info"], frame["reward_model"], strict=True):
                out[extra["question"]] = reward["ground_truth"]
    return out


def draw_tree(run_dir: Path, out: Path, step: int | None = None, uid: str | None = None) -> Path | None:
    """A run's tree picture: the representative tree of the last dump (or of `step`, or the tree `uid`), with its
    question, its actions and its correct answers marked. None when the run dumped no trees (GRPO)."""
    from recipe.carl.tiny.plots import load_tree_dump, plot_rollout_tree, representative_tree

    run_dir = Path(run_dir)
    dumps = sorted((run_dir / "ckpt" / "carl_trees").glob("step_*.jsonl"))
    if step is not None:
        dumps = [d for d in dumps if d.name == f"step_{step:06d}.jsonl"]
    if not dumps:
        return None
    trees = load_tree_dump(dumps[-1])
    dump_step = int(dumps[-1].stem.split("_")[1])
    if uid is not None:
        matches = [t for t in trees if t["uid"] == uid]
        if not matches:
            raise SystemExit(f"error: no tree {uid!r} in {dumps[-1]}; its uids: {[t['uid'] for t in trees][:5]}...")
        tree, caption = matches[0], f"tree {uid}, chosen by hand"
    else:
        tree, info = representative_tree(trees)
        caption = f"{info['rule']} ({info['candidates']} of {info['trees']} trees qualified)"
    truth = ground_truths(run_dir / "data").get(tree.get("question"))
    title = f"A rollout tree of training step {dump_step} (n0={tree['n0']}, N={tree['n_forks']})"
    return plot_rollout_tree(tree, out, title=title, ground_truth=truth, caption=caption)


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

    from recipe.carl.tiny.plots import plot_learning_curves

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
        plot_learning_curves(
            [{"label": f"{cfg.algo} (RL seed {cfg.rl_seed})", **{**curve, "actions": curve["actions_trained"]}}],
            run_dir / "learning_curve.png",
            sft_start=acc[0],
            title=f"Held-out accuracy, {k} episode(s) per question sampled at T={cfg.temperature}",
            note=NOISE_NOTE.format(sizes=f"n={n} questions x k={k} episodes"),
        )
    )
    picture = draw_tree(run_dir, run_dir / "tree.png")
    summary["tree_picture"] = str(picture) if picture else None
    return summary


def format_table(summary: Mapping) -> str:
    """The summary as the table printed at the end of a run."""

    def acc(p: float, se: float) -> str:
        return f"{100 * p:.1f} ± {100 * se:.1f} %"

    def share(x: float | None) -> str:
        return "- (GRPO scores no trees)" if x is None else f"{x:.0%}"

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
        ("trees with no signal (all leaves equal)", share(summary.get("degenerate_tree_fraction"))),
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
