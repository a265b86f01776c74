"""Shared pieces of the search-QA preprocessing scripts: prompt, row schema, validation, I/O, CLI.

Every script writes verl's ``RLHFDataset`` parquet with these columns:

===================  ============================================================================================
column               content
===================  ============================================================================================
``data_source``      e.g. ``searchR1_nq`` (verl's own Search-R1 names, so its default scorer also routes them)
``prompt``           ``[{"role": "system", ...}, {"role": "user", "content": instruction + question}]``
``ability``          ``"fact-reasoning"``
``reward_model``     ``{"style": "rule", "ground_truth": {"target": [aliases, ...]}}`` (+ ``aug_target`` for ASearcher)
``extra_info``       ``{"index", "split", "question", "need_tools_kwargs": True,
                     "tools_kwargs": {"search": {"create_kwargs": {"data_source", "question_index"}}}}``
``agent_name``       ``"carl_agent"`` for ``--split train`` (a tree under ``adv_estimator=carl``, one trajectory
                     under GRPO), ``"carl_chain_agent"`` for any other split (validation never grows trees);
                     ``--agent-name`` overrides; verl picks the agent loop per row
===================  ============================================================================================

The prompt asks for Search-R1's tag protocol (``recipe/carl/search/actions.py`` explains the choice).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TRAIN_AGENT_NAME = "carl_agent"
EVAL_AGENT_NAME = "carl_chain_agent"


def default_agent_name(split: str) -> str:
    """The agent loop a split's rows name: training rows follow the estimator, evaluation rows run one trajectory."""
    return TRAIN_AGENT_NAME if split == "train" else EVAL_AGENT_NAME


ABILITY = "fact-reasoning"

SYSTEM_PROMPT = "You are a helpful assistant that answers questions by searching a Wikipedia corpus."

#: The Search-R1-style instruction, in our own words. ``{question}`` is filled in by ``build_prompt``.
INSTRUCTION_TEMPLATE = (
    "Answer the question below. Think step by step inside <think> and </think> whenever you get new information. "
    "If you are missing knowledge, search the corpus by writing a query as <search> query </search>; "
    "the top results will come back between <information> and </information>. "
    "You may search as many times as you need. "
    "When you know the answer, give only the short final answer inside <answer> and </answer>, "
    "for example <answer> Beijing </answer>.\n"
    "Question: {question}"
)

REQUIRED_COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info", "agent_name")


class RowError(ValueError):
    """A source row cannot be converted; the message names the row."""


def build_prompt(question: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The chat prompt for one question: a system message and the instruction + question as the user message."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": INSTRUCTION_TEMPLATE.format(question=question)},
    ]


def require(example: Mapping[str, Any], keys: Sequence[str], idx: int) -> Any:
    """Returns the first present, non-None field among ``keys``; raises RowError naming the row otherwise."""
    for key in keys:
        value = example.get(key)
        if value is not None:
            return value
    raise RowError(f"row {idx}: missing field {' / '.join(map(repr, keys))} (has {sorted(example)})")


def clean_question(question: Any, *, add_question_mark: bool = False) -> str:
    """Strips and whitespace-normalises a question; optionally ends it with "?" (Search-R1 does for NQ/HotpotQA)."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}: {question!r:.80}")
    question = " ".join(question.split())
    if add_question_mark and question and not question.endswith("?"):
        question += "?"
    return question


def as_answer_list(value: Any) -> list[str]:
    """Turns a string, a list/tuple/numpy array of strings (numbers allowed) or ``{"target": ...}`` into aliases.

    Empty strings are dropped and duplicates removed (order kept). Raises TypeError for any other shape.
    """
    if isinstance(value, Mapping):
        if "target" not in value:
            raise TypeError(f"answer dict needs a 'target' key, got keys {sorted(value)}")
        value = value["target"]
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy arrays from parquet
        value = value.tolist()
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple):
        raise TypeError(f"answers must be a string or a list of strings, got {type(value).__name__}: {value!r:.80}")
    aliases: list[str] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise TypeError(f"answers must be strings, got {type(item).__name__}: {item!r:.80}")
        alias = " ".join(str(item).split())
        if alias and alias not in aliases:
            aliases.append(alias)
    return aliases


def make_search_row(
    *,
    data_source: str,
    question: str,
    answers: Sequence[str],
    split: str,
    idx: int,
    agent_name: str | None = None,
    aug_answers: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assembles one verl row (the schema in the module docstring) and validates it.

    Args:
        data_source: Row's data source name.
        question: Cleaned question text.
        answers: Ground-truth aliases.
        split: "train", "test", ...
        idx: Row index, stored as ``extra_info.index``.
        agent_name: verl agent loop name for this row (default: ``default_agent_name(split)``).
        aug_answers: ASearcher's augmented aliases; stored as ``ground_truth.aug_target`` when given.
        extra: Additional ``extra_info`` fields (e.g. the source id).

    Raises:
        RowError: When the question or answers are empty; the message names ``idx``.
    """
    ground_truth: dict[str, Any] = {"target": list(answers)}
    if aug_answers is not None:
        ground_truth["aug_target"] = list(aug_answers)
    row = {
        "data_source": data_source,
        "prompt": build_prompt(question),
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {
            "index": int(idx),
            "split": split,
            "question": question,
            "need_tools_kwargs": True,
            # create_kwargs must not be empty (parquet cannot store a struct without fields); these two fields
            # let a tool log where a call came from. No answers here: the tool must not see them.
            "tools_kwargs": {"search": {"create_kwargs": {"data_source": data_source, "question_index": int(idx)}}},
            **dict(extra or {}),
        },
        "agent_name": agent_name or default_agent_name(split),
    }
    validate_row(row, idx)
    return row


