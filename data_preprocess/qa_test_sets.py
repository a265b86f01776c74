"""The seven Search-R1 evaluation sets -> verl RLHFDataset parquet, one data set per run.

Data sets: NQ, TriviaQA, PopQA (general QA); HotpotQA, 2WikiMultiHopQA, MuSiQue, Bamboogle (multi-hop). Input is the
FlashRAG / Search-R1 shape: one record per question with ``question`` and ``golden_answers`` (list of aliases),
plus an optional ``id``. ``data_source`` becomes ``searchR1_<dataset>``, the names verl's default scorer knows.
As in Search-R1, a "?" is appended to questions that lack one.

    python -m data_preprocess.qa_test_sets --dataset bamboogle --input bamboogle.jsonl --output data/bamboogle.parquet
    python -m data_preprocess.qa_test_sets --dataset hotpotqa --hub --output data/hotpotqa.parquet   # FlashRAG "dev"

Evaluation rows may need another agent loop than training rows (verl's loop cannot see the validate flag):
use ``--agent-name`` for that.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from data_preprocess.common import (
    RowError,
    add_common_args,
    as_answer_list,
    clean_question,
    load_hub_records,
    make_search_row,
    read_records,
    require,
    run,
)

HUB_NAME = "RUC-NLPIR/FlashRAG_datasets"
#: FlashRAG's split per data set: the multi-hop sets have no labelled test split, so their dev split is used.
HUB_SPLITS = {
    "nq": "test",
    "triviaqa": "test",
    "popqa": "test",
    "hotpotqa": "dev",
    "2wikimultihopqa": "dev",
    "musique": "dev",
    "bamboogle": "test",
}
DATASETS = tuple(HUB_SPLITS)


def make_row(
    example: Mapping[str, Any],
    split: str,
    idx: int,
    *,
    dataset: str,
    agent_name: str | None = None,
    action_space: str = "search_r1",
) -> dict[str, Any]:
    """Converts one FlashRAG-shaped record of ``dataset`` (one of ``DATASETS``)."""
    if dataset not in HUB_SPLITS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    question = clean_question(require(example, ["question"], idx), add_question_mark=True)
    if question in ("", "?"):
        raise RowError(f"row {idx}: empty question")
    answers = as_answer_list(require(example, ["golden_answers", "answers", "answer"], idx))
    if not answers:
        raise RowError(f"row {idx}: no non-empty answer")
    return make_search_row(
        data_source=f"searchR1_{dataset}",
        question=question,
        answers=answers,
        split=split,
        idx=idx,
        agent_name=agent_name,
        source_id=example.get("id"),
        action_space=action_space,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--hub-split", default=None, help="hub split to read (default: FlashRAG's test or dev)")
    add_common_args(parser, default_split="test")
    args = parser.parse_args(argv)
    if args.hub:
        records = load_hub_records(HUB_NAME, args.hub_split or HUB_SPLITS[args.dataset], config=args.dataset)
    else:
        records = read_records(args.input, keep_bad=True)
    make = lambda ex, i: make_row(  # noqa: E731
        ex, args.split, i, dataset=args.dataset, agent_name=args.agent_name, action_space=args.action_space
    )
    return run(records, make, args, args.dataset)


if __name__ == "__main__":
    sys.exit(main())
