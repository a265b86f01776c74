"""The generic QA-file entry: every input format, configurable fields, the user's data_source, question marks, errors
that name file, row and field, and outputs that others can read and verl can load."""

from __future__ import annotations

import json
import os
import stat

import pandas as pd
import pytest

from data_preprocess import qa_file
from data_preprocess.common import INSTRUCTION_TEMPLATE, SYSTEM_PROMPT, RowError

RECORDS = [
    {"id": "a1", "question": "Name the capital of France.", "answers": ["Paris"]},
    {"id": "a2", "question": "who wrote hamlet", "answers": ["Shakespeare", "William Shakespeare"]},
    {"id": "a3", "question": "In which year did the Berlin Wall fall?", "answers": "1989"},
]
EXPECTED_QUESTIONS = ["Name the capital of France.", "who wrote hamlet?", "In which year did the Berlin Wall fall?"]
EXPECTED_ANSWERS = [["Paris"], ["Shakespeare", "William Shakespeare"], ["1989"]]


def write_input(path, records, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "json":
        path.write_text(json.dumps(records))
    elif fmt == "parquet":
        pd.DataFrame([{**r, "answers": r["answers"] if isinstance(r["answers"], list) else [r["answers"]]}
                      for r in records]).to_parquet(path)  # fmt: skip
    else:  # csv: answers as a JSON list in the cell
        cell = lambda a: json.dumps(a) if isinstance(a, list) else a  # noqa: E731
        frame = pd.DataFrame([{**r, "answers": cell(r["answers"])} for r in records])
        frame.to_csv(path, index=False)
    return path


def run_cli(tmp_path, source, *extra):
    out = tmp_path / "out" / "myqa_test.parquet"
    args = ["--input", str(source), "--data-source", "myqa", "--split", "test", "--output", str(out), "--no-progress"]
    return qa_file.main([*args, *extra]), out


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv"])
def test_every_format_gives_the_same_rows(tmp_path, fmt, capsys):
    source = write_input(tmp_path / f"my.{fmt}", RECORDS, fmt)
    code, out = run_cli(tmp_path, source)
    assert code == 0, capsys.readouterr().err
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info", "agent_name"]
    assert set(frame["data_source"]) == {"myqa"} and set(frame["agent_name"]) == {"carl_chain_agent"}
    for i, row in frame.iterrows():
        assert row["extra_info"]["question"] == EXPECTED_QUESTIONS[i]
        assert row["extra_info"]["index"] == i and row["extra_info"]["source_id"] == RECORDS[i]["id"]
        assert list(row["reward_model"]["ground_truth"]["target"]) == EXPECTED_ANSWERS[i]
        assert [dict(m) for m in row["prompt"]] == [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": INSTRUCTION_TEMPLATE.format(question=EXPECTED_QUESTIONS[i])},
        ]
        create_kwargs = row["extra_info"]["tools_kwargs"]["search"]["create_kwargs"]
        assert create_kwargs == {"data_source": "myqa", "question_index": i}
    assert "wrote 3 rows" in capsys.readouterr().out


def test_output_is_readable_by_others(tmp_path):
    umask = os.umask(0o022)
    try:
        code, out = run_cli(tmp_path, write_input(tmp_path / "my.jsonl", RECORDS, "jsonl"))
    finally:
        os.umask(umask)
    assert code == 0 and stat.S_IMODE(out.stat().st_mode) == 0o644


def test_field_names_separator_split_and_question_mark_modes(tmp_path):
    source = tmp_path / "my.csv"
    source.write_text("qid,q,gold\n7,Name the capital of France,Paris|City of Light\n8,who wrote hamlet,Shakespeare\n")
    flags = ["--question-field", "q", "--answers-field", "gold", "--id-field", "qid", "--answer-sep", "|"]
    for mode, questions in [
        ("auto", ["Name the capital of France", "who wrote hamlet?"]),
        ("never", ["Name the capital of France", "who wrote hamlet"]),
        ("always", ["Name the capital of France?", "who wrote hamlet?"]),
    ]:
        code, out = run_cli(tmp_path, source, *flags, "--question-mark", mode)
        assert code == 0
        frame = pd.read_parquet(out)
        assert list(frame["extra_info"].map(lambda e: e["question"])) == questions
    assert list(frame["reward_model"].iloc[0]["ground_truth"]["target"]) == ["Paris", "City of Light"]
    assert list(frame["extra_info"].map(lambda e: e["source_id"])) == ["7", "8"]


def test_train_split_rows_grow_trees(tmp_path):
    source = write_input(tmp_path / "my.jsonl", RECORDS, "jsonl")
    out = tmp_path / "train.parquet"
    args = ["--input", str(source), "--data-source", "myqa", "--split", "train", "--output", str(out), "--no-progress"]
    assert qa_file.main(args) == 0
    assert set(pd.read_parquet(out)["agent_name"]) == {"carl_agent"}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"query": "q", "answers": ["a"]},
            r"row 1: missing field 'question' \(the record has \['answers', 'query'\]\); "
            r"use --question-field query",
        ),  # fmt: skip
        (
            {"question": "q", "golden_answers": ["a"]},
            "row 1: missing field 'answers' .*use --answers-field golden_answers",
        ),
        ({"question": "q", "x": 1}, "row 1: missing field 'answers' .*name the field with --answers-field"),
        ({"question": 3, "answers": ["a"]}, "row 1: field 'question' must be a string, got int"),
        ({"question": "  ", "answers": ["a"]}, "row 1: field 'question' is empty"),
        ({"question": "q", "answers": ["", " "]}, "row 1: field 'answers' holds no non-empty answer"),
        ({"question": "q", "answers": [{"x": 1}]}, "row 1: field 'answers': answers must be strings"),
        ({"question": "q", "answers": "[not json"}, "row 1: field 'answers' starts with '\\[' but is not a JSON list"),
    ],
)
def test_errors_name_the_file_the_row_and_the_field(tmp_path, capsys, record, message):
    source = write_input(tmp_path / "my.jsonl", [RECORDS[0], record], "jsonl")
    code, out = run_cli(tmp_path, source)
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert f"error: {source}: " in err and "(pass --skip-bad" in err
    with pytest.raises(RowError, match=message):
        qa_file.make_row(record, "test", 1, data_source="myqa")


