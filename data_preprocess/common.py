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

The prompt asks for Search-R1's tag protocol (``recipe/carl/search/actions.py`` explains the choice); with
``--action-space paper``, for the paper's action space (``<access>`` and ``<read>`` too:
``recipe/carl/search/action_space.py``), the run's ``algorithm.carl.action_space`` must then be ``paper``.

Input files (``read_records``): ``.jsonl``, ``.json`` (a list of records), ``.parquet`` or ``.csv`` (with a header).
A JSONL or CSV line that is not valid UTF-8 or (JSONL) not valid JSON is a bad row like any other: named by file and
line, and skipped and counted with ``--skip-bad``. Output parquet files are written whole (``recipe.carl.io``) with
the usual public mode (0644 under the usual umask).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe.carl.io import atomic_path
from recipe.carl.search.action_space import PAPER_INSTRUCTION_TEMPLATE

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

#: The instruction of each action space (`algorithm.carl.action_space`).
INSTRUCTION_TEMPLATES = {"search_r1": INSTRUCTION_TEMPLATE, "paper": PAPER_INSTRUCTION_TEMPLATE}

REQUIRED_COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info", "agent_name")


class RowError(ValueError):
    """A source row cannot be converted; the message names the row."""


@dataclass(frozen=True)
class BadRecord:
    """A line of an input file that could not be read as a record (``read_records(..., keep_bad=True)``)."""

    message: str
    """Names the file, the line and what is wrong, e.g. ``data.jsonl:7: not valid JSON (Expecting value)``."""


def build_prompt(
    question: str, system_prompt: str = SYSTEM_PROMPT, action_space: str = "search_r1"
) -> list[dict[str, str]]:
    """The chat prompt for one question: a system message and the instruction of `action_space` + question as the
    user message."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": INSTRUCTION_TEMPLATES[action_space].format(question=question)},
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


#: A question that opens with a question word (optionally after a preposition: "in which year ...").
_INTERROGATIVE = re.compile(
    r"^(?:(?:in|on|at|from|by|for|to|of|with|during|after|before|since|under|about|into|according to)\s+)?"
    r"(?:who|whom|whose|what|which|when|where|why|how|is|are|was|were|am|do|does|did|can|could|will|would|shall"
    r"|should|may|might|must|has|have|had)(?:\b|n't|'s|'re)",
    re.IGNORECASE,
)
QUESTION_MARK_MODES = ("auto", "always", "never")


def end_question(question: str, mode: str = "auto") -> str:
    """Ends a cleaned question with "?" according to ``mode``.

    Search-R1 appends "?" to every question that lacks one (its NQ and HotpotQA questions are lowercase, unpunctuated
    questions: "who wrote hamlet"); that rule is ``always``, which the seven Search-R1 test sets keep. Applied to any
    data it turns "Name the capital of France." into "Name the capital of France.?", so ``auto`` gives Search-R1's
    result only where it makes sense: "?" is added when the text has no final punctuation (. ? !) and opens with a
    question word ("who wrote hamlet" -> "who wrote hamlet?"); imperatives and statements stay as written.
    ``never`` keeps every question as written.
    """
    if mode not in QUESTION_MARK_MODES:
        raise ValueError(f"question mark mode must be one of {', '.join(QUESTION_MARK_MODES)}, got {mode!r}")
    if not question or mode == "never" or question.endswith("?"):
        return question
    if mode == "always":
        return question + "?"
    ends_punctuated = question.rstrip("\"')\u201d\u2019")[-1:] in (".", "!", "?")
    return question if ends_punctuated or not _INTERROGATIVE.match(question) else question + "?"


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
    source_id: Any = None,
    extra: Mapping[str, Any] | None = None,
    action_space: str = "search_r1",
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
        source_id: The row's id in its source data, stored as ``extra_info.source_id`` (a string, or None).
        extra: Additional ``extra_info`` fields.
        action_space: Whose instruction the prompt holds: ``search_r1`` (default) or ``paper``.

    Raises:
        RowError: When the question or answers are empty; the message names ``idx``.
    """
    ground_truth: dict[str, Any] = {"target": list(answers)}
    if aug_answers is not None:
        ground_truth["aug_target"] = list(aug_answers)
    row = {
        "data_source": data_source,
        "prompt": build_prompt(question, action_space=action_space),
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
            "source_id": None if source_id is None else str(source_id),
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


def _decode_line(raw: bytes, path: Path, line_no: int) -> str | BadRecord:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)")


def _jsonl_records(path: Path) -> Iterator[Any]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, line_no)
            if isinstance(line, BadRecord):
                yield line
            elif line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    yield BadRecord(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})")


