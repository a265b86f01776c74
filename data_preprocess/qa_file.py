"""Your own QA file -> verl RLHFDataset parquet: any .jsonl, .json, .parquet or .csv with a question and its answers.

    python -m data_preprocess.qa_file --input my.jsonl --data-source myqa --split test --output data/myqa_test.parquet
    python -m data_preprocess.qa_file --input my.csv --question-field q --answers-field gold --answer-sep "|" \\
        --data-source myqa --split train --output data/myqa_train.parquet

Each record needs a question (``--question-field``, default ``question``) and its answers (``--answers-field``, default
``answers``): a string, a list of strings (aliases, any of which counts as correct), or ``{"target": [...]}``. In a
CSV cell, a JSON list (``["Paris", "City of Light"]``) is read as a list, and ``--answer-sep`` splits plain text.
``--id-field`` (default ``id``, optional) is kept as ``extra_info.source_id``. ``--data-source`` names the data set in
every row; verl groups its validation metrics by it.

Questions are kept as written, except that ``--question-mark auto`` (the default) ends an unpunctuated question that
opens with a question word with "?", which gives Search-R1's prompts for NQ-style questions ("who wrote hamlet" ->
"who wrote hamlet?") but leaves imperatives alone ("Name the capital of France." stays as is); ``always`` is
Search-R1's own rule (the seven test sets in ``qa_test_sets`` keep it), ``never`` changes nothing. See
``common.end_question``.

Rows are numbered from 0 in the order read (``extra_info.index``); an error names the file, the row and the field.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from data_preprocess.common import (
    QUESTION_MARK_MODES,
    RowError,
    add_common_args,
    as_answer_list,
    clean_question,
    end_question,
    make_search_row,
    read_records,
    run,
)

#: Field names other data sets use, suggested when the configured one is missing.
QUESTION_ALIASES = ("question", "query", "q", "prompt", "input", "problem")
ANSWER_ALIASES = ("answers", "answer", "golden_answers", "gold", "target", "targets", "label", "output")


def _missing(example: Mapping[str, Any], idx: int, field: str, flag: str, aliases: Sequence[str]) -> RowError:
    present = sorted(map(str, example))
    hints = [a for a in aliases if a in example and a != field]
    hint = f"; use {flag} {hints[0]}" if hints else f"; name the field with {flag}"
    return RowError(f"row {idx}: missing field {field!r} (the record has {present}){hint}")


def _answers(value: Any, idx: int, field: str, sep: str | None) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):  # a JSON list in a CSV cell
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise RowError(f"row {idx}: field {field!r} starts with '[' but is not a JSON list ({e.msg})") from e
        elif sep:
            value = text.split(sep)
    try:
        answers = as_answer_list(value)
    except TypeError as e:
        raise RowError(f"row {idx}: field {field!r}: {e}") from e
    if not answers:
        raise RowError(f"row {idx}: field {field!r} holds no non-empty answer (got {value!r:.80})")
    return answers


def make_row(
    example: Mapping[str, Any],
    split: str,
    idx: int,
    *,
    data_source: str,
    question_field: str = "question",
    answers_field: str = "answers",
    id_field: str | None = "id",
    answer_sep: str | None = None,
    question_mark: str = "auto",
    agent_name: str | None = None,
    action_space: str = "search_r1",
) -> dict[str, Any]:
    """Converts one record of a generic QA file (see the module docstring)."""
    if not isinstance(example, Mapping):
        raise RowError(f"row {idx}: expected a record with fields, got {type(example).__name__}: {example!r:.80}")
    if example.get(question_field) is None:
        raise _missing(example, idx, question_field, "--question-field", QUESTION_ALIASES)
    raw_question = example[question_field]
    if not isinstance(raw_question, str):
        raise RowError(f"row {idx}: field {question_field!r} must be a string, got {type(raw_question).__name__}")
    question = end_question(clean_question(raw_question), question_mark)
    if not question:
        raise RowError(f"row {idx}: field {question_field!r} is empty")
    if example.get(answers_field) is None:
        raise _missing(example, idx, answers_field, "--answers-field", ANSWER_ALIASES)
    answers = _answers(example[answers_field], idx, answers_field, answer_sep)
    return make_search_row(
        data_source=data_source,
        question=question,
        answers=answers,
        split=split,
        idx=idx,
        agent_name=agent_name,
        source_id=example.get(id_field) if id_field else None,
        action_space=action_space,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_preprocess.qa_file",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--data-source", required=True, help="name of this data set in every row and in the metrics")
    parser.add_argument("--question-field", default="question", help="field holding the question (default: question)")
    parser.add_argument("--answers-field", default="answers", help="field holding the answer(s) (default: answers)")
    parser.add_argument("--id-field", default="id", help="optional field kept as extra_info.source_id (default: id)")
    parser.add_argument("--answer-sep", default=None, help="split a plain-text answers cell on this string, e.g. '|'")
    parser.add_argument(
        "--question-mark",
        choices=QUESTION_MARK_MODES,
        default="auto",
        help="auto: add '?' only to unpunctuated questions opening with a question word; always: Search-R1's rule; "
        "never: keep questions as written (default: auto)",
    )
    add_common_args(parser, default_split="test", hub=False)
    args = parser.parse_args(argv)
    data_source = args.data_source.strip()
    if not data_source:
        parser.error("--data-source must not be empty: name the data set, e.g. --data-source myqa")

    def make(example: Mapping[str, Any], idx: int) -> dict[str, Any]:
        return make_row(
            example,
            args.split,
            idx,
            data_source=data_source,
            question_field=args.question_field,
            answers_field=args.answers_field,
            id_field=args.id_field or None,
            answer_sep=args.answer_sep,
            question_mark=args.question_mark,
            agent_name=args.agent_name,
            action_space=args.action_space,
        )

    return run(read_records(args.input, keep_bad=True), make, args, data_source)


if __name__ == "__main__":
    sys.exit(main())
