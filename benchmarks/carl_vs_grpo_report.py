"""The statistics, decisions, figure and table of the CARL-against-GRPO experiment (`benchmarks.carl_vs_grpo`).

Every interval is a 95 % percentile bootstrap that resamples RL seeds, then held-out questions
(`recipe.carl.evaluate.stats`, the code `python -m recipe.carl.evaluate --baseline` uses). Two arms are compared on the
seeds both finished, paired by seed (the same question order) and by held-out question. Accuracy is held-out exact
match, sampled (the mean over `eval_samples` episodes at the rollout temperature: the policy RL trains) unless a key
says `greedy`. Budgets come from the trainer's per-step metrics (`carl/*`, `timing_s/step`): actions and tokens
generated (every sample) and trained (each trained action once), summed over the steps before an evaluation.

The decision rules are those of docs/carl_vs_grpo.md, fixed before the runs:

- C1: CARL's final accuracy >= GRPO's - 2 points: the paired interval's low end is >= -2 points.
- C2: CARL reaches GRPO's final accuracy having trained <= 60 % of GRPO's actions: the trained actions at which CARL's
  mean curve (linear between evaluations) first reaches GRPO's final mean, over GRPO's trained actions; holds when
  the interval's high end is <= 0.60, fails when its low end is > 0.60. Not measurable when GRPO's own gain over the
  start has an interval that reaches 0 (every arm "reaches" it at step 0).
- C3: CARL-Lite generates <= 0.65x GRPO's actions (interval high end) at an accuracy within C1's margin of GRPO's.
- Any paired difference: `better` (low > 0), `worse` (high < 0), else `no difference detected`; `within +-2 points`
  when the whole interval lies inside (-2, 2) points.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from recipe.carl.evaluate.stats import Interval, bootstrap, mean_interval, paired_difference, resample_indices
from recipe.carl.io import atomic_path, write_json
from recipe.carl.tiny.report import no_signal_key, read_metrics

MARGIN = 0.02
"""C1's non-inferiority margin (2 points of exact match)."""
REACH_MAX = 0.60
"""C2: the largest share of GRPO's trained actions at which CARL must reach GRPO's final accuracy."""
LITE_MAX = 0.65
"""C3: the largest ratio of CARL-Lite's generated actions to GRPO's."""
N_BOOT = 10_000


# ----------------------------------------------------------------------------------------------------- loading
def run_budget(metrics: list[dict[str, Any]], steps: list[int]) -> dict[str, Any]:
    """Per-step budget of one run, and its totals up to each evaluated step."""
    rows = {int(r["step"]): r for r in metrics if "carl/actions_generated_per_question" in r}
    silent = no_signal_key(list(rows.values()))
    missing = [s for s in range(1, max(steps) + 1) if s not in rows]
    if missing:
        raise ValueError(f"the run's metrics have no carl/* budget for steps {missing[:5]}: did it finish?")
    per_step = {
        "actions_generated": [rows[s]["carl/actions_generated_per_question"] * rows[s]["carl/questions"]
                              for s in sorted(rows)],
        "actions_trained": [rows[s]["carl/actions_trained_per_question"] * rows[s]["carl/questions"]
                            for s in sorted(rows)],
        "tokens_generated": [rows[s]["carl/tokens_generated"] for s in sorted(rows)],
        "tokens_trained": [rows[s]["carl/tokens_trained"] for s in sorted(rows)],
        "wall_s": [rows[s].get("timing_s/step", math.nan) for s in sorted(rows)],
        "no_signal_trees": [rows[s].get(silent, math.nan) for s in sorted(rows)],  # GRPO: its groups
        "questions": [rows[s]["carl/questions"] for s in sorted(rows)],
        "zero_advantage": [rows[s].get("carl/zero_advantage_fraction", math.nan) for s in sorted(rows)],
        "merged_samples_per_tree": [rows[s].get("carl/merged_samples_per_tree", 0.0) for s in sorted(rows)],
        "reward": [rows[s].get("critic/score/mean", math.nan) for s in sorted(rows)],
        "entropy_at_forks": [rows[s].get("carl/entropy_at_forks", math.nan) for s in sorted(rows)],
        "entropy_elsewhere": [rows[s].get("carl/entropy_elsewhere", math.nan) for s in sorted(rows)],
    }  # fmt: skip
    cumulative = {k: [float(sum(per_step[k][:s])) for s in steps] for k in
                  ("actions_generated", "actions_trained", "tokens_generated", "tokens_trained", "wall_s")}  # fmt: skip
    return {"per_step": per_step, "cumulative": cumulative}


