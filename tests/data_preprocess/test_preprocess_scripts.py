"""The three preprocessing scripts: row schema, bad rows, --skip-bad, atomic writes, and reading back with verl."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_preprocess import asearcher_base, common, qa_test_sets, search_r1_nq_hotpotqa
from data_preprocess.common import INSTRUCTION_TEMPLATE, SYSTEM_PROMPT, RowError

NQ_HOTPOT = [
    {"id": "train_0", "question": "who wrote hamlet", "golden_answers": ["Shakespeare", "William Shakespeare"],
     "data_source": "nq"},
    {"id": "train_1", "question": "Which city is the capital of France?", "golden_answers": np.array(["Paris"]),
     "data_source": "hotpotqa"},
    # Search-R1's processed copies keep answers under reward_model instead of golden_answers.
    {"id": "train_2", "question": "highest mountain", "data_source": "nq",
     "reward_model": {"ground_truth": {"target": ["Mount Everest", "Everest"]}, "style": "rule"}},
]  # fmt: skip
ASEARCHER = [
    {"qid": "q1", "question": "Which painter used pointillism?", "answer": "Georges Seurat",
     "aug_answer": ["Seurat", "Georges Seurat"], "source": "wiki"},
    {"id": 17, "question": "Year of the moon landing?", "answer": [1969]},  # LRM-style id, numeric answer
]  # fmt: skip
FLASHRAG = [
    {"id": "test_0", "question": "who is the author of the hobbit", "golden_answers": ["J. R. R. Tolkien", "Tolkien"]},
    {"id": "test_1", "question": "When was Bamboogle released?", "golden_answers": ["2022"]},
]


def check_schema(row: dict, *, data_source: str, question: str, answers: list[str], split: str, idx: int) -> None:
    """Checks every column of one output row."""
    assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info", "agent_name"}
    assert row["data_source"] == data_source
    assert row["prompt"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": INSTRUCTION_TEMPLATE.format(question=question)},
    ]
    assert "<search>" in row["prompt"][1]["content"] and "<answer>" in row["prompt"][1]["content"]
    assert row["ability"] == "fact-reasoning"
    assert row["reward_model"]["style"] == "rule"
    assert row["reward_model"]["ground_truth"]["target"] == answers
    extra = row["extra_info"]
    assert (extra["index"], extra["split"], extra["question"], extra["need_tools_kwargs"]) == (
        idx,
        split,
        question,
        True,
    )
    assert extra["tools_kwargs"] == {"search": {"create_kwargs": {"data_source": data_source, "question_index": idx}}}
    assert row["agent_name"] == ("carl_agent" if split == "train" else "carl_chain_agent")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, default=lambda a: a.tolist()) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------- make_row


def test_search_r1_rows():
    rows = [search_r1_nq_hotpotqa.make_row(ex, "train", i) for i, ex in enumerate(NQ_HOTPOT)]
    check_schema(rows[0], data_source="searchR1_nq", question="who wrote hamlet?",
                 answers=["Shakespeare", "William Shakespeare"], split="train", idx=0)  # fmt: skip
    check_schema(rows[1], data_source="searchR1_hotpotqa", question="Which city is the capital of France?",
                 answers=["Paris"], split="train", idx=1)  # fmt: skip
    check_schema(rows[2], data_source="searchR1_nq", question="highest mountain?",
                 answers=["Mount Everest", "Everest"], split="train", idx=2)  # fmt: skip
    assert rows[0]["extra_info"]["source_id"] == "train_0"


def test_asearcher_rows():
    rows = [asearcher_base.make_row(ex, "train", i) for i, ex in enumerate(ASEARCHER)]
    check_schema(rows[0], data_source="asearcher_base", question="Which painter used pointillism?",
                 answers=["Georges Seurat"], split="train", idx=0)  # fmt: skip
    # Augmented aliases are kept apart (the reward uses them only with aug_weight > 0), minus exact duplicates.
    assert rows[0]["reward_model"]["ground_truth"]["aug_target"] == ["Seurat"]
    assert rows[0]["extra_info"]["source_id"] == "q1" and rows[0]["extra_info"]["source"] == "wiki"
    check_schema(rows[1], data_source="asearcher_base", question="Year of the moon landing?",
                 answers=["1969"], split="train", idx=1)  # fmt: skip
    assert rows[1]["extra_info"]["source_id"] == "17"


@pytest.mark.parametrize("dataset", qa_test_sets.DATASETS)
def test_qa_test_set_rows(dataset):
    row = qa_test_sets.make_row(FLASHRAG[0], "test", 5, dataset=dataset)
    check_schema(row, data_source=f"searchR1_{dataset}", question="who is the author of the hobbit?",
                 answers=["J. R. R. Tolkien", "Tolkien"], split="test", idx=5)  # fmt: skip


def test_agent_name_override():
    row = qa_test_sets.make_row(FLASHRAG[0], "test", 5, dataset="nq", agent_name="carl_tree_agent")
    assert row["agent_name"] == "carl_tree_agent"


def test_agent_name_is_configurable():
    row = qa_test_sets.make_row(FLASHRAG[0], "test", 0, dataset="nq", agent_name="carl_eval_agent")
    assert row["agent_name"] == "carl_eval_agent"


SR1 = search_r1_nq_hotpotqa.make_row
ASR = asearcher_base.make_row
QA = qa_test_sets.make_row


@pytest.mark.parametrize(
    ("make", "example", "message"),
    [
        (lambda ex: SR1(ex, "train", 4), {"golden_answers": ["x"]}, "row 4: missing field 'question'"),
        (lambda ex: SR1(ex, "train", 4), {"question": "q"}, "row 4: missing field 'golden_answers'"),
        (lambda ex: SR1(ex, "train", 4), {"question": "  ", "golden_answers": ["x"]}, "row 4: empty question"),
        (lambda ex: ASR(ex, "train", 4), {"question": "q", "answer": ["", " "]}, "row 4: no non-empty answer"),
        (lambda ex: ASR(ex, "train", 4), {"question": "q"}, "row 4: missing field 'answer'"),
        (lambda ex: QA(ex, "test", 4, dataset="nq"), {"question": "q", "golden_answers": []}, "row 4: no non-empty"),
    ],
)
def test_bad_rows_name_the_row(make, example, message):
    with pytest.raises(RowError, match=message):
        make(example)


def test_wrong_types_are_rejected():
    with pytest.raises(TypeError, match="question must be a string"):
        asearcher_base.make_row({"question": 3, "answer": "x"}, "train", 0)
    with pytest.raises(TypeError, match="answers must be strings"):
        asearcher_base.make_row({"question": "q", "answer": [{"x": 1}]}, "train", 0)
    with pytest.raises(ValueError, match="unknown dataset 'nqq'"):
        qa_test_sets.make_row(FLASHRAG[0], "test", 0, dataset="nqq")


# --------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_cli_writes_parquet_from_jsonl_or_parquet(tmp_path, fmt, capsys):
    if fmt == "jsonl":
        source = write_jsonl(tmp_path / "in.jsonl", NQ_HOTPOT)
    else:
        source = tmp_path / "in.parquet"
        pd.DataFrame(FLASHRAG).to_parquet(source)
    out = tmp_path / "out" / "rows.parquet"
    if fmt == "jsonl":
        code = search_r1_nq_hotpotqa.main(["--input", str(source), "--output", str(out), "--no-progress"])
    else:
        code = qa_test_sets.main(
            ["--dataset", "bamboogle", "--input", str(source), "--output", str(out), "--no-progress"]
        )
    assert code == 0
    df = pd.read_parquet(out)
    assert len(df) == (3 if fmt == "jsonl" else 2)
    assert list(df.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info", "agent_name"]
    first = df.iloc[0]
    assert list(first["reward_model"]["ground_truth"]["target"]) == (
        ["Shakespeare", "William Shakespeare"] if fmt == "jsonl" else ["J. R. R. Tolkien", "Tolkien"]
    )
    assert f"wrote {len(df)} rows" in capsys.readouterr().out


def test_cli_bad_row_fails_naming_it_and_skip_bad_counts(tmp_path, capsys):
    records = [ASEARCHER[0], {"question": "no answer here"}, ASEARCHER[1], {"answer": "no question"}]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.parquet"

    assert asearcher_base.main(["--input", str(source), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "row 1: missing field 'answer'" in err and "--skip-bad" in err
    assert not out.exists()

    assert asearcher_base.main(["--input", str(source), "--output", str(out), "--skip-bad", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "wrote 2 rows" in summary and "skipped 2 bad rows" in summary
    df = pd.read_parquet(out)
    assert list(df["extra_info"].map(lambda e: e["source_id"])) == ["q1", "17"]


def test_cli_skip_bad_summary_line(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [FLASHRAG[0], {"question": "x"}, FLASHRAG[1]])
    out = tmp_path / "out.parquet"
    assert (
        qa_test_sets.main(
            ["--dataset", "nq", "--input", str(source), "--output", str(out), "--skip-bad", "--no-progress"]
        )
        == 0
    )
    assert capsys.readouterr().out.strip().endswith("(skipped 1 bad rows)")


def test_cli_limit_and_missing_input(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", NQ_HOTPOT)
    out = tmp_path / "out.parquet"
    assert (
        search_r1_nq_hotpotqa.main(["--input", str(source), "--output", str(out), "--limit", "2", "--no-progress"]) == 0
    )
    assert len(pd.read_parquet(out)) == 2
    assert search_r1_nq_hotpotqa.main(["--input", str(tmp_path / "nope.jsonl"), "--output", str(out)]) == 2
    assert "input file not found" in capsys.readouterr().err


def test_bad_json_input_line_is_named(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(FLASHRAG[0]) + "\n{oops\n")
    assert qa_test_sets.main(["--dataset", "nq", "--input", str(source), "--output", str(tmp_path / "o.parquet")]) == 2
    assert "in.jsonl:2: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["qa_test_sets", "search_r1_nq_hotpotqa", "asearcher_base"])
def test_skip_bad_skips_malformed_json_and_non_utf8_lines(tmp_path, capsys, script):
    # Valid for every script: a question, golden_answers (FlashRAG, Search-R1) and answer (ASearcher).
    good = [{"question": f"who is number {i}", "golden_answers": [str(i)], "answer": str(i)} for i in range(3)]
    lines = [json.dumps(good[0]).encode(), b"{oops", json.dumps(good[1]).encode(),
             '{"question": "caf\u00e9", "answer": "x"}'.encode("latin-1"), json.dumps(good[2]).encode()]  # fmt: skip
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.parquet"
    module = {"qa_test_sets": qa_test_sets, "search_r1_nq_hotpotqa": search_r1_nq_hotpotqa}.get(script, asearcher_base)
    extra = ["--dataset", "nq"] if script == "qa_test_sets" else []
    base = [*extra, "--input", str(source), "--output", str(out), "--no-progress"]

    assert module.main(base) == 2
    assert f"{source}:2: not valid JSON" in capsys.readouterr().err and not out.exists()

    assert module.main([*base, "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "wrote 3 rows" in captured.out and "skipped 2 bad rows" in captured.out
    assert f"skipped: {source}:2: not valid JSON" in captured.err and "(and 1 more)" in captured.err
    assert list(pd.read_parquet(out)["extra_info"].map(lambda e: e["index"])) == [0, 2, 4]


def test_non_utf8_line_names_file_and_line(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_bytes(json.dumps(FLASHRAG[0]).encode() + b"\n" + '{"question": "caf\u00e9"}\n'.encode("latin-1"))
    assert qa_test_sets.main(["--dataset", "nq", "--input", str(source), "--output", str(tmp_path / "o.parquet")]) == 2
    assert f"{source}:2: not valid UTF-8 (invalid continuation byte" in capsys.readouterr().err


def test_output_is_readable_by_others(tmp_path):
    umask = os.umask(0o022)
    try:
        out = common.write_parquet_atomic(
            [qa_test_sets.make_row(FLASHRAG[0], "test", 0, dataset="nq")], tmp_path / "o.parquet"
        )
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


# --------------------------------------------------------------------------------------------------- atomic write


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_no_output_and_keeps_the_old_file(tmp_path, monkeypatch, failure):
    out = tmp_path / "rows.parquet"
    rows = [qa_test_sets.make_row(FLASHRAG[0], "test", 0, dataset="nq")]
    common.write_parquet_atomic(rows, out)
    before = out.read_bytes()

    real_to_parquet = pd.DataFrame.to_parquet

    def half_write_then_fail(self, path, *args, **kwargs):
        real_to_parquet(self, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:20])  # a truncated file on disk ...
        raise failure  # ... and then the failure (or Ctrl-C) strikes

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_write_then_fail)
    with pytest.raises(type(failure)):
        common.write_parquet_atomic(rows * 2, out)
    assert out.read_bytes() == before  # old output untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.parquet"]  # no temp file left

    fresh = tmp_path / "fresh.parquet"
    with pytest.raises(type(failure)):
        common.write_parquet_atomic(rows, fresh)
    assert not fresh.exists()


def test_no_rows_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no rows to write"):
        common.write_parquet_atomic([], tmp_path / "x.parquet")


# --------------------------------------------------------------------------------------------------- verl


def test_verl_rlhf_dataset_reads_the_output(tmp_path, monkeypatch):
    """verl's RLHFDataset loads the parquet, tokenises the prompt with a chat template and exposes tools_kwargs."""
    import datasets
    from omegaconf import OmegaConf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    from verl.utils.dataset.rl_dataset import RLHFDataset

    out = tmp_path / "train.parquet"
    source = write_jsonl(tmp_path / "in.jsonl", ASEARCHER)
    assert asearcher_base.main(["--input", str(source), "--output", str(out), "--no-progress"]) == 0

    # A tiny offline word-level tokenizer with a ChatML template (no model hub at test time).
    vocab = {"[UNK]": 0, "[PAD]": 1, "<|im_start|>": 2, "<|im_end|>": 3}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = OmegaConf.create(
        {"max_prompt_length": 1024, "filter_overlong_prompts": True, "filter_overlong_prompts_workers": 1,
         "cache_dir": str(tmp_path / "verl_cache")}
    )  # fmt: skip
    dataset = RLHFDataset(str(out), tokenizer, config)
    assert len(dataset) == 2  # nothing filtered as too long or unreadable
    item = dataset[0]
    assert item["raw_prompt"][1]["content"].endswith("Question: Which painter used pointillism?")
    assert item["agent_name"] == "carl_agent" and item["index"] == 0  # --split train (asearcher's default)
    assert item["tools_kwargs"] == {"search": {"create_kwargs": {"data_source": "asearcher_base", "question_index": 0}}}
    assert item["reward_model"]["ground_truth"] == {"target": ["Georges Seurat"], "aug_target": ["Seurat"]}


