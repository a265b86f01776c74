"""What the evaluation reports: each data set's table, plain-language diagnosis, the comparison of two models and
`results.md`."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from recipe.carl.evaluate.runner import COMPARED, finite_mean
from recipe.carl.evaluate.stats import paired_difference, paired_macro_difference

#: The comparison's bootstrap: replicates and interval level (results.md names both).
N_BOOT = 10_000
LEVEL = 0.95


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One data set's row of the table: per-question means (each question's samples averaged first)."""
    trajectories = [t for r in records for t in r["samples"]]
    n_traj = max(len(trajectories), 1)
    samples = len(records[0]["samples"]) if records else 0
    reasons = Counter(t["finish_reason"] or "none" for t in trajectories)
    searches = sum(t["searches"] for t in trajectories)
    errors = sum(t["search_errors"] for t in trajectories)
    table = {
        "questions": len(records),
        "samples": samples,
        **{k: finite_mean([r[k] for r in records]) for k in COMPARED},
        "actions_per_question": sum(t["num_actions"] for t in trajectories) / n_traj,
        "searches_per_question": searches / n_traj,
        "generated_tokens_per_question": sum(t["generated_tokens"] for t in trajectories) / n_traj,
        "finish_reasons": {k: v / n_traj for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))},
        "search_errors": errors,
        "search_error_rate": errors / searches if searches else 0.0,
    }
    if samples > 1:
        table["em_pass_at_k"] = finite_mean([max(t["em"] for t in r["samples"]) for r in records])
    if records and all("lasj" in r for r in records):  # judged (--judge-url): LasJ, the paper's second metric
        table["lasj"] = finite_mean([r["lasj"] for r in records])
        judged = [t.get("judge", {}).get("status") for t in trajectories]
        table["judge_invalid"] = judged.count("invalid")
    return table


