"""Search-R1's NQ + HotpotQA training mix -> verl RLHFDataset parquet.

Input: the rows of ``PeterJinGo/nq_hotpotqa_train`` (parquet on the hub, or a local .parquet/.jsonl copy). Each row
has ``question``, ``golden_answers`` (list of aliases) and ``data_source`` (``nq`` or ``hotpotqa``); Search-R1's
own processed copies carry the answers in ``reward_model.ground_truth.target`` instead, which is read as a fallback.
As in Search-R1, a "?" is appended to questions that lack one.

    python -m data_preprocess.search_r1_nq_hotpotqa --input nq_hotpotqa_train.parquet --output data/train.parquet
    python -m data_preprocess.search_r1_nq_hotpotqa --hub --split test --output data/test.parquet
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

HUB_NAME = "PeterJinGo/nq_hotpotqa_train"


def _answers(example: Mapping[str, Any], idx: int) -> list[str]:
    value = example.get("golden_answers")
    if value is None:
        reward_model = example.get("reward_model")
        if isinstance(reward_model, Mapping) and isinstance(reward_model.get("ground_truth"), Mapping):
            value = reward_model["ground_truth"].get("target")
    if value is None:
        raise RowError(f"row {idx}: missing field 'golden_answers' (or reward_model.ground_truth.target)")
    return as_answer_list(value)


def make_row(
    example: Mapping[str, Any], split: str, idx: int, *, agent_name: str | None = None, action_space: str = "search_r1"
) -> dict[str, Any]:
    """Converts one NQ/HotpotQA record; ``data_source`` becomes ``searchR1_<source>`` (e.g. ``searchR1_nq``)."""
    question = clean_question(require(example, ["question"], idx), add_question_mark=True)
    if question in ("", "?"):
        raise RowError(f"row {idx}: empty question")
    answers = _answers(example, idx)
    if not answers:
        raise RowError(f"row {idx}: no non-empty answer")
    source = str(example.get("data_source") or "nq_hotpotqa")
    data_source = source if source.startswith("searchR1_") else f"searchR1_{source}"
    return make_search_row(
        data_source=data_source,
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
    add_common_args(parser, default_split="train")
    args = parser.parse_args(argv)
    records = load_hub_records(HUB_NAME, args.split) if args.hub else read_records(args.input, keep_bad=True)
    make = lambda ex, i: make_row(ex, args.split, i, agent_name=args.agent_name, action_space=args.action_space)  # noqa: E731
    return run(records, make, args, "nq+hotpotqa")


if __name__ == "__main__":
    sys.exit(main())
