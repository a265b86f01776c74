"""data_preprocess.common helpers: answer and question cleaning, record readers, row validation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_preprocess.common import (
    RowError,
    as_answer_list,
    clean_question,
    convert,
    make_search_row,
    read_records,
    validate_row,
)


@pytest.mark.parametrize(
    ("value", "aliases"),
    [
        ("Paris", ["Paris"]),
        (["Paris", " Paris ", "", "City of  Light"], ["Paris", "City of Light"]),  # stripped, deduplicated
        (np.array(["a", "b"], dtype=object), ["a", "b"]),
        ({"target": ["a"]}, ["a"]),
        ([1969, 2.5], ["1969", "2.5"]),
        ([], []),
    ],
)
def test_as_answer_list(value, aliases):
    assert as_answer_list(value) == aliases


@pytest.mark.parametrize("value", [None, {"answers": ["a"]}, [None], [True], [["nested"]]])
def test_as_answer_list_rejects(value):
    with pytest.raises(TypeError):
        as_answer_list(value)


def test_clean_question():
    assert clean_question("  who  wrote\nhamlet ", add_question_mark=True) == "who wrote hamlet?"
    assert clean_question("Is it?", add_question_mark=True) == "Is it?"
    assert clean_question("no mark") == "no mark"


def test_read_records_formats(tmp_path):
    records = [{"question": "q1", "golden_answers": ["a"]}, {"question": "q2", "golden_answers": ["b"]}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "r.json").write_text(json.dumps(records))
    pd.DataFrame(records).to_parquet(tmp_path / "r.parquet")
    for name in ("r.jsonl", "r.json", "r.parquet"):
        got = list(read_records(tmp_path / name))
        assert [r["question"] for r in got] == ["q1", "q2"]
        assert list(got[1]["golden_answers"]) == ["b"]
    (tmp_path / "r.csv").write_text("question\nq")
    with pytest.raises(ValueError, match="unsupported input format '.csv'"):
        list(read_records(tmp_path / "r.csv"))


def test_validate_row_names_the_row():
    row = make_search_row(data_source="d", question="q?", answers=["a"], split="train", idx=3)
    validate_row(row, 3)
    with pytest.raises(RowError, match="row 7: ground truth needs at least one"):
        validate_row({**row, "reward_model": {"ground_truth": {"target": []}}}, 7)
    with pytest.raises(RowError, match=r"row 7: missing columns \['agent_name'\]"):
        validate_row({k: v for k, v in row.items() if k != "agent_name"}, 7)
    with pytest.raises(RowError, match="row 9: empty question"):
        make_search_row(data_source="d", question=" ", answers=["a"], split="train", idx=9)


def test_convert_counts_skips_and_names_first_bad_row():
    def make(example, idx):
        if example is None:
            raise KeyError("question")
        return {"idx": idx}

    rows, skipped = convert([1, None, 2, None], make, skip_bad=True, progress=False)
    assert rows == [{"idx": 0}, {"idx": 2}] and skipped == 2
    with pytest.raises(RowError, match=r"row 1: 'question' \(pass --skip-bad"):
        convert([1, None], make, progress=False)
