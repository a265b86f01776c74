"""Compare saved evaluations of several models and RL seeds, without rolling anything out again.

    python -m recipe.carl.evaluate.study --out runs/study \\
        --arm CARL runs/eval_carl_seed0 runs/eval_carl_seed1 runs/eval_carl_seed2 \\
        --arm GRPO runs/eval_grpo_seed0 runs/eval_grpo_seed1 runs/eval_grpo_seed2

An arm is a training recipe; each of its folders is one RL seed's trained policy evaluated by
`python -m recipe.carl.evaluate` (its `--out`, when it holds one model, or the model's own folder `<out>/<label>`
with one `<data_source>.jsonl` per data set). Give each arm's seeds in the same order: the i-th folder of every arm
is the policy trained with the same `SEED` (same training-question order), and arms are paired by it.

For each arm, each data set and the macro average over data sets (the number papers report): the mean over seeds
and questions with a 95 % bootstrap interval that draws seeds, then questions (within each data set for the macro
average); for each arm against `--reference` (default: the last arm), the difference paired by seed and by question,
with its interval: `recipe.carl.evaluate.stats`, the same code as the CARL-against-GRPO experiment's. The questions
are those every folder answered (matched by data set, file row and question text); any left out are counted.

This is the interval to report for a claim about a recipe. The one `python -m recipe.carl.evaluate --baseline` gives
for a single pair of models covers the questions only: a second training run of the same recipe (another seed) moves
the score by more than that interval suggests.

Outputs in `--out`: `study.md` (printed) and `study.json`.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recipe.carl.evaluate.cli import read_question_file, safe_name
from recipe.carl.evaluate.runner import COMPARED
from recipe.carl.evaluate.settings import EvalError
from recipe.carl.evaluate.stats import (
    Interval,
    macro_interval,
    mean_interval,
    paired_difference,
    paired_macro_difference,
)
from recipe.carl.io import write_json, write_text

N_BOOT = 10_000
LEVEL = 0.95
MACRO = "macro"
"""The key of the macro average in `study.json` (beside each data set's name)."""

Key = tuple[str, int, str]
"""A question: (data set, row in its file, question text)."""


@dataclass
class Run:
    """One evaluated policy: its folder and its per-question records."""

    folder: Path
    records: dict[Key, dict[str, Any]]


def model_folder(path: Path) -> Path:
    """The folder holding one model's `<data_source>.jsonl` files: `path` itself, or the one model of an
    evaluation's `--out`.

    Raises:
        EvalError: nothing there to compare, or an `--out` with several models (naming them).
    """
    if not path.is_dir():
        raise EvalError(f"{path}: no such folder; give an evaluation's --out or its <out>/<model label> folder.")
    if any(path.glob("*.jsonl")):
        return path
    results = path / "results.json"
    if not results.exists():
        raise EvalError(f"{path}: holds neither per-question files (<data_source>.jsonl) nor results.json.")
    labels = list(json.loads(results.read_text())["models"])
    if len(labels) != 1:
        choices = ", ".join(str(path / safe_name(label)) for label in labels)
        raise EvalError(f"{path} holds {len(labels)} models: give one of their folders: {choices}.")
    return path / safe_name(labels[0])


def load_run(path: Path) -> Run:
    folder = model_folder(path)
    records: dict[Key, dict[str, Any]] = {}
    for file in sorted(folder.glob("*.jsonl")):
        for r in read_question_file(file):
            records[(str(r["data_source"]), int(r["row"]), str(r["question"]))] = r
    if not records:
        raise EvalError(f"{folder}: its per-question files hold no question.")
    return Run(folder, records)


def common_questions(arms: dict[str, list[Run]]) -> tuple[list[Key], dict[str, int]]:
    """The questions every run answered, in data-set then file order; and, per folder, how many of its were left out."""
    runs = [run for group in arms.values() for run in group]
    shared = set(runs[0].records).intersection(*(run.records for run in runs[1:]))
    if not shared:
        raise EvalError("the folders have no question in common (same data set, row and question): were they "
                        "evaluated on the same test files?")  # fmt: skip
    left_out = {str(run.folder): len(run.records) - len(shared) for run in runs if len(run.records) > len(shared)}
    return sorted(shared), left_out


def metric_array(runs: list[Run], keys: list[Key], metric: str) -> np.ndarray:
    """[shape: (n_seeds, n_questions)] each run's per-question value (the mean over its samples)."""
    return np.array([[float(run.records[k][metric]) for k in keys] for run in runs], dtype=float)


def _interval(i: Interval) -> dict[str, float]:
    return {"mean": i.estimate, "low": i.low, "high": i.high}


def summarize_metric(arms: dict[str, list[Run]], keys: list[Key], metric: str, reference: str, seed: int) -> dict:
    """Per arm and per data set (and the macro average): the mean with its interval; the paired difference to the
    reference arm where both have as many seeds. Questions where any run has no value (NaN) are left out."""
    values = {arm: metric_array(runs, keys, metric) for arm, runs in arms.items()}
    finite = np.all([np.isfinite(v).all(axis=0) for v in values.values()], axis=0)
    strata = np.array([k[0] for k in keys])[finite]
    values = {arm: v[:, finite] for arm, v in values.items()}
    sets = list(dict.fromkeys(strata))
    out: dict[str, Any] = {"questions": int(finite.sum()), "left_out_nan": int((~finite).sum()), "arms": {}}
    options = {"n_boot": N_BOOT, "seed": seed, "level": LEVEL}
    for arm, v in values.items():
        row = {d: _interval(mean_interval(v[:, strata == d], **options)) for d in sets}
        row[MACRO] = _interval(macro_interval(v, strata, **options))
        entry: dict[str, Any] = {"seeds": v.shape[0], "by_data_set": row}
        ref = values[reference]
        if arm != reference and v.shape == ref.shape:
            diff = {d: _interval(paired_difference(v[:, strata == d], ref[:, strata == d], **options)) for d in sets}
            diff[MACRO] = _interval(paired_macro_difference(v, ref, strata, **options))
            entry["minus_reference"] = diff
        elif arm != reference:
            entry["minus_reference"] = None
            entry["note"] = f"{v.shape[0]} seeds against {ref.shape[0]} for {reference}: no paired difference"
        out["arms"][arm] = entry
    out["data_sets"] = {d: int((strata == d).sum()) for d in sets}
    return out


def study(arms: dict[str, list[Path]], reference: str | None, metrics: list[str], seed: int = 0) -> dict[str, Any]:
    """The whole comparison (module docstring); returns `study.json`'s content.

    Raises:
        EvalError: a folder that cannot be read, an unknown reference or metric, no question in common.
    """
    if len(arms) < 1:
        raise EvalError("give at least one --arm NAME FOLDER [FOLDER ...]")
    reference = reference or list(arms)[-1]
    if reference not in arms:
        raise EvalError(f"--reference {reference}: not an arm; the arms are {', '.join(arms)}.")
    unknown = [m for m in metrics if m not in COMPARED]
    if unknown:
        raise EvalError(f"--metric {' '.join(unknown)}: unknown; choose among {', '.join(COMPARED)}.")
    runs = {arm: [load_run(Path(p)) for p in paths] for arm, paths in arms.items()}
    keys, left_out = common_questions(runs)
    return {
        "arms": {arm: [str(r.folder) for r in group] for arm, group in runs.items()},
        "reference": reference,
        "left_out": left_out,
        "bootstrap": {"n_boot": N_BOOT, "level": LEVEL, "seed": seed, "unit": "seeds, then questions"},
        "metrics": {m: summarize_metric(runs, keys, m, reference, seed) for m in metrics},
    }


def _pct(x: dict[str, float] | None, signed: bool = False) -> str:
    if x is None or math.isnan(x["mean"]):
        return "n/a"
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * x['mean'])} [{f.format(100 * x['low'])}, {f.format(100 * x['high'])}]"