# ----------------------------------------------------------------------------------------- --per-source sample
#: Search-R1's test split in small: three data sources of 20, 12 and 3 questions, interleaved as a file may be.
TEST_SPLIT = [
    {"question": f"{source} question {i}", "golden_answers": [f"a{i}"], "data_source": source}
    for i in range(20)
    for source in ("nq", "hotpotqa", "bamboogle")
    if (source == "nq") or (source == "hotpotqa" and i < 12) or (source == "bamboogle" and i < 3)
]


def sample_cli(tmp_path, *flags, records=TEST_SPLIT, name="val"):
    source = write_jsonl(tmp_path / f"{name}_in.jsonl", records)
    out, rest = tmp_path / f"{name}.parquet", tmp_path / f"{name}_rest.parquet"
    argv = ["--input", str(source), "--output", str(out), "--split", "test", "--no-progress", *flags]
    code = search_r1_nq_hotpotqa.main([a.replace("REST", str(rest)) for a in argv])
    return code, out, rest


def questions(path) -> list[str]:
    return [e["question"] for e in pd.read_parquet(path)["extra_info"]]


def test_per_source_samples_each_test_set_and_keeps_the_rest(tmp_path, capsys):
    code, out, rest = sample_cli(tmp_path, "--per-source", "5", "--rest-output", "REST")
    assert code == 0
    val = pd.read_parquet(out)
    assert val["data_source"].value_counts().to_dict() == {
        "searchR1_nq": 5,
        "searchR1_hotpotqa": 5,
        "searchR1_bamboogle": 3,
    }
    assert set(questions(out)).isdisjoint(questions(rest))
    assert sorted(questions(out) + questions(rest)) == sorted(r["question"] + "?" for r in TEST_SPLIT)
    order = [r["question"] + "?" for r in TEST_SPLIT]
    assert questions(out) == sorted(questions(out), key=order.index)  # input order kept
    assert (val["agent_name"] == "carl_chain_agent").all()  # validation rows never grow trees
    printed = " ".join(capsys.readouterr().out.split())
    assert "searchR1_nq: 5 of 20" in printed and "searchR1_bamboogle: 3 of 3" in printed
    assert "fewer rows than --per-source 5, all taken: searchR1_bamboogle" in printed
    assert "wrote the other 22 rows" in printed


