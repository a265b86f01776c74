"""The test sets: parquet files in verl's RLHFDataset schema, grouped by `data_source`, and what a row asks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipe.carl.evaluate.settings import EvalError
from recipe.carl.search.reward import parse_ground_truth


def load_datasets(files: Sequence[str | Path], limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Rows of the test files grouped by `data_source` (file order kept; `limit`: first N of each data set).

    Raises:
        EvalError: a missing or unreadable file, or rows without verl's RLHFDataset columns.
    """
    import pandas as pd  # deferred: only a run reads data (not -h)

    fix = "write it with python -m data_preprocess.qa_file (or another data_preprocess script)"
    if not files:
        raise EvalError(f"--data: no test file given; {fix}.")
    datasets: dict[str, list[dict[str, Any]]] = {}
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise EvalError(f"--data {path}: no such file; {fix}.")
        try:
            frame = pd.read_parquet(path)
        except Exception as error:
            raise EvalError(
                f"--data {path}: not a readable parquet file ({type(error).__name__}: {error}); {fix}."
            ) from None
        missing = [c for c in ("data_source", "prompt", "reward_model") if c not in frame.columns]
        if missing:
            raise EvalError(
                f"--data {path}: missing columns {missing} (verl's RLHFDataset schema: data_source, prompt, "
                f"reward_model.ground_truth, extra_info); {fix}."
            )
        if frame.empty:
            raise EvalError(f"--data {path}: holds no rows.")
        for position, row in enumerate(frame.to_dict("records")):
            if not isinstance(row["reward_model"], dict) or "ground_truth" not in row["reward_model"]:
                raise EvalError(f"--data {path} row {position}: reward_model has no ground_truth; {fix}.")
            rows = datasets.setdefault(str(row["data_source"]), [])
            if limit is None or len(rows) < limit:
                rows.append({**row, "_file": str(path), "_row": position})
    return datasets


def question_text(row: dict[str, Any]) -> str:
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    if extra.get("question"):
        return str(extra["question"])
    users = [m.get("content", "") for m in row["prompt"] if m.get("role") == "user"]
    return str(users[-1]) if users else ""


def gold_answers(row: dict[str, Any]) -> list[str] | None:
    try:
        return parse_ground_truth(row["reward_model"]["ground_truth"])[0]
    except (TypeError, ValueError):
        return None