def _csv_records(path: Path) -> Iterator[Any]:
    # Decoded with surrogateescape, so a bad byte marks only the row that holds it (csv rows may span lines inside
    # quotes, so each row is checked after parsing).
    with path.open("rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark, as spreadsheet programs write it
        text = text[1:]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        return
    for row in reader:
        values = [*row.values(), *row.keys()]
        if any(isinstance(v, str) and re.search("[\udc80-\udcff]", v) for v in values):
            yield BadRecord(f"{path}:{reader.line_num}: not valid UTF-8")
        elif None in row:  # more cells than the header has columns
            cells = len(row) - 1 + len(row[None])
            yield BadRecord(f"{path}:{reader.line_num}: {cells} cells, the header has {len(reader.fieldnames)}")
        else:
            yield row


def read_records(path: str | os.PathLike, *, keep_bad: bool = False) -> Iterator[Any]:
    """Yields source records from a .jsonl, .json (a list), .parquet or .csv (with a header row) file.

    Args:
        path: The input file.
        keep_bad: Yield a ``BadRecord`` for a JSONL/CSV line that cannot be read (not UTF-8, not JSON), so that
            ``convert`` can skip and count it with ``--skip-bad``; otherwise raise at that line.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Unsupported format.
        RowError: A line (or a whole .json file) cannot be read; the message names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
        return
    if suffix == ".json":
        data = path.read_bytes()
        try:
            records = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise RowError(f"{path}:{line}: not valid UTF-8 ({e.reason}); the whole .json file is unreadable") from e
        except json.JSONDecodeError as e:
            raise RowError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); the whole .json file is unreadable") from e
        if not isinstance(records, list):
            raise RowError(f"{path}: a .json input must hold a list of records, got {type(records).__name__}")
        yield from records
        return
    if suffix == ".jsonl":
        lines = _jsonl_records(path)
    elif suffix == ".csv":
        lines = _csv_records(path)
    else:
        raise ValueError(f"unsupported input format {suffix!r} for {path}: use .jsonl, .json, .parquet or .csv")
    for record in lines:
        if isinstance(record, BadRecord) and not keep_bad:
            raise RowError(record.message)
        yield record


def load_hub_records(name: str, split: str, config: str | None = None) -> Iterator[dict[str, Any]]:
    """Yields records of a Hugging Face hub data set (needs network; never used by the tests)."""
    import datasets

    yield from datasets.load_dataset(name, config, split=split)


def convert(
    records: Iterable[Mapping[str, Any] | BadRecord],
    make_row: Callable[[Mapping[str, Any], int], dict[str, Any]],
    *,
    skip_bad: bool = False,
    limit: int | None = None,
    progress: bool = True,
    desc: str = "rows",
    source: str | os.PathLike | None = None,
    skipped_reasons: list[str] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Runs ``make_row(example, idx)`` over the records.

    Args:
        records: Source records; a ``BadRecord`` (an unreadable line) counts as a bad row.
        make_row: Converts one record; raises RowError/TypeError/KeyError/ValueError for a bad one.
        skip_bad: Skip and count bad rows instead of stopping at the first.
        limit: Stop after this many source records.
        progress: Show a tqdm bar.
        desc: Bar label.
        source: The input file, named in the messages of bad rows ("<file>: row 3: ...").
        skipped_reasons: If given, receives the message of every skipped row.

    Returns:
        The rows and the number of skipped records.

    Raises:
        RowError: For the first bad record when ``skip_bad`` is False; the message names the file and the record.
    """
    from tqdm import tqdm

    rows, skipped = [], 0
    for idx, example in enumerate(tqdm(records, desc=desc, disable=not progress, unit=" rows")):
        if limit is not None and idx >= limit:
            break
        try:
            if isinstance(example, BadRecord):
                raise RowError(example.message)  # already names the file and the line
            rows.append(make_row(example, idx))
        except (RowError, TypeError, KeyError, ValueError) as e:
            message = str(e)
            if not isinstance(example, BadRecord):
                message = message if message.startswith(f"row {idx}") else f"row {idx}: {message}"
                message = f"{source}: {message}" if source is not None else message
            if not skip_bad:
                raise RowError(f"{message} (pass --skip-bad to skip such rows)") from e
            skipped += 1
            if skipped_reasons is not None:
                skipped_reasons.append(message)
            logger.debug("skipping %s", message)
    return rows, skipped


def write_parquet_atomic(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Writes rows to parquet whole (``recipe.carl.io.atomic_path``), with the usual public file mode.

    The output either is complete or does not exist: an error or Ctrl-C mid-write removes the temporary file and
    leaves any previous output untouched.
    """
    import pandas as pd

    path = Path(path)
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    with atomic_path(path) as tmp:
        pd.DataFrame(list(rows)).to_parquet(tmp, index=False)
    return path


def add_common_args(parser: argparse.ArgumentParser, *, default_split: str, hub: bool = True) -> None:
    """The flags every preprocessing script shares; ``hub=False`` for a script that reads only local files."""
    if hub:
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--input", help="local .jsonl, .json, .parquet or .csv file")
        source.add_argument("--hub", action="store_true", help="load from the Hugging Face hub (needs network)")
    else:
        parser.add_argument("--input", required=True, help="local .jsonl, .json, .parquet or .csv file")
    parser.add_argument("--output", required=True, help="output .parquet path")
    parser.add_argument("--split", default=default_split, help=f"split name (default: {default_split})")
    parser.add_argument(
        "--agent-name",
        default=None,
        help=f"verl agent loop for these rows (default: {TRAIN_AGENT_NAME} for --split train, else {EVAL_AGENT_NAME})",
    )
    parser.add_argument(
        "--action-space",
        choices=sorted(INSTRUCTION_TEMPLATES),
        default="search_r1",
        help="the prompt's instruction: search_r1 (default: search, answer) or paper (search, access, read, answer; "
        "train with algorithm.carl.action_space=paper)",
    )
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad rows instead of failing")
    parser.add_argument("--limit", type=int, default=None, help="convert at most this many records (the first ones)")
    parser.add_argument(
        "--per-source",
        type=int,
        default=None,
        help="keep a seeded random sample of this many rows of each data_source (all of a smaller one), e.g. a "
        "validation file of 500 questions per test set",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --per-source's sample (default 0)")
    parser.add_argument(
        "--rest-output", default=None, help="with --per-source: write the rows not sampled here (a held-out test file)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


@dataclass(frozen=True)
class Sample:
    """A stratified sample of rows (`sample_per_source`)."""

    rows: list[dict[str, Any]]
    """The sampled rows, in their input order."""
    rest: list[dict[str, Any]]
    """The other rows, in their input order."""
    counts: dict[str, tuple[int, int]]
    """data_source -> (rows sampled, rows there were), sources sorted by name."""


def sample_per_source(rows: Sequence[dict[str, Any]], per_source: int, seed: int = 0) -> Sample:
    """A seeded random sample of `per_source` rows of each `data_source`; a source with fewer rows is kept whole.

    Each source's draw depends only on `seed`, the source's name and its rows (numpy's generator seeded with
    `[seed, crc32(name)]`), so adding or removing another source leaves it unchanged, and the same input gives the
    same sample on every run. Rows keep their input order.

    Raises:
        ValueError: `per_source` below 1.
    """
    if per_source < 1:
        raise ValueError(f"--per-source {per_source}: must be >= 1 (rows to keep of each data_source)")
    import numpy as np

    by_source: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_source.setdefault(str(row["data_source"]), []).append(i)
    keep: set[int] = set()
    counts = {}
    for source in sorted(by_source):
        members = by_source[source]
        if len(members) <= per_source:
            chosen = members
        else:
            rng = np.random.default_rng([seed, zlib.crc32(source.encode())])
            chosen = [members[j] for j in rng.choice(len(members), size=per_source, replace=False)]
        keep.update(chosen)
        counts[source] = (len(chosen), len(members))
    return Sample(
        rows=[r for i, r in enumerate(rows) if i in keep],
        rest=[r for i, r in enumerate(rows) if i not in keep],
        counts=counts,
    )


def sample_report(sample: Sample, per_source: int) -> str:
    """One line per data source: sampled of total, and which sources were smaller than asked (kept whole)."""
    lines = [f"  {source}: {kept} of {total}" for source, (kept, total) in sample.counts.items()]
    small = [source for source, (_, total) in sample.counts.items() if total < per_source]
    if small:
        lines.append(f"  fewer rows than --per-source {per_source}, all taken: {', '.join(small)}")
    return "\n".join(lines)


def run(
    records: Iterable[Mapping[str, Any]],
    make_row: Callable[[Mapping[str, Any], int], dict[str, Any]],
    args: argparse.Namespace,
    desc: str,
) -> int:
    """Converts and writes; prints a one-line summary. Returns the exit code (2 on a bad row or input)."""
    reasons: list[str] = []
    per_source, rest_output = getattr(args, "per_source", None), getattr(args, "rest_output", None)
    if rest_output and per_source is None:
        print("error: --rest-output needs --per-source (the rows not sampled go there)", file=sys.stderr)
        return 2
    try:
        rows, skipped = convert(
            records,
            make_row,
            skip_bad=args.skip_bad,
            limit=args.limit,
            progress=not args.no_progress,
            desc=desc,
            source=getattr(args, "input", None),
            skipped_reasons=reasons,
        )
        sample = None
        if per_source is not None:
            sample = sample_per_source(rows, per_source, args.seed)
            rows = sample.rows
        out = write_parquet_atomic(rows, args.output)
        if rest_output and sample is not None:
            write_parquet_atomic(sample.rest, rest_output)
    except (RowError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if reasons:
        more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        print(f"skipped: {reasons[0]}{more}", file=sys.stderr)
    if sample is not None:
        print(f"sampled up to {per_source} rows per data_source (seed {args.seed}):")
        print(sample_report(sample, per_source))
        if rest_output:
            print(f"wrote the other {len(sample.rest)} rows to {rest_output}")
    print(f"wrote {len(rows)} rows to {out} (skipped {skipped} bad rows)")
    return 0
