"""`python -m recipe.carl.evaluate`: per-question lines written as questions finish, a crashed evaluation resumed
with only the missing questions, and the macro average over data sets (shipped tiny policy, greedy, hf engine)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from recipe.carl.evaluate import runner
from recipe.carl.evaluate.cli import main
from recipe.carl.evaluate.report import compare_macro
from tests.recipe.evaluate.common import DEMO_FLAGS, SHIPPED


@pytest.fixture(scope="module")
def two_sets(data_dir, tmp_path_factory):
    """The SynthHop test questions as two data sets of 4 and 2 questions (so macro != pooled mean can show)."""
    out = tmp_path_factory.mktemp("two_sets")
    frame = pd.read_parquet(data_dir / "test.parquet")
    files = []
    for name, part in (("set_a", frame.iloc[:4]), ("set_b", frame.iloc[4:6])):
        path = out / f"{name}.parquet"
        part.assign(data_source=name).to_parquet(path)
        files.append(str(path))
    return files


def evaluate(out, files, url, *extra):
    argv = ["--model", str(SHIPPED), "--data", *files, "--out", str(out), "--retriever-url", url, "--engine", "hf"]
    return main([*argv, *DEMO_FLAGS, *extra])


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_crashed_evaluation_resumes_with_the_missing_questions(two_sets, retriever_url, tmp_path, monkeypatch):
    full = evaluate(tmp_path / "full", two_sets, retriever_url)

    built = []
    real = runner.question_record

    def crash_on_the_fourth(*args):
        if len(built) == 3:
            raise RuntimeError("the node went away")
        built.append(1)
        return real(*args)

    monkeypatch.setattr(runner, "question_record", crash_on_the_fourth)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="went away"):
        evaluate(out, two_sets, retriever_url)
    written = lines(out / "sft_seed0" / "set_a.jsonl")
    assert len(written) == 3 and not (out / "results.json").exists()  # on disk as they finished

    monkeypatch.setattr(runner, "question_record", lambda *args: built.append(1) or real(*args))
    built.clear()
    resumed = evaluate(out, two_sets, retriever_url)
    assert len(built) == 6 - 3  # only the missing questions were rolled out
    for source in ("set_a", "set_b"):
        assert resumed["models"]["sft_seed0"]["tables"][source] == full["models"]["sft_seed0"]["tables"][source]
        assert [r["row"] for r in lines(out / "sft_seed0" / f"{source}.jsonl")] == list(
            range(4 if source == "set_a" else 2)
        )

    with pytest.raises(SystemExit, match=r"partial evaluation of something else \(it differs in: settings.max_actions"):
        (out / "results.json").unlink()
        evaluate(out, two_sets, retriever_url, "--max-actions", "3")
    built.clear()
    evaluate(out, two_sets, retriever_url, "--max-actions", "3", "--overwrite")
    assert len(built) == 6  # --overwrite starts over


def test_the_macro_average_weighs_each_data_set_once(two_sets, retriever_url, tmp_path):
    results = evaluate(tmp_path / "o", two_sets, retriever_url)
    info = results["models"]["sft_seed0"]
    a, b = info["tables"]["set_a"]["em"], info["tables"]["set_b"]["em"]
    assert info["macro"]["em"] == pytest.approx((a + b) / 2) and info["macro"]["data_sets"] == 2
    assert "macro average (2 data sets)" in (tmp_path / "o" / "results.md").read_text()


def record(source, row, em):
    return {"file": source, "row": row, "em": em, "f1": em, "format": 1.0, "reward": em}


def test_compare_macro_is_the_mean_of_the_data_sets_differences():
    # set a (4 questions): model 3/4, baseline 1/4 -> +0.5; set b (2): model 0/2, baseline 1/2 -> -0.5. Macro 0;
    # pooled over the 6 questions it would be (3 - 2) / 6.
    model = {"a": [record("a", i, float(i < 3)) for i in range(4)], "b": [record("b", i, 0.0) for i in range(2)]}
    base = {
        "a": [record("a", i, float(i == 0)) for i in range(4)],
        "b": [record("b", i, float(i == 0)) for i in range(2)],
    }
    macro = compare_macro(model, base)["em"]
    assert (macro["model"], macro["baseline"]) == (pytest.approx(0.375), pytest.approx(0.375))
    assert macro["diff"] == pytest.approx(0.0) and macro["low"] <= 0.0 <= macro["high"] and macro["data_sets"] == 2