def test_skip_bad_skips_unreadable_lines_and_bad_rows(tmp_path, capsys):
    source = tmp_path / "my.jsonl"
    source.write_bytes(
        json.dumps(RECORDS[0]).encode() + b"\n{oops\n" + b'{"question": "caf\xe9", "answers": ["x"]}\n'
        + json.dumps({"question": "no answers"}).encode() + b"\n" + json.dumps(RECORDS[1]).encode() + b"\n"
    )  # fmt: skip
    code, out = run_cli(tmp_path, source, "--skip-bad")
    captured = capsys.readouterr()
    assert code == 0 and "wrote 2 rows" in captured.out and "skipped 3 bad rows" in captured.out
    assert f"skipped: {source}:2: not valid JSON" in captured.err


def test_data_source_is_required_and_not_empty(tmp_path, capsys):
    source = write_input(tmp_path / "my.jsonl", RECORDS, "jsonl")
    with pytest.raises(SystemExit):
        qa_file.main(["--input", str(source), "--output", str(tmp_path / "o.parquet")])
    assert "--data-source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        qa_file.main(["--input", str(source), "--output", str(tmp_path / "o.parquet"), "--data-source", " "])
    assert "--data-source must not be empty" in capsys.readouterr().err


def test_verl_rlhf_dataset_reads_the_output(tmp_path, monkeypatch):
    import datasets
    from omegaconf import OmegaConf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    from verl.utils.dataset.rl_dataset import RLHFDataset

    code, out = run_cli(tmp_path, write_input(tmp_path / "my.csv", RECORDS, "csv"))
    assert code == 0
    backend = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "[PAD]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    config = OmegaConf.create({"max_prompt_length": 1024, "cache_dir": str(tmp_path / "verl_cache")})
    dataset = RLHFDataset(str(out), tokenizer, config)
    assert len(dataset) == 3
    assert dataset[0]["raw_prompt"][1]["content"].endswith("Question: Name the capital of France.")
    assert list(dataset[1]["reward_model"]["ground_truth"]["target"]) == ["Shakespeare", "William Shakespeare"]