def fork_profile(dump_dir: Path, upto: int | None = None) -> dict[str, float] | None:
    """Where a run's forks went, from its tree dumps (`ckpt/carl_trees/*.jsonl`, one record per tree): forks per tree,
    their mean depth, the share at the root, and the share at states whose children's final values differ (forks
    that could produce an advantage there); and the share of generated actions (samples: a merged node counts as
    often as it was sampled) trained with A != 0. Steps 1 to `upto` (all without it); None without dumps (GRPO)."""
    forks = depth = at_root = at_spread = trees = samples = samples_with_signal = 0
    for path in sorted(dump_dir.glob("step_*.jsonl")):
        if upto is not None and int(path.stem.removeprefix("step_")) > upto:
            continue
        for line in path.read_text().splitlines():
            nodes = json.loads(line)["nodes"]
            trees += 1
            values: dict[int, set[float]] = {}
            for n in nodes:
                if n["parent"] is None:
                    continue
                samples += n.get("count", 1)  # every sample of an action: a merged node stands for `count` of them
                samples_with_signal += n.get("count", 1) * bool(n.get("trained") and n.get("advantage"))
                if n["value"] is not None:
                    values.setdefault(n["parent"], set()).add(round(n["value"], 9))
            for n in nodes:
                forks += n["forked"]
                depth += n["forked"] * n["depth"]
                at_root += n["forked"] * (n["parent"] is None)
                at_spread += n["forked"] * (len(values.get(n["id"], ())) > 1)
    if not trees or not forks:
        return None
    return {"trees": trees, "forks_per_tree": forks / trees, "fork_depth_mean": depth / forks,
            "fork_share_at_root": at_root / forks, "fork_share_where_children_differ": at_spread / forks,
            "generated_share_with_signal": samples_with_signal / samples if samples else math.nan}  # fmt: skip


def load(out: Path) -> dict[str, Any]:
    """Every finished run of the experiment in `out`: per-question accuracies at each evaluated step, and budgets."""
    saved = json.loads((out / "protocol.json").read_text())
    protocol, arms = saved["protocol"], list(saved["arms"])
    steps = [0, *range(protocol["eval_every"], protocol["demo"]["steps"] + 1, protocol["eval_every"])]
    start = json.loads((out / "start_eval.json").read_text())
    runs: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in arms}
    for arm in arms:
        for seed in range(protocol["seeds"]):
            run_dir = out / "runs" / arm / f"seed{seed}"
            evals = [run_dir / "eval" / f"step_{s:03d}.json" for s in steps[1:]]
            if not (run_dir / "done.json").exists() or not all(p.exists() for p in evals):
                continue
            scores = [start] + [json.loads(p.read_text()) for p in evals]
            if any(s["questions"] != start["questions"] for s in scores):
                raise ValueError(f"{run_dir}: its held-out questions differ from the start's; the set must be one.")
            runs[arm][seed] = {
                "sampled": np.array([s["sampled"] for s in scores]).T,  # (questions, points)
                "greedy": np.array([s["greedy"] for s in scores]).T,
                "done": json.loads((run_dir / "done.json").read_text()),
                "forks": fork_profile(run_dir / "ckpt" / "carl_trees"),
                **run_budget(read_metrics(run_dir / "metrics.jsonl"), steps[1:]),
            }
    return {"protocol": protocol, "arms": arms, "steps": steps, "start": start, "runs": runs}


# -------------------------------------------------------------------------------------------------- statistics
def interval(i: Interval) -> dict[str, float]:
    return {"estimate": i.estimate, "low": i.low, "high": i.high}


def verdict(diff: Interval, margin: float = MARGIN) -> str:
    """The protocol's words for a paired difference (see the module docstring)."""
    word = "better" if diff.low > 0 else "worse" if diff.high < 0 else "no difference detected"
    return word + (f" (within +-{margin * 100:g} points)" if -margin < diff.low and diff.high < margin else "")


def stack(runs: dict[int, dict[str, Any]], seeds: list[int], key: str) -> np.ndarray:
    """[shape: (seeds, questions, points)] of one arm's per-question accuracies."""
    return np.stack([runs[s][key] for s in seeds])


