"""ASearcher-Base training data -> verl RLHFDataset parquet (CARL's training set: "valid subset of ASearcher-base").

Source: ``inclusionAI/ASearcher-train-data``, split ``ASearcherBase35k`` (file ``ASearcher-Base-35k.jsonl``).
Field names are taken from ASearcher's training code (``ASearcher/utils/search_tool.py`` reads ``answer`` and
``aug_answer``; ``train/asearcher.py`` reads ``question`` and an id from ``query_id``/``id``/``qid``) and from
third-party converters that name ``qid`` for the Base split and ``id`` for the LRM split. Assumed per record:

* ``question``: str (required);
* ``answer``: str or list of str (required) -> ``ground_truth.target``;
* ``aug_answer``: list of str (optional; LLM-augmented aliases) -> ``ground_truth.aug_target``, which the reward
  uses only with ``aug_weight > 0`` (ASearcher mixes them in at 0.3);
* ``qid`` / ``id`` / ``idx`` and ``source``: kept in ``extra_info`` as ``source_id`` / ``source``.

Not reproduced: the paper trains on a "valid subset" without saying how it was selected; this script keeps every
record with a question and an answer (``--skip-bad`` drops the rest).

    python -m data_preprocess.asearcher_base --input ASearcher-Base-35k.jsonl --output data/asearcher_train.parquet
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

HUB_NAME = "inclusionAI/ASearcher-train-data"
HUB_SPLIT = "ASearcherBase35k"
DATA_SOURCE = "asearcher_base"


def make_row(
    example: Mapping[str, Any], split: str, idx: int, *, agent_name: str | None = None, action_space: str = "search_r1"
) -> dict[str, Any]:
    """Converts one ASearcher record (fields in the module docstring)."""
    question = clean_question(require(example, ["question"], idx))
    if not question:
        raise RowError(f"row {idx}: empty question")
    answers = as_answer_list(require(example, ["answer"], idx))
    if not answers:
        raise RowError(f"row {idx}: no non-empty answer")
    aug = example.get("aug_answer")
    aug_answers = [a for a in as_answer_list(aug) if a not in answers] if aug is not None else []
    return make_search_row(
        data_source=DATA_SOURCE,
        question=question,
        answers=answers,
        aug_answers=aug_answers,
        split=split,
        idx=idx,
        agent_name=agent_name,
        source_id=next((example[k] for k in ("qid", "id", "idx") if example.get(k) is not None), None),
        extra={"source": None if example.get("source") is None else str(example["source"])},
        action_space=action_space,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, default_split="train")
    args = parser.parse_args(argv)
    records = load_hub_records(HUB_NAME, HUB_SPLIT) if args.hub else read_records(args.input, keep_bad=True)
    make = lambda ex, i: make_row(ex, args.split, i, agent_name=args.agent_name, action_space=args.action_space)  # noqa: E731
    return run(records, make, args, "asearcher")


if __name__ == "__main__":
    sys.exit(main())
