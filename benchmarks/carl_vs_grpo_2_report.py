"""The statistics, decisions, figure and table of the second protocol (`benchmarks.carl_vs_grpo_2`).

The same statistics as the first protocol's (`benchmarks.carl_vs_grpo_report`): 95 % percentile bootstrap intervals
that resample RL seeds, then held-out questions, two arms paired by seed and by question. What is new is where arms
are compared: at each seed's budget B (GRPO's cumulative generated actions after its steps), each arm's policy at
the first step whose cumulative generated actions reached 1/3, 2/3 and all of B; and, beside it, at equal steps.

The decision rules of docs/carl_vs_grpo_2.md (fixed before the runs), at the full budget:

- R1, the pool's efficiency: (pooled CARL's gain over the start per 1,000 generated actions) - (CARL's): met when the
  paired interval lies above 0.
- R2, R3: CARL against GRPO, and pooled CARL against GRPO: `better` when the interval lies above 0; `non-inferior`
  when its low end is >= -1 point; otherwise neither.
- R4, forks in flight: CARL at K = 2 against CARL: `same` when the interval lies inside (-2, +2) points.
- R5: pooled CARL against pooled GRPO: `better`, `worse` or `no difference detected`.
- The target (issue 32): R3 `better` and R1 met.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.carl_vs_grpo_report import (
    N_BOOT,
    complement,
    fork_profile,
    interval,
    nonzero_generated_share,
    run_budget,
)
from recipe.carl.evaluate.stats import bootstrap, mean_interval, paired_difference
from recipe.carl.io import write_json
from recipe.carl.tiny.report import read_metrics

NON_INFERIOR = 0.01
"""R2, R3: the non-inferiority margin (1 point of exact match)."""
SAME = 0.02
"""R4: forks in flight count as the same when the interval lies inside +-2 points."""
LABELS = {"grpo": "GRPO", "carl": "CARL", "carl_k2": "CARL, 2 forks in flight", "carl_pool": "CARL + fork pool",
          "grpo_pool": "GRPO + pool"}  # fmt: skip


def load(out: Path) -> dict[str, Any]:
    """Every finished and scored (arm, seed): accuracies at each budget point and equal step, budgets, signal."""
    saved = json.loads((out / "protocol.json").read_text())
    protocol = saved["protocol"]
    start = json.loads((out / "start_eval.json").read_text())
    runs: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in saved["arms"]}
    for arm in saved["arms"]:
        for seed in range(protocol["seeds"]):
            run_dir = out / "runs" / arm / f"seed{seed}"
            if not (run_dir / "points.json").exists():
                continue
            points = json.loads((run_dir / "points.json").read_text())
            scores = {s: json.loads((run_dir / "eval" / f"step_{s:03d}.json").read_text()) for s in points["scored"]}
            if any(v["questions"] != start["questions"] for v in scores.values()):
                raise ValueError(f"{run_dir}: a policy was scored on other questions than the start.")
            # Signal is counted over the steps that trained the policy compared at B (a run goes on past B).
            full = _step({"points": points}, "1.000")
            metrics = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("step", 0) <= full]
            runs[arm][seed] = {
                "points": points,
                "sampled": {s: np.array(v["sampled"]) for s, v in scores.items()},
                "greedy": {s: np.array(v["greedy"]) for s, v in scores.items()},
                "done": json.loads((run_dir / "done.json").read_text()),
                "forks": fork_profile(run_dir / "ckpt" / "carl_trees", upto=full),
                "metrics": metrics,
                **run_budget(metrics, list(range(1, full + 1))),
            }
    return {"protocol": protocol, "arms": list(saved["arms"]), "start": start, "runs": runs}


def at(run: dict[str, Any], where: str, key: str = "sampled") -> np.ndarray:
    """Per-question scores of a run at a budget point ("0.333", "0.667", "1.000") or an equal step ("step30")."""
    return run[key][_step(run, where)]


def generated_at(run: dict[str, Any], where: str) -> float:
    return run["points"]["cumulative"][_step(run, where) - 1]


def _step(run: dict[str, Any], where: str) -> int:
    """The step scored at a budget point or equal step (a run short of a budget point: its last step)."""
    step = int(where[4:]) if where.startswith("step") else run["points"]["points"][where]
    return step or len(run["points"]["cumulative"])


def stack(data: dict[str, Any], arm: str, seeds: list[int], where: str, key: str = "sampled") -> np.ndarray:
    """[shape: (seeds, questions)]."""
    return np.stack([at(data["runs"][arm][s], where, key) for s in seeds])


def points_of(protocol: dict[str, Any]) -> list[str]:
    return [f"{f:.3f}" for f in protocol["fractions"]] + [f"step{s}" for s in protocol["equal_steps"]]


def per_arm(data: dict[str, Any], arm: str) -> dict[str, Any]:
    runs, seeds = data["runs"][arm], sorted(data["runs"][arm])
    out: dict[str, Any] = {"seeds": seeds, "points": {}}
    for where in points_of(data["protocol"]):
        out["points"][where] = {
            "sampled": interval(mean_interval(stack(data, arm, seeds, where), n_boot=N_BOOT)),
            "greedy": interval(mean_interval(stack(data, arm, seeds, where, "greedy"), n_boot=N_BOOT)),
            "generated_actions": float(np.mean([generated_at(runs[s], where) for s in seeds])),
            "step": float(np.mean([runs[s]["points"]["points"].get(where) or 0 for s in seeds]))
            if not where.startswith("step")
            else float(where[4:]),
        }
    out["short_seeds"] = [s for s in seeds if runs[s]["points"]["short"]]
    out["steps_by_seed"] = {str(s): {w: _step(runs[s], w) for w in points_of(data["protocol"])} for s in seeds}
    out["signal"] = signal(runs, seeds)
    return out


def signal(runs: dict[int, dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Item 6, over each run's steps up to GRPO's budget B: trees (GRPO: groups) without signal, trained and generated
    actions with A != 0, actions per question, the pool's forks per tree, time per step. Each a per-seed value, then
    the mean over seeds with its 95 % bootstrap interval (as the first protocol's `per_arm`)."""

    def over_seeds(values: list[float]) -> dict[str, float]:
        if not values or any(math.isnan(v) for v in values):
            return {"estimate": math.nan, "low": math.nan, "high": math.nan}
        return interval(mean_interval(np.array(values, dtype=float)[:, None], n_boot=N_BOOT))

    def per_step(key: str, weight: str | None = None) -> dict[str, float]:
        values = []
        for s in seeds:
            v = np.array(runs[s]["per_step"][key], dtype=float)
            w = np.ones_like(v) if weight is None else np.array(runs[s]["per_step"][weight], dtype=float)
            ok = ~np.isnan(v)
            values.append(float((v[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else math.nan)
        return over_seeds(values)

    def metric(name: str) -> dict[str, float]:
        per_seed = [[r[name] for r in runs[s]["metrics"] if name in r] for s in seeds]
        return over_seeds([float(np.mean(v)) if v else math.nan for v in per_seed])

    def per_question(key: str) -> dict[str, float]:
        return over_seeds([sum(runs[s]["per_step"][key]) / sum(runs[s]["per_step"]["questions"]) for s in seeds])

    forks = [runs[s]["forks"] for s in seeds]
    return {
        "no_signal_share": per_step("no_signal_trees", "questions"),  # one tree (GRPO: group) per question
        "trained_nonzero_share": complement(per_step("zero_advantage", "actions_trained")),
        "generated_nonzero_share": nonzero_generated_share(runs, seeds),
        "generated_per_question": per_question("actions_generated"),
        "trained_per_question": per_question("actions_trained"),
        "pool_per_tree": {k: metric(f"carl/pool_per_tree_{k}") for k in ("min", "median", "max")},
        "pool_at_floor_fraction": metric("carl/pool_at_floor_fraction"),
        "forks": {k: float(np.mean([f[k] for f in forks])) for k in forks[0]} if all(forks) else None,
        "wall_s_per_step": per_step("wall_s"),
    }  # fmt: skip


def compare(data: dict[str, Any], a: str, b: str, where: str = "1.000") -> dict[str, Any] | None:
    """a - b at a budget point, paired by seed and question (sampled and greedy)."""
    seeds = sorted(set(data["runs"].get(a, {})) & set(data["runs"].get(b, {})))
    if not seeds:
        return None
    out: dict[str, Any] = {"seeds": seeds}
    for key in ("sampled", "greedy"):
        out[key] = interval(paired_difference(stack(data, a, seeds, where, key), stack(data, b, seeds, where, key),
                                              n_boot=N_BOOT))  # fmt: skip
    return out


def per_1k(data: dict[str, Any], a: str, b: str, where: str = "1.000") -> dict[str, Any] | None:
    """(a's gain over the start per 1,000 generated actions) - (b's), in points, paired by seed and question."""
    seeds = sorted(set(data["runs"].get(a, {})) & set(data["runs"].get(b, {})))
    if not seeds:
        return None
    start = np.array(data["start"]["sampled"])
    arrays = []
    for arm in (a, b):
        acc = 100 * (stack(data, arm, seeds, where) - start[None, :])
        cost = np.array([generated_at(data["runs"][arm][s], where) / 1000 for s in seeds])
        arrays += [acc, np.repeat(cost[:, None], acc.shape[1], axis=1)]
    diff = bootstrap(lambda ga, ca, gb, cb: ga.mean() / ca.mean() - gb.mean() / cb.mean(), *arrays, n_boot=N_BOOT)
    return {"seeds": seeds, **interval(diff)}


def rules(data: dict[str, Any]) -> dict[str, Any]:
    """R1-R5 and the target, each with its numbers and verdict (see the module docstring)."""

    def better_or_non_inferior(d: dict[str, Any] | None) -> str | None:
        if d is None:
            return None
        low = d["sampled"]["low"]
        return "better" if low > 0 else "non-inferior" if low >= -NON_INFERIOR else "neither"

    out: dict[str, Any] = {}
    r1 = per_1k(data, "carl_pool", "carl")
    out["R1"] = r1 and {**r1, "met": r1["low"] > 0, "rule": "pooled CARL's gain per 1k generated - CARL's: low > 0"}
    for name, (a, b) in {"R2": ("carl", "grpo"), "R3": ("carl_pool", "grpo")}.items():
        d = compare(data, a, b)
        out[name] = d and {**d, "verdict": better_or_non_inferior(d), "rule": f"{a} - {b} at GRPO's budget"}
    r4 = compare(data, "carl_k2", "carl")
    if r4:
        s = r4["sampled"]
        out["R4"] = {**r4, "verdict": "same" if -SAME < s["low"] and s["high"] < SAME else "not shown the same"}
    r5 = compare(data, "carl_pool", "grpo_pool")
    if r5:
        s = r5["sampled"]
        out["R5"] = {**r5, "verdict": "better" if s["low"] > 0 else "worse" if s["high"] < 0 else
                     "no difference detected"}  # fmt: skip
    if out.get("R1") and out.get("R3"):
        out["target"] = {"met": bool(out["R1"]["met"] and out["R3"]["verdict"] == "better"),
                         "rule": "R3 better and R1 met"}  # fmt: skip
    return out


def plot(arms: dict[str, Any], start: float, path: Path) -> Path:
    """Held-out accuracy against cumulative generated actions, one line per arm with its 95 % band."""
    import matplotlib  # here, not at the top: only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, r in arms.items():
        if not r:
            continue
        pts = [r["points"][w] for w in r["points"] if not w.startswith("step")]
        x = [0.0] + [p["generated_actions"] for p in pts]
        y = [100 * start] + [100 * p["sampled"]["estimate"] for p in pts]
        lo = [100 * start] + [100 * p["sampled"]["low"] for p in pts]
        hi = [100 * start] + [100 * p["sampled"]["high"] for p in pts]
        (line,) = ax.plot(x, y, marker="o", label=LABELS.get(arm, arm))
        ax.fill_between(x, lo, hi, alpha=0.15, color=line.get_color())
    ax.set_xlabel("actions generated (cumulative, per run)")
    ax.set_ylabel("held-out exact match, sampled (%)")
    ax.set_title("Second protocol: at 1/3, 2/3 and all of GRPO's generated actions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(result: dict[str, Any], last: str = "step30") -> str:
    head = ("arm", "seeds", "EM at GRPO's budget %", f"EM at step {last[4:]} %", "generated / trained per question",
            "no signal %", "trained with A != 0 %", "generated with A != 0 %", "s / step")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, r in result["arms"].items():
        if not r:
            continue
        full, step30, sig = r["points"]["1.000"]["sampled"], r["points"].get(last, {}).get("sampled"), r["signal"]
        cells = (LABELS.get(arm, arm), str(len(r["seeds"])), _pct(full), _pct(step30),
                 f"{sig['generated_per_question']['estimate']:.1f} / {sig['trained_per_question']['estimate']:.1f}",
                 _pct(sig["no_signal_share"]), _pct(sig["trained_nonzero_share"]),
                 _pct(sig["generated_nonzero_share"]), f"{sig['wall_s_per_step']['estimate']:.1f}")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(i: dict[str, float] | None) -> str:
    if not i or math.isnan(i["estimate"]):
        return "—"
    return f"{100 * i['estimate']:.1f} [{100 * i['low']:.1f}, {100 * i['high']:.1f}]"


def build_report(out: Path) -> dict[str, Any]:
    """Writes `results.json` and `accuracy_vs_generated.png` into `out`; prints the table and the rules."""
    data = load(out)
    arms = {arm: per_arm(data, arm) if data["runs"][arm] else None for arm in data["arms"]}
    start = np.array(data["start"]["sampled"])
    last = f"step{max(data['protocol']['equal_steps'])}"  # GRPO's last step (30; the smoke's 2)
    result = {
        "protocol": data["protocol"],
        "held_out_questions": len(start),
        "start": {"sampled": interval(mean_interval(start[None, :], n_boot=N_BOOT))},
        "arms": arms,
        "vs_grpo": {a: compare(data, a, "grpo") for a in data["arms"] if a != "grpo" and arms[a] and arms.get("grpo")},
        "vs_grpo_equal_steps": {
            a: compare(data, a, "grpo", last) for a in data["arms"] if a != "grpo" and arms[a] and arms.get("grpo")
        },  # fmt: skip
        "rules": rules(data),
        "commits": sorted({r["done"]["commit"] or "?" for runs in data["runs"].values() for r in runs.values()}),
    }
    result["table"] = table(result, last)
    result["figure"] = str(plot(arms, float(start.mean()), out / "accuracy_vs_generated.png").name)
    write_json(out / "results.json", json.loads(json.dumps(result, default=float)))
    print(result["table"])
    print(json.dumps(result["rules"], indent=1, default=float))
    return result