def budget(runs: dict[int, dict[str, Any]], seeds: list[int], name: str, questions: int) -> np.ndarray:
    """Cumulative budget at each evaluated point, repeated over questions so a seed draw carries it along.
    [shape: (seeds, questions, points)]"""
    per_seed = np.array([[0.0, *runs[s]["cumulative"][name]] for s in seeds])
    return np.repeat(per_seed[:, None, :], questions, axis=1)


def reach_ratio(acc_c: np.ndarray, trained_c: np.ndarray, acc_g: np.ndarray, trained_g: np.ndarray) -> float:
    """C2's statistic: CARL's trained actions where its mean curve first reaches GRPO's final mean accuracy, over
    GRPO's total trained actions (inf when CARL never reaches it). Arrays: (seeds, questions, points)."""
    curve = acc_c.mean(axis=(0, 1))
    x = trained_c[:, 0, :].mean(axis=0)
    target, total = acc_g[:, :, -1].mean(), trained_g[:, 0, -1].mean()
    for p in range(len(curve)):
        if curve[p] >= target - 1e-12:
            if p == 0:
                return 0.0
            frac = (target - curve[p - 1]) / (curve[p] - curve[p - 1])
            return float((x[p - 1] + frac * (x[p] - x[p - 1])) / total)
    return math.inf


def ratio_interval(statistic, *arrays: np.ndarray, n_boot: int = N_BOOT) -> dict[str, float]:
    """`bootstrap` for statistics that may be infinite (np.quantile cannot interpolate through inf)."""
    n_seeds, n_questions = arrays[0].shape[:2]
    seed_idx, question_idx = resample_indices(n_seeds, n_questions, n_boot)
    reps = np.array([statistic(*(a[s][:, q] for a in arrays)) for s, q in zip(seed_idx, question_idx, strict=True)])
    low, high = np.quantile(reps, [0.025, 0.975], method="inverted_cdf")
    return {"estimate": statistic(*arrays), "low": float(low), "high": float(high)}