def markdown(result: dict[str, Any]) -> str:
    """`study.json` as markdown tables: one per metric, a row per arm, a column per data set and the macro average."""
    lines = ["# Study", ""]
    ref = result["reference"]
    for metric, m in result["metrics"].items():
        sets = [*m["data_sets"], MACRO]
        names = [f"{d} ({m['data_sets'][d]})" for d in m["data_sets"]] + ["macro average"]
        lines += [
            f"## {metric} %, mean over seeds and questions [{100 * LEVEL:.0f} % interval]",
            "",
            f"{m['questions']} questions in every folder; intervals draw RL seeds, then questions (within each data "
            f"set for the macro average); differences are paired by seed and question, against {ref}.",
            "",
            "| arm | seeds | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for arm, a in m["arms"].items():
            lines.append(f"| {arm} | {a['seeds']} | " + " | ".join(_pct(a["by_data_set"][d]) for d in sets) + " |")
            if a.get("minus_reference"):
                cells = " | ".join(_pct(a["minus_reference"][d], signed=True) for d in sets)
                lines.append(f"| {arm} − {ref} | | {cells} |")
            elif a.get("note"):
                lines.append(f"| {arm} − {ref} | | {a['note']} |" + " |" * (len(names) - 1))
        lines.append("")
    if result["left_out"]:
        lines.append(
            "Left out (not answered by every folder): " + ", ".join(f"{k}: {v}" for k, v in result["left_out"].items())
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m recipe.carl.evaluate.study",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--arm",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "FOLDER"),
        help="an arm's name, then one evaluation folder per RL seed (in seed order); repeat for each arm",
    )
    p.add_argument("--reference", help="the arm the others are compared with (default: the last)")
    p.add_argument("--metric", nargs="+", default=["em", "f1"], help=f"among {', '.join(COMPARED)} (default em f1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--out", required=True, help="folder for study.md and study.json")
    args = p.parse_args(argv)
    arms: dict[str, list[Path]] = {}
    for name, *folders in args.arm:
        if not folders:
            p.error(f"--arm {name}: give its evaluation folders after the name")
        if name in arms:
            p.error(f"--arm {name} is given twice")
        arms[name] = [Path(f) for f in folders]
    try:
        result = study(arms, args.reference, args.metric, seed=args.seed)
    except EvalError as error:
        raise SystemExit(f"error: {error}") from None
    out = Path(args.out)
    write_json(out / "study.json", result)
    text = markdown(result)
    write_text(out / "study.md", text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