def validate_row(row: Mapping[str, Any], idx: int | str) -> None:
    """Checks one output row against the schema; raises RowError naming ``idx`` and the problem."""
    missing = [c for c in REQUIRED_COLUMNS if c not in row]
    if missing:
        raise RowError(f"row {idx}: missing columns {missing}")
    prompt = row["prompt"]
    if not isinstance(prompt, list) or not prompt or prompt[-1].get("role") != "user":
        raise RowError(f"row {idx}: prompt must be a chat list ending with a user message")
    extra = row["extra_info"]
    if not isinstance(extra.get("question"), str) or not extra["question"].strip():
        raise RowError(f"row {idx}: empty question")
    target = row["reward_model"]["ground_truth"].get("target")
    if not isinstance(target, list) or not target or not all(isinstance(t, str) and t for t in target):
        raise RowError(f"row {idx}: ground truth needs at least one non-empty answer string, got {target!r:.80}")
    if not isinstance(row["agent_name"], str) or not row["agent_name"]:
        raise RowError(f"row {idx}: agent_name must be a non-empty string")


def read_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yields source records from a .jsonl, .json (a list) or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    elif suffix == ".jsonl":
        import json

        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise RowError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
    elif suffix == ".json":
        import json

        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise RowError(f"{path}: a .json input must hold a list of records")
        yield from data
    else:
        raise ValueError(f"unsupported input format {suffix!r} for {path}: use .jsonl, .json or .parquet")


def load_hub_records(name: str, split: str, config: str | None = None) -> Iterator[dict[str, Any]]:
    """Yields records of a Hugging Face hub data set (needs network; never used by the tests)."""
    import datasets

    yield from datasets.load_dataset(name, config, split=split)


def convert(
    records: Iterable[Mapping[str, Any]],
    make_row: Callable[[Mapping[str, Any], int], dict[str, Any]],
    *,
    skip_bad: bool = False,
    limit: int | None = None,
    progress: bool = True,
    desc: str = "rows",
) -> tuple[list[dict[str, Any]], int]:
    """Runs ``make_row(example, idx)`` over the records.

    Args:
        records: Source records.
        make_row: Converts one record; raises RowError/TypeError/KeyError/ValueError for a bad one.
        skip_bad: Skip and count bad rows instead of stopping at the first.
        limit: Stop after this many source records.
        progress: Show a tqdm bar.
        desc: Bar label.

    Returns:
        The rows and the number of skipped records.

    Raises:
        RowError: For the first bad record when ``skip_bad`` is False; the message names the record.
    """
    from tqdm import tqdm

    rows, skipped = [], 0
    for idx, example in enumerate(tqdm(records, desc=desc, disable=not progress, unit=" rows")):
        if limit is not None and idx >= limit:
            break
        try:
            rows.append(make_row(example, idx))
        except (RowError, TypeError, KeyError, ValueError) as e:
            if not skip_bad:
                message = str(e) if str(e).startswith(f"row {idx}") else f"row {idx}: {e}"
                raise RowError(f"{message} (pass --skip-bad to skip such rows)") from e
            skipped += 1
            logger.debug("skipping row %d: %s", idx, e)
    return rows, skipped


def write_parquet_atomic(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Writes rows to parquet through a temporary file in the same directory and ``os.replace``.

    The output either is complete or does not exist: an error or Ctrl-C mid-write removes the temporary file and
    leaves any previous output untouched.
    """
    import pandas as pd

    path = Path(path)
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pd.DataFrame(list(rows)).to_parquet(tmp_name, index=False)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def add_common_args(parser: argparse.ArgumentParser, *, default_split: str) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="local .jsonl, .json or .parquet file")
    source.add_argument("--hub", action="store_true", help="load from the Hugging Face hub (needs network)")
    parser.add_argument("--output", required=True, help="output .parquet path")
    parser.add_argument("--split", default=default_split, help=f"split name (default: {default_split})")
    parser.add_argument(
        "--agent-name",
        default=None,
        help=f"verl agent loop for these rows (default: {TRAIN_AGENT_NAME} for --split train, else {EVAL_AGENT_NAME})",
    )
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad rows instead of failing")
    parser.add_argument("--limit", type=int, default=None, help="convert at most this many records")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(
    records: Iterable[Mapping[str, Any]],
    make_row: Callable[[Mapping[str, Any], int], dict[str, Any]],
    args: argparse.Namespace,
    desc: str,
) -> int:
    """Converts and writes; prints a one-line summary. Returns the exit code (2 on a bad row or input)."""
    try:
        rows, skipped = convert(
            records, make_row, skip_bad=args.skip_bad, limit=args.limit, progress=not args.no_progress, desc=desc
        )
        out = write_parquet_atomic(rows, args.output)
    except (RowError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(rows)} rows to {out} (skipped {skipped} bad rows)")
    return 0