def per_arm(data: dict[str, Any], arm: str) -> dict[str, Any]:
    """Accuracies (final and along the curve), gain over the start, budgets and tree shares of one arm."""
    runs, seeds = data["runs"][arm], sorted(data["runs"][arm])
    sampled, greedy = stack(runs, seeds, "sampled"), stack(runs, seeds, "greedy")
    q = sampled.shape[1]
    start = np.array(data["start"]["sampled"])
    curve = []
    for p, step in enumerate(data["steps"]):
        point = {"step": step, "sampled": interval(mean_interval(sampled[:, :, p], n_boot=N_BOOT)),
                 "greedy": interval(mean_interval(greedy[:, :, p], n_boot=N_BOOT))}  # fmt: skip
        for name in ("actions_generated", "actions_trained", "tokens_generated", "tokens_trained", "wall_s"):
            point[name] = float(budget(runs, seeds, name, 1)[:, 0, p].mean())
        curve.append(point)

    def per_run(key: str, weight: str | None = None) -> dict[str, float]:
        """Mean over steps (weighted by `weight` per step) of one run, then the mean and interval over seeds."""
        values = []
        for s in seeds:
            v = np.array(runs[s]["per_step"][key], dtype=float)
            w = np.ones_like(v) if weight is None else np.array(runs[s]["per_step"][weight], dtype=float)
            ok = ~np.isnan(v)
            values.append(float((v[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else math.nan)
        if any(math.isnan(v) for v in values):
            return {"estimate": math.nan, "low": math.nan, "high": math.nan}
        return interval(mean_interval(np.array(values)[:, None], n_boot=N_BOOT))

    return {
        "seeds": seeds,
        "final_sampled": interval(mean_interval(sampled[:, :, -1], n_boot=N_BOOT)),
        "final_greedy": interval(mean_interval(greedy[:, :, -1], n_boot=N_BOOT)),
        "gain_sampled": interval(paired_difference(sampled[:, :, -1], np.broadcast_to(start, (len(seeds), q)),
                                                   n_boot=N_BOOT)),  # fmt: skip
        "curve": curve,
        "per_seed_final_sampled": [float(sampled[i, :, -1].mean()) for i in range(len(seeds))],
        "per_seed_final_greedy": [float(greedy[i, :, -1].mean()) for i in range(len(seeds))],
        "actions_generated": curve[-1]["actions_generated"],
        "actions_trained": curve[-1]["actions_trained"],
        "tokens_generated": curve[-1]["tokens_generated"],
        "tokens_trained": curve[-1]["tokens_trained"],
        "wall_s_per_step": per_run("wall_s"),
        "run_wall_s": float(np.mean([runs[s]["done"]["wall_s"] for s in seeds])),
        "no_signal_tree_share": per_run("no_signal_trees", "questions"),  # one tree (GRPO: group) per question
        "nonzero_advantage_share": complement(per_run("zero_advantage", "actions_trained")),
        "nonzero_generated_share": nonzero_generated_share(runs, seeds),
        "merged_samples_per_tree": per_run("merged_samples_per_tree"),
        "entropy_at_forks": per_run("entropy_at_forks"),  # state entropy h_hat, mean over steps (CARL arms)
        "entropy_elsewhere": per_run("entropy_elsewhere"),
        "fork_profile": {k: float(np.mean([runs[s]["forks"][k] for s in seeds])) for k in runs[seeds[0]]["forks"]}
        if runs[seeds[0]]["forks"] else None,
        "load_average": [runs[s]["done"]["load_before"][0] for s in seeds],
    }  # fmt: skip


def nonzero_generated_share(runs: dict[int, dict[str, Any]], seeds: list[int]) -> dict[str, float]:
    """Generated actions that ended with A != 0 (trained with a nonzero advantage) over all generated actions, per
    run summed over its steps, then the mean and interval over seeds; NaN where a run did not log A = 0 shares.

    From the tree dumps where every seed has them (a merged action counts once per sample); otherwise from the
    step metrics (GRPO: every chain is its own node), which count a merged action once."""
    dumped = [runs[s]["forks"] and runs[s]["forks"].get("generated_share_with_signal") for s in seeds]
    if all(v is not None and not math.isnan(v) for v in dumped):
        return interval(mean_interval(np.array(dumped, dtype=float)[:, None], n_boot=N_BOOT))
    values = []
    for s in seeds:
        step = runs[s]["per_step"]
        zero, trained, generated = (np.array(step[k], dtype=float) for k in ("zero_advantage", "actions_trained",
                                                                             "actions_generated"))  # fmt: skip
        nonzero = np.where(trained > 0, (1 - zero) * trained, 0.0)  # a step that trained nothing logs no share
        values.append(float(nonzero.sum() / generated.sum()))
    if any(math.isnan(v) for v in values):
        return {"estimate": math.nan, "low": math.nan, "high": math.nan}
    return interval(mean_interval(np.array(values)[:, None], n_boot=N_BOOT))


def complement(i: dict[str, float]) -> dict[str, float]:
    """1 - x of an interval (its bounds swap)."""
    return {"estimate": 1 - i["estimate"], "low": 1 - i["high"], "high": 1 - i["low"]}


def compare(data: dict[str, Any], a: str, b: str) -> dict[str, Any] | None:
    """a - b on the seeds both arms finished: final accuracy (sampled, greedy), paired by seed and question."""
    seeds = sorted(set(data["runs"][a]) & set(data["runs"][b]))
    if not seeds:
        return None
    out: dict[str, Any] = {"seeds": seeds}
    for key in ("sampled", "greedy"):
        x, y = stack(data["runs"][a], seeds, key), stack(data["runs"][b], seeds, key)
        diff = paired_difference(x[:, :, -1], y[:, :, -1], n_boot=N_BOOT)
        out[key] = {**interval(diff), "verdict": verdict(diff)}
    return out


def per_action(data: dict[str, Any], a: str, b: str, budget_name: str) -> dict[str, Any] | None:
    """(a's gain over the start, in points, per 1,000 `budget_name` actions) - (b's), paired by seed and question."""
    seeds = sorted(set(data["runs"][a]) & set(data["runs"][b]))
    if not seeds:
        return None
    start = np.array(data["start"]["sampled"])
    arrays = []
    for arm in (a, b):
        acc = 100 * (stack(data["runs"][arm], seeds, "sampled")[:, :, -1] - start[None, :])
        arrays += [acc, budget(data["runs"][arm], seeds, budget_name, acc.shape[1])[:, :, -1] / 1000]

    def statistic(gain_a, cost_a, gain_b, cost_b):
        return gain_a.mean() / cost_a.mean() - gain_b.mean() / cost_b.mean()

    diff = bootstrap(statistic, *arrays, n_boot=N_BOOT)
    return {"seeds": seeds, **interval(diff), "verdict": verdict(diff, margin=0.0)}


def claims(data: dict[str, Any], arms: dict[str, Any]) -> dict[str, Any]:
    """C1, C2, C3 and the fork-rule target, each with its numbers and its verdict (see the module docstring)."""
    out: dict[str, Any] = {}
    c1 = compare(data, "carl", "grpo") if arms.get("carl") and arms.get("grpo") else None
    if c1:
        low = c1["sampled"]["low"]
        out["C1"] = {**c1["sampled"], "holds": low >= -MARGIN, "rule": "CARL - GRPO, final sampled EM: low >= -2 pts"}
    if arms.get("carl") and arms.get("grpo"):
        seeds = sorted(set(data["runs"]["carl"]) & set(data["runs"]["grpo"]))
        rc, rg = data["runs"]["carl"], data["runs"]["grpo"]
        acc_c, acc_g = stack(rc, seeds, "sampled"), stack(rg, seeds, "sampled")
        q = acc_c.shape[1]
        ratio = ratio_interval(reach_ratio, acc_c, budget(rc, seeds, "actions_trained", q), acc_g,
                               budget(rg, seeds, "actions_trained", q))  # fmt: skip
        gain = arms["grpo"]["gain_sampled"]
        measurable = gain["low"] > 0
        state = "holds" if ratio["high"] <= REACH_MAX else "fails" if ratio["low"] > REACH_MAX else "undecided"
        out["C2"] = {
            **ratio,
            "grpo_gain": gain,
            "measurable": measurable,
            "verdict": state if measurable else "not measurable: GRPO's gain over the start reaches 0",
            "rule": "CARL's trained actions to reach GRPO's final / GRPO's trained actions: high <= 0.60",
        }
    if arms.get("carl_lite") and arms.get("grpo"):
        seeds = sorted(set(data["runs"]["carl_lite"]) & set(data["runs"]["grpo"]))
        gen = [budget(data["runs"][arm], seeds, "actions_generated", 1)[:, :, -1] for arm in ("carl_lite", "grpo")]
        ratio = bootstrap(lambda x, y: x.mean() / y.mean(), *gen, n_boot=N_BOOT)
        acc = compare(data, "carl_lite", "grpo")
        holds = ratio.high <= LITE_MAX and acc is not None and acc["sampled"]["low"] >= -MARGIN
        out["C3"] = {
            "generated_ratio": interval(ratio),
            "accuracy_difference": acc and acc["sampled"],
            "holds": bool(holds),
            "rule": "CARL-Lite / GRPO generated actions: high <= 0.65, and C1's margin",
        }
    if arms.get("carl_spread") and arms.get("carl"):
        out["spread_vs_density"] = {
            "per_1k_generated_actions": per_action(data, "carl_spread", "carl", "actions_generated"),
            "per_1k_trained_actions": per_action(data, "carl_spread", "carl", "actions_trained"),
            "final": compare(data, "carl_spread", "carl"),
            "rule": "more held-out accuracy gain per generated action than density: paired interval above 0",
        }
    if arms.get("carl_nomerge") and arms.get("carl"):
        out["merge_vs_nomerge"] = {
            "final": compare(data, "carl", "carl_nomerge"),
            "per_1k_trained_actions": per_action(data, "carl", "carl_nomerge", "actions_trained"),
        }
    return out


# --------------------------------------------------------------------------------------------- figure, table
LABELS = {"grpo": "GRPO", "carl": "CARL", "carl_lite": "CARL-Lite", "carl_random": "CARL, random forks",
          "carl_spread": "CARL, spread forks", "carl_nomerge": "CARL, no merging"}  # fmt: skip


def plot(arms: dict[str, Any], start: float, path: Path) -> Path:
    """Held-out accuracy against generated and against trained actions, one line per arm with its 95 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, x_key in zip(axes, ("actions_generated", "actions_trained"), strict=True):
        label = f"{x_key.replace('_', ' ')} (thousands, cumulative)"
        for arm, result in arms.items():
            if not result:
                continue
            x = [p[x_key] / 1000 for p in result["curve"]]
            y = [100 * p["sampled"]["estimate"] for p in result["curve"]]
            lo = [100 * p["sampled"]["low"] for p in result["curve"]]
            hi = [100 * p["sampled"]["high"] for p in result["curve"]]
            (line,) = ax.plot(x, y, marker="o", ms=3, label=f"{LABELS.get(arm, arm)} (n={len(result['seeds'])})")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        ax.axhline(100 * start, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out exact match, sampled (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("SynthHop, tiny policy, 30 steps: mean over seeds, 95 % bootstrap band (seeds, then questions)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def pct(i: dict[str, float] | None, signed: bool = False) -> str:
    if not i or math.isnan(i["estimate"]):
        return "—"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"{fmt.format(100 * i['estimate'])} [{fmt.format(100 * i['low'])}, {fmt.format(100 * i['high'])}]"


def table(result: dict[str, Any]) -> str:
    """The markdown table of docs/measurements.md."""
    arms, pairs = result["arms"], result["vs_grpo"]
    lines = [
        "| arm | seeds | final EM, sampled % | - GRPO (paired) | final EM, greedy % | actions generated / trained "
        "per question | no-signal trees (GRPO: groups) % | trained actions with A != 0 % | generated actions with "
        "A != 0 % | s / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in arms.items():
        if not r:
            continue
        questions = result["questions_per_run"]
        diff = pairs.get(arm) and pairs[arm]["sampled"]
        lines.append(
            f"| {LABELS.get(arm, arm)} | {len(r['seeds'])} | {pct(r['final_sampled'])} | "
            f"{pct(diff, True) if diff else '—'} | {pct(r['final_greedy'])} | "
            f"{r['actions_generated'] / questions:.1f} / {r['actions_trained'] / questions:.1f} | "
            f"{pct(r['no_signal_tree_share'])} | {pct(r['nonzero_advantage_share'])} | "
            f"{pct(r['nonzero_generated_share'])} | "
            f"{r['wall_s_per_step']['estimate']:.1f} |"
        )
    return "\n".join(lines)


def build_report(out: Path) -> dict[str, Any]:
    """Writes `results.json` and `accuracy_vs_actions.png` into `out` from the finished runs; prints the table."""
    data = load(out)
    arms = {arm: per_arm(data, arm) if data["runs"][arm] else None for arm in data["arms"]}
    start = np.array(data["start"]["sampled"])
    protocol = data["protocol"]
    result = {
        "protocol": protocol,
        "held_out_questions": len(start),
        "questions_per_run": protocol["demo"]["steps"] * protocol["demo"]["batch_prompts"],
        "start": {"sampled": interval(mean_interval(start[None, :], n_boot=N_BOOT)),
                  "greedy": interval(mean_interval(np.array(data["start"]["greedy"])[None, :], n_boot=N_BOOT))},
        "arms": arms,
        "vs_grpo": {a: compare(data, a, "grpo") for a in data["arms"] if a != "grpo" and arms[a] and arms.get("grpo")},
        "vs_carl": {a: compare(data, a, "carl") for a in data["arms"]
                    if a not in ("carl", "grpo") and arms[a] and arms.get("carl")},
        "claims": claims(data, arms),
        # Descriptive, not a decision rule of the protocol: each arm's gain over the start per 1,000 actions (in
        # points) minus GRPO's, paired by seed and question.
        "per_1k_actions_vs_grpo": {a: {"generated": per_action(data, a, "grpo", "actions_generated"),
                                       "trained": per_action(data, a, "grpo", "actions_trained")}
                                   for a in data["arms"] if a != "grpo" and arms[a] and arms.get("grpo")},
        "commits": sorted({r["done"]["commit"] or "?" for runs in data["runs"].values() for r in runs.values()}),
    }  # fmt: skip
    result["table"] = table(result)
    result["figure"] = str(plot(arms, float(start.mean()), out / "accuracy_vs_actions.png"))
    write_json(out / "results.json", json.loads(json.dumps(result, default=_jsonable)))
    print(result["table"])
    print(json.dumps(result["claims"], indent=1, default=_jsonable))
    return result


def reproduction(rerun: Path, original: Path) -> dict[str, Any]:
    """Each finished (arm, seed) run of the experiment in `rerun` against the same run in `original`.

    Per run: at every evaluated step the held-out EM (sampled and greedy) of both, their difference and the share of
    questions whose score changed; the largest per-step difference of the mean training reward; and the noise the
    protocol states for one run (docs/carl_vs_grpo.md, "Reproducing a run"): the half-width of the 95 % interval of
    the original run's final sampled EM over held-out questions. `within_noise` when every difference is inside it.
    Writes `reproduction.json` into `rerun`.
    """
    new, old = load(rerun), load(original)
    if new["start"]["questions"] != old["start"]["questions"]:
        raise ValueError(f"{rerun} and {original} scored different held-out questions; they are not one protocol.")
    start_diff = float(np.mean(new["start"]["sampled"]) - np.mean(old["start"]["sampled"]))
    runs = []
    for arm, by_seed in new["runs"].items():
        for seed, run in sorted(by_seed.items()):
            before = old["runs"].get(arm, {}).get(seed)
            if before is None:
                raise ValueError(f"{original} has no finished {arm} seed {seed} to compare the rerun with.")
            noise = mean_interval(before["sampled"][None, :, -1], n_boot=N_BOOT)
            points = []
            for p, step in enumerate(new["steps"]):
                point: dict[str, Any] = {"step": step}
                for key in ("sampled", "greedy"):
                    a, b = run[key][:, p], before[key][:, p]
                    point[key] = {"original": float(b.mean()), "rerun": float(a.mean()),
                                  "difference": float(a.mean() - b.mean()),
                                  "questions_changed": float(np.mean(a != b))}  # fmt: skip
                points.append(point)
            reward = np.array(run["per_step"]["reward"]) - np.array(before["per_step"]["reward"])
            half_width = (noise.high - noise.low) / 2
            runs.append({"arm": arm, "seed": seed, "points": points, "noise_half_width": half_width,
                         "max_reward_difference": float(np.nanmax(np.abs(reward))) if reward.size else math.nan,
                         "within_noise": all(abs(q[k]["difference"]) <= half_width
                                             for q in points for k in ("sampled", "greedy"))})  # fmt: skip
    result = {"rerun": str(rerun), "original": str(original), "start_difference": start_diff, "runs": runs}
    write_json(rerun / "reproduction.json", result)
    for r in runs:
        last = r["points"][-1]["sampled"]
        print(
            f"{r['arm']} seed {r['seed']}: final sampled EM {100 * last['original']:.1f} -> {100 * last['rerun']:.1f}"
            f" ({100 * last['difference']:+.1f} points, {100 * last['questions_changed']:.0f} % of questions "
            f"changed; noise +-{100 * r['noise_half_width']:.1f}); training reward differs by at most "
            f"{r['max_reward_difference']:.4f} per step: {'within' if r['within_noise'] else 'OUTSIDE'} the noise"
        )
    return result


def export_scores(out: Path, path: Path) -> dict[str, Any]:
    """Every scored policy's per-question held-out exact match, compactly, so that every interval can be recomputed.

    Writes `{"questions", "eval_samples", "start", "runs": {arm: {seed: {step: {"sampled", "greedy"}}}}}`: a sampled
    score is stored as the number of the question's `eval_samples` episodes that were right (an integer), greedy as
    0 or 1. Reads `start_eval.json` and every `runs/<arm>/seed<k>/eval/step_<s>.json` under `out`.
    """
    start = json.loads((out / "start_eval.json").read_text())
    samples = int(json.loads((out / "protocol.json").read_text())["protocol"]["eval_samples"])

    def compact(score: dict[str, Any]) -> dict[str, list[int]]:
        if score["questions"] != start["questions"]:
            raise ValueError(f"a policy was scored on other questions than the start ({score.get('policy')}).")
        sampled = [round(x * samples) for x in score["sampled"]]
        if any(abs(k / samples - x) > 1e-9 for k, x in zip(sampled, score["sampled"], strict=True)):
            raise ValueError(f"sampled scores that are not multiples of 1/{samples}: {score.get('policy')}")
        return {"sampled": sampled, "greedy": [round(x) for x in score["greedy"]]}

    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for file in sorted((out / "runs").glob("*/seed*/eval/step_*.json")):
        arm, seed, step = file.parts[-4], file.parts[-3].removeprefix("seed"), file.stem.removeprefix("step_")
        runs.setdefault(arm, {}).setdefault(seed, {})[str(int(step))] = compact(json.loads(file.read_text()))
    result = {"questions": start["questions"], "eval_samples": samples, "start": compact(start), "runs": runs}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, Interval):
        return asdict(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)
