"""data_preprocess.common helpers: answer and question cleaning, record readers, row validation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_preprocess.common import (
    BadRecord,
    RowError,
    as_answer_list,
    clean_question,
    convert,
    end_question,
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
    (tmp_path / "r.csv").write_text('question,golden_answers\nq1,a\n"q2, with a comma",b\n')
    assert list(read_records(tmp_path / "r.csv")) == [
        {"question": "q1", "golden_answers": "a"},
        {"question": "q2, with a comma", "golden_answers": "b"},
    ]
    (tmp_path / "r.tsv").write_text("question\nq")
    with pytest.raises(ValueError, match="unsupported input format '.tsv'"):
        list(read_records(tmp_path / "r.tsv"))


LATIN1 = '{"question": "caf\u00e9?", "golden_answers": ["x"]}\n'.encode("latin-1")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", b'{"question": "q"}\n{oops\n', r"bad.jsonl:2: not valid JSON \(Expecting property name"),
        ("bad.jsonl", b'{"question": "q"}\n' + LATIN1, r"bad.jsonl:2: not valid UTF-8 \(invalid continuation byte"),
        ("bad.csv", b"question,answers\nq,a\ncaf\xe9,b\n", r"bad.csv:3: not valid UTF-8"),
        ("bad.csv", b"question,answers\nq,a,extra\n", r"bad.csv:2: 3 cells, the header has 2"),
        ("bad.json", b'[{"question": "q"},\n' + LATIN1 + b"]", r"bad.json:2: not valid UTF-8 .*whole .json file"),
        ("bad.json", b'[{"question": "q"},\n{oops}]', r"bad.json:2: not valid JSON .*whole .json file"),
    ],
)
def test_unreadable_lines_name_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(RowError, match=message):
        list(read_records(tmp_path / name))


def test_keep_bad_yields_unreadable_lines_as_bad_records_and_goes_on(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"question": "q1"}\n{oops\n' + LATIN1 + b'{"question": "q4"}\n')
    records = list(read_records(path, keep_bad=True))
    assert records[0] == {"question": "q1"} and records[3] == {"question": "q4"}
    assert [r.message.split(": ")[0] for r in records[1:3]] == [f"{path}:2", f"{path}:3"]
    assert all(isinstance(r, BadRecord) for r in records[1:3])


def test_end_question_adds_a_mark_only_to_unpunctuated_questions():
    auto = {
        "who wrote hamlet": "who wrote hamlet?",  # NQ style: Search-R1's prompt
        "In which year did the Berlin Wall fall": "In which year did the Berlin Wall fall?",
        "what's the tallest mountain": "what's the tallest mountain?",
        "Is Paris in France": "Is Paris in France?",
        "Name the capital of France.": "Name the capital of France.",  # an imperative stays as written
        "name the capital of france": "name the capital of france",
        "List three rivers in Spain": "List three rivers in Spain",
        'Who wrote "Hamlet."': 'Who wrote "Hamlet."',
        "Whoever wins": "Whoever wins",  # "who" must be a word of its own
        "Where is it?": "Where is it?",
        "": "",
    }
    assert {q: end_question(q, "auto") for q in auto} == auto
    assert end_question("Name the capital of France.", "always") == "Name the capital of France.?"  # Search-R1's rule
    assert end_question("who wrote hamlet", "never") == "who wrote hamlet"
    with pytest.raises(ValueError, match="one of auto, always, never"):
        end_question("q", "sometimes")


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
    with pytest.raises(RowError, match=r"^in.jsonl: row 1: 'question' \(pass --skip-bad"):
        convert([1, None], make, progress=False, source="in.jsonl")


def test_convert_treats_unreadable_lines_as_bad_rows():
    reasons = []
    records = [1, BadRecord("in.jsonl:2: not valid JSON (x)"), 2]
    rows, skipped = convert(records, lambda ex, idx: {"idx": idx}, skip_bad=True, progress=False,
                            skipped_reasons=reasons)  # fmt: skip
    assert rows == [{"idx": 0}, {"idx": 2}] and skipped == 1 and reasons == ["in.jsonl:2: not valid JSON (x)"]
    with pytest.raises(RowError, match=r"^in.jsonl:2: not valid JSON \(x\) \(pass --skip-bad"):
        convert(records, lambda ex, idx: {"idx": idx}, progress=False)