def test_per_source_is_seeded_and_each_sources_draw_is_its_own(tmp_path):
    first = questions(sample_cli(tmp_path, "--per-source", "5", name="a")[1])
    assert questions(sample_cli(tmp_path, "--per-source", "5", name="b")[1]) == first
    other_seed = questions(sample_cli(tmp_path, "--per-source", "5", "--seed", "1", name="c")[1])
    assert [q for q in other_seed if q.startswith("nq")] != [q for q in first if q.startswith("nq")]
    without_hotpotqa = [r for r in TEST_SPLIT if r["data_source"] != "hotpotqa"]
    alone = questions(sample_cli(tmp_path, "--per-source", "5", records=without_hotpotqa, name="d")[1])
    assert [q for q in alone if q.startswith("nq")] == [q for q in first if q.startswith("nq")]


def test_per_source_draws_every_row_equally_often():
    """Over 4,000 seeds, each of 20 rows is drawn with probability 5/20 (binomial sd 0.0068: 5 sd allowed)."""
    rows = [{"data_source": "nq", "i": i} for i in range(20)]
    hits = np.zeros(20)
    for seed in range(4_000):
        for row in common.sample_per_source(rows, 5, seed).rows:
            hits[row["i"]] += 1
    assert np.abs(hits / 4_000 - 0.25).max() < 5 * 0.0068


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--per-source", "0"], "--per-source 0: must be >= 1"),
        (["--rest-output", "REST"], "--rest-output needs --per-source"),
    ],
)
def test_per_source_bad_flags_are_named(flags, message, tmp_path, capsys):
    code, out, _ = sample_cli(tmp_path, *flags)
    assert code == 2 and message in capsys.readouterr().err and not out.exists()