def macro_average(tables: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean over data sets of each data set's mean (`COMPARED` metrics): every data set weighs the same, whatever
    its size, as papers report an average over test sets (the pooled mean over all questions would let the largest
    set dominate)."""
    return {
        "data_sets": len(tables),
        "questions": sum(t["questions"] for t in tables.values()),
        **{k: finite_mean([t[k] for t in tables.values()]) for k in COMPARED},
    }


def diagnose(table: dict[str, Any]) -> list[str]:
    """Plain-language hints for a table whose numbers have an obvious cause."""
    notes = []
    reasons = table["finish_reasons"]
    invalid = {k: v for k, v in reasons.items() if k.startswith("invalid")}
    if sum(invalid.values()) > 0.5:
        top = max(invalid, key=invalid.get)
        notes.append(
            f"{sum(invalid.values()):.0%} of trajectories ended on a malformed turn (most: {top}): the model does not "
            "follow the tag protocol of the prompt (<search> query </search>, <answer> answer </answer>); look at the "
            "actions in the JSON lines, or try --invalid-action feedback."
        )
    if reasons.get("action_too_long", 0) > 0.2:
        notes.append(f"{reasons['action_too_long']:.0%} of trajectories hit --max-action-tokens in one turn.")
    if reasons.get("context_overflow", 0) > 0.2:
        notes.append(f"{reasons['context_overflow']:.0%} ran out of --response-length.")
    if reasons.get("prompt_too_long", 0) > 0:
        notes.append(f"{reasons['prompt_too_long']:.0%} of prompts are longer than --prompt-length.")
    if table["search_errors"]:
        notes.append(f"{table['search_errors']} searches failed (ended as tool_error): check the retriever's log.")
    if table.get("judge_invalid"):
        notes.append(
            f"the judge gave no verdict for {table['judge_invalid']} trajectories after its retries "
            "(counted incorrect): check --judge-model and the judge's replies in the JSON lines."
        )
    if table["format"] == 0 and not notes:
        notes.append("no trajectory gave a well-formed final answer; see finish_reason and actions in the JSON lines.")
    return notes


def question_difference(
    a: Sequence[float], b: Sequence[float], seed: int = 0, n_boot: int = N_BOOT, level: float = LEVEL
) -> dict[str, float]:
    """Mean of a - b over paired questions with its percentile paired-bootstrap interval (`stats.paired_difference`
    with one seed: a bootstrap over questions). Questions where either value is NaN are dropped. Why paired and
    why a bootstrap: `recipe.carl.evaluate.cli`'s docstring.
    """
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    if not pairs:
        return {"diff": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    x, y = (np.array([p[i] for p in pairs], dtype=float)[None] for i in (0, 1))  # one seed: shape (1, n_questions)
    interval = paired_difference(x, y, n_boot=n_boot, seed=seed, level=level)
    return {"diff": interval.estimate, "low": interval.low, "high": interval.high, "n": len(pairs)}


def compare(model: dict[str, list[dict]], baseline: dict[str, list[dict]], seed: int = 0) -> dict[str, Any]:
    """Per data set and metric: both means, the difference and its paired interval (`question_difference`)."""
    out: dict[str, Any] = {}
    for source, records in model.items():
        base = {(r["file"], r["row"]): r for r in baseline.get(source, [])}
        paired = [(r, base[(r["file"], r["row"])]) for r in records if (r["file"], r["row"]) in base]
        judged = paired and all("lasj" in r and "lasj" in b for r, b in paired)
        out[source] = {
            metric: {
                "model": finite_mean([r[metric] for r, _ in paired]),
                "baseline": finite_mean([b[metric] for _, b in paired]),
                **question_difference([r[metric] for r, _ in paired], [b[metric] for _, b in paired], seed=seed),
            }
            for metric in (*COMPARED, *(("lasj",) if judged else ()))
        }
    return out


def compare_macro(model: dict[str, list[dict]], baseline: dict[str, list[dict]], seed: int = 0) -> dict[str, Any]:
    """The macro average's difference with its paired interval: questions resampled within their data set
    (`stats.paired_macro_difference`, one seed). Questions where either value is NaN are dropped."""
    out: dict[str, Any] = {}
    for metric in COMPARED:
        x, y, strata = [], [], []
        for source, records in model.items():
            base = {(r["file"], r["row"]): r for r in baseline.get(source, [])}
            for r in records:
                b = base.get((r["file"], r["row"]))
                if b is not None and not (math.isnan(r[metric]) or math.isnan(b[metric])):
                    x.append(r[metric])
                    y.append(b[metric])
                    strata.append(source)
        if not x:
            continue
        labels = np.array(strata)
        interval = paired_macro_difference(np.array([x]), np.array([y]), labels, n_boot=N_BOOT, seed=seed, level=LEVEL)
        means = [(np.mean(np.array(x)[labels == d]), np.mean(np.array(y)[labels == d])) for d in dict.fromkeys(strata)]
        out[metric] = {
            "model": float(np.mean([m for m, _ in means])),
            "baseline": float(np.mean([b for _, b in means])),
            "diff": interval.estimate,
            "low": interval.low,
            "high": interval.high,
            "n": len(x),
            "data_sets": len(means),
        }
    return out


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def markdown(results: dict[str, Any]) -> str:
    """The tables of `results.json` as markdown."""
    lines = [f"# Evaluation ({results['settings_summary']})", ""]
    for label, info in results["models"].items():
        lines += [f"## {label}", "", f"`{info['path']}` ({info['engine']} engine)", ""]
        k = results["settings"]["samples"]
        judged = any("lasj" in t for t in info["tables"].values())
        head = "| data set | questions | EM % | F1 % |" + (" LasJ % |" if judged else "")
        head += " format % | reward | actions/q | searches/q | tokens/q | search errors | finish reasons |"
        if k > 1:
            head = head.replace("| EM % |", f"| EM % (mean@{k}) | EM pass@{k} % |")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for source, t in info["tables"].items():
            reasons = ", ".join(f"{r} {100 * v:.0f}%" for r, v in t["finish_reasons"].items())
            em = f"{_pct(t['em'])} | {_pct(t['em_pass_at_k'])}" if k > 1 else _pct(t["em"])
            errors = f"{t['search_errors']} ({100 * t['search_error_rate']:.1f}%)"
            lasj = f" {_pct(t.get('lasj', float('nan')))} |" if judged else ""
            lines.append(
                f"| {source} | {t['questions']} | {em} | {_pct(t['f1'])} |{lasj} {_pct(t['format'])} | "
                f"{t['reward']:.3f} | "
                f"{t['actions_per_question']:.2f} | {t['searches_per_question']:.2f} | "
                f"{t['generated_tokens_per_question']:.0f} | {errors} | {reasons} |"
            )
        macro = info.get("macro")
        if macro and macro["data_sets"] > 1:
            em = _pct(macro["em"]) + (" | " if k > 1 else "")
            lines.append(
                f"| **macro average ({macro['data_sets']} data sets)** | {macro['questions']} | {em} | "
                f"{_pct(macro['f1'])} | {_pct(macro['format'])} | {macro['reward']:.3f} | | | | | |"
            )
        for source, notes in info["notes"].items():
            lines += [f"- {source}: {note}" for note in notes]
        lines.append("")
    if results.get("comparison"):
        a, b = list(results["models"])
        lines += [
            f"## {a} vs {b}",
            "",
            f"Difference model − baseline over the same questions, with a {100 * LEVEL:.0f} % paired bootstrap "
            f"interval ({N_BOOT:,} resamples of the questions, within each data set for the macro average; "
            "percentages for EM, F1, format and LasJ). It covers the questions drawn, not the RL seed: another "
            "training run of the same recipe differs by more (`python -m recipe.carl.evaluate.study` over seeds).",
            "",
            f"| data set | metric | {a} | {b} | difference | {100 * LEVEL:.0f} % interval |",
            "|---|---|---|---|---|---|",
        ]
        rows = list(results["comparison"].items())
        if results.get("comparison_macro"):
            rows.append((f"macro average ({len(results['comparison'])} data sets)", results["comparison_macro"]))
        for source, metrics in rows:
            for metric, c in metrics.items():
                f = (lambda x: f"{x:+.3f}") if metric == "reward" else (lambda x: f"{100 * x:+.1f}")
                g = (lambda x: f"{x:.3f}") if metric == "reward" else _pct
                lines.append(
                    f"| {source} | {metric} | {g(c['model'])} | {g(c['baseline'])} | {f(c['diff'])} | "
                    f"[{f(c['low'])}, {f(c['high'])}] |"
                )
        lines.append("")
    return "\n".join(lines)
