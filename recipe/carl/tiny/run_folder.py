"""What the pictures read from a run's folder, in either layout: the CPU demo's run folder or a GPU run's checkpoint
folder.

| | CPU demo (`--run-dir`) | GPU run (`$CKPT_DIR/$EXPERIMENT`, `trainer.default_local_dir`) |
|---|---|---|
| metrics | `metrics.jsonl` | `metrics.jsonl` (the `file` logger's default there: `recipe/carl/metrics_file.py`) |
| tree dumps | `ckpt/carl_trees/step_*.jsonl` | `carl_trees/step_*.jsonl` |
| ground truths | `data/{train,test}.parquet` | the training parquet files, given with `--data` |
| learning curve | `summary.json` (with its noise band) | validation lines of `metrics.jsonl` (`gpu_curve`) |
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

TREE_FOLDERS = ("carl_trees", "ckpt/carl_trees")
"""Where a run's tree dumps are: a GPU run's checkpoint folder, then the demo's layout."""


def read_metrics(path: Path) -> list[dict]:
    """The trainer's metrics file as `[{"step", **metrics}]`; a half-written line is skipped (the trainer may be
    writing it right now)."""
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


def tree_dumps(run_dir: Path) -> list[Path]:
    """The run's tree dumps (`carl_trees/step_*.jsonl`), oldest first, from whichever layout holds them."""
    for folder in TREE_FOLDERS:
        dumps = sorted((Path(run_dir) / folder).glob("step_*.jsonl"))
        if dumps:
            return dumps
    return []


def ground_truths(files: Sequence[Path]) -> dict[str, object]:
    """`{question: ground truth}` of verl parquet files (`extra_info.question`, `reward_model.ground_truth`)."""
    import pandas as pd  # here, not at the top: a picture without answers needs no pandas

    out = {}
    for path in files:
        frame = pd.read_parquet(path, columns=["extra_info", "reward_model"])
        for extra, reward in zip(frame["extra_info"], frame["reward_model"], strict=True):
            out[extra["question"]] = reward["ground_truth"]
    return out


VAL_KEY = re.compile(r"val-(?:aux|core)/(?P<source>.+)/(?P<metric>[^/]+)/mean@(?P<n>\d+)")
BUDGETS = {"trained": "carl/total/actions_trained", "generated": "carl/total/actions_generated"}


def gpu_curve(run_dir: Path, metric: str = "em", budget: str = "trained", label: str | None = None) -> dict:
    """A run's learning curve from its metrics file: at each validated step, the macro average over data sources of
    `val-aux/<source>/<metric>/mean@n` (`val-core/...` for `reward`), against the step and the actions trained (or
    generated) so far (`carl/total/*`; 0 before step 1).

    Raises:
        SystemExit: no metrics file, or no validation of `metric` in it, naming what is there.
    """
    path = Path(run_dir) / "metrics.jsonl"
    rows = read_metrics(path)
    if not rows:
        raise SystemExit(
            f"error: {path} does not exist or is empty; give a run's checkpoint folder ($CKPT_DIR/$EXPERIMENT)."
        )
    curve: dict = {"label": label or Path(run_dir).name, "step": [], "actions": [], "accuracy": [], "se": None}
    sources: set[str] = set()
    total = 0.0
    for row in rows:
        total = float(row.get(BUDGETS[budget], total))
        values = {}
        for key, value in row.items():
            match = VAL_KEY.fullmatch(key)
            if match and match["metric"] == metric:
                values[match["source"]] = float(value)
        if values:
            sources |= set(values)
            curve["step"].append(row["step"])
            curve["actions"].append(total if row["step"] > 0 else 0.0)
            curve["accuracy"].append(sum(values.values()) / len(values))
    if not curve["step"]:
        found = sorted({m["metric"] for r in rows for k in r if (m := VAL_KEY.fullmatch(k))})
        raise SystemExit(f"error: {path} holds no validation of {metric!r} (it has {found or 'no validation'}).")
    curve["sources"] = sorted(sources)
    return curve