def test_limit_then_per_source(tmp_path):
    """--limit keeps its meaning (the first N records), and the sample is drawn from those."""
    code, out, _ = sample_cli(tmp_path, "--limit", "9", "--per-source", "2")
    assert code == 0
    assert pd.read_parquet(out)["data_source"].value_counts().to_dict() == {
        "searchR1_nq": 2,
        "searchR1_hotpotqa": 2,
        "searchR1_bamboogle": 2,
    }


@pytest.mark.parametrize("script", ["asearcher_base", "qa_test_sets", "search_r1_nq_hotpotqa"])
def test_the_paper_action_space_gets_its_own_instruction(tmp_path, script):
    """--action-space paper: the prompt names <access> and <read> (algorithm.carl.action_space=paper); the default
    prompt is Search-R1's, unchanged."""
    from recipe.carl.search.action_space import PAPER_INSTRUCTION_TEMPLATE

    module = {"qa_test_sets": qa_test_sets, "search_r1_nq_hotpotqa": search_r1_nq_hotpotqa}.get(script, asearcher_base)
    examples = {"asearcher_base": ASEARCHER, "qa_test_sets": NQ_HOTPOT[:2], "search_r1_nq_hotpotqa": NQ_HOTPOT[:2]}
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(ex, default=list) + "\n" for ex in examples[script]))
    extra = ["--dataset", "nq"] if script == "qa_test_sets" else []
    for space, template in (("paper", PAPER_INSTRUCTION_TEMPLATE), ("search_r1", INSTRUCTION_TEMPLATE)):
        out = tmp_path / f"{space}.parquet"
        args = ["--input", str(source), "--output", str(out), "--no-progress", "--action-space", space, *extra]
        assert module.main(args) == 0
        row = pd.read_parquet(out).iloc[0]
        question = row["extra_info"]["question"]
        assert row["prompt"][1]["content"] == template.format(question=question)
    assert "<access> id </access>" in PAPER_INSTRUCTION_TEMPLATE and "<read> </read>" in PAPER_INSTRUCTION_TEMPLATE
