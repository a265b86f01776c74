"""`python -m recipe.carl.evaluate` on a checkpoint rolls out as the run that wrote it: the settings the run recorded
(`recipe.carl.run_record`) apply unless a flag is given; each flag that differs from the record is printed; a model
folder, and a checkpoint without a record, keep the defaults.

The model's turns are scripted (`ScriptedServer`), so that the settings the CLI hands the `Evaluator` are checked
without a real model running 2,048-token turns; searches go to the SynthHop retriever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from types import SimpleNamespace

import pytest

from recipe.carl.evaluate import cli
from recipe.carl.evaluate.models import recorded_run
from recipe.carl.evaluate.runner import Evaluator
from recipe.carl.evaluate.settings import EvalSettings, with_recorded
from recipe.carl.run_record import RUN_RECORD, run_record, write_run_record
from tests.recipe.evaluate.common import SHIPPED, ScriptedServer, fake_fsdp_checkpoint
from tests.recipe.test_carl_agent_loop import make_tokenizer
from tests.recipe.test_run_record import QWEN3_AGENT, qwen3_run_config

DEFAULTS = EvalSettings()


@pytest.fixture
def scripted(monkeypatch):
    """Replaces the engine with scripted turns; returns the settings each model was evaluated with."""
    seen: list[EvalSettings] = []

    async def evaluate_model(folder, datasets, settings, engine, search, reward_fn, engine_options=None, *_resume,
                             access=None):  # fmt: skip
        from transformers import AutoTokenizer

        seen.append(settings)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        out = {}
        for source, rows in datasets.items():
            evaluator = Evaluator(ScriptedServer(tokenizer, rows), tokenizer, search, reward_fn, settings)
            out[source] = await evaluator.evaluate_rows(rows)
        return out

    monkeypatch.setattr(cli, "evaluate_model", evaluate_model)
    return seen


@pytest.fixture
def qwen3_checkpoint(tmp_path):
    """`global_step_1/actor` of a run of scripts/run_carl_qwen3_4b.sh, with the record its trainer writes."""
    actor = fake_fsdp_checkpoint(tmp_path / "run", with_hf_weights=True)
    write_run_record(run_record(qwen3_run_config(tmp_path), global_step=1), actor.parent)
    return actor


def evaluate(tmp_path, data_dir, retriever_url, model, *flags):
    out = tmp_path / "eval"
    args = ["--model", str(model), "--data", str(data_dir / "test.parquet"), "--limit", "3", "--engine", "hf"]
    return main_json(out, [*args, "--out", str(out), "--retriever-url", retriever_url, "--overwrite", *flags])


def main_json(out, argv):
    cli.main(argv)
    return json.loads((out / "results.json").read_text())


def used(settings: EvalSettings) -> dict:
    return {key: getattr(settings, key) for key in QWEN3_AGENT}


def test_a_checkpoint_is_evaluated_with_the_settings_its_run_recorded(
    tmp_path, data_dir, retriever_url, qwen3_checkpoint, scripted, capsys
):
    results = evaluate(tmp_path, data_dir, retriever_url, qwen3_checkpoint)  # no budget flags at all
    (settings,) = scripted
    assert used(settings) == QWEN3_AGENT  # thinking, T_max 10, 2,048-token turns, 16,384 tokens, top-5, kwargs
    record = qwen3_checkpoint.parent / RUN_RECORD
    assert results["settings"]["recorded_run"] == str(record) and results["settings"]["overrides"] == {}
    assert {key: results["settings"][key] for key in QWEN3_AGENT} == QWEN3_AGENT
    assert "T_max 10, 2048 tokens/turn, top-5, thinking" in results["settings_summary"]
    # the searches returned up to the recorded top-5 documents (the CLI's own default is 3); the tiny policy's
    # word-level tokenizer decodes an observation's "Doc 3 (Title: x)" as "Doc <unk> ( Title : x )"
    (lines,) = [path.read_text().splitlines() for path in (tmp_path / "eval").glob("*/synthhop.jsonl")]
    searched = [a for line in lines for a in json.loads(line)["samples"][0]["actions"] if a["kind"] == "search"]
    assert max(a["observation"].count("( Title :") for a in searched) == 5
    err = capsys.readouterr().err
    assert f"settings of the training run of --model (recorded in {record}): max_actions=10," in err
    assert "overrides the training run" not in err


def test_a_flag_overrides_the_record_and_each_mismatch_is_printed(
    tmp_path, data_dir, retriever_url, qwen3_checkpoint, scripted, capsys
):
    flags = ["--max-actions", "4", "--no-thinking", "--max-action-tokens", "2048", "--topk", "5"]  # two differ
    results = evaluate(tmp_path, data_dir, retriever_url, qwen3_checkpoint, *flags)
    (settings,) = scripted
    assert used(settings) == {**QWEN3_AGENT, "max_actions": 4, "thinking": False}
    lines = [line for line in capsys.readouterr().err.splitlines() if "overrides the training run" in line]
    assert lines == [
        "--max-actions overrides the training run: max_actions recorded 10, used 4",
        "--thinking overrides the training run: thinking recorded True, used False",
    ]
    assert results["settings"]["overrides"] == {
        "max_actions": {"recorded": 10, "used": 4},
        "thinking": {"recorded": True, "used": False},
    }


def test_a_model_folder_keeps_the_defaults(tmp_path, data_dir, retriever_url, scripted, capsys):
    results = evaluate(tmp_path, data_dir, retriever_url, SHIPPED)
    (settings,) = scripted
    assert settings == dataclasses.replace(DEFAULTS, concurrency=settings.concurrency)
    assert results["settings"]["recorded_run"] is None
    err = capsys.readouterr().err
    assert "training run" not in err and "note:" not in err


def test_a_baseline_is_evaluated_with_the_models_run_settings(
    tmp_path, data_dir, retriever_url, qwen3_checkpoint, scripted, capsys
):
    """The comparison is paired: both models run with one set of settings, the recorded ones of either."""
    evaluate(tmp_path, data_dir, retriever_url, SHIPPED, "--baseline", str(qwen3_checkpoint))
    assert [used(s) for s in scripted] == [QWEN3_AGENT, QWEN3_AGENT]
    assert "training run of --baseline (recorded in" in capsys.readouterr().err


def test_a_checkpoint_without_a_record_gets_the_defaults_and_a_note(
    tmp_path, data_dir, retriever_url, scripted, capsys
):
    actor = fake_fsdp_checkpoint(tmp_path / "old_run", with_hf_weights=True)
    evaluate(tmp_path, data_dir, retriever_url, actor)
    assert used(scripted[0]) == used(DEFAULTS)
    assert f"note: --model {actor} is a verl checkpoint whose run recorded no {RUN_RECORD}" in capsys.readouterr().err


def test_a_broken_record_is_named(tmp_path, data_dir, retriever_url, qwen3_checkpoint, scripted):
    (qwen3_checkpoint.parent / RUN_RECORD).write_text('{"agent": {"max_actions": "ten"}}')
    with pytest.raises(SystemExit, match=r"--model .*actor: run record .*carl_run_config.json: agent.max_actions='ten"):
        evaluate(tmp_path, data_dir, retriever_url, qwen3_checkpoint)
    assert scripted == []


def test_a_thinking_run_is_evaluated_with_thinking(qwen3_checkpoint):
    """What went wrong without the record: a Qwen3 turn mentions `<search> q0 </search>` inside `<think>`; under the
    run's `thinking` the turn goes on to its real search (as in training), under the defaults q0 is searched."""
    tokenizer = make_tokenizer()  # word-level, with <think> tags and a chat template
    row = {"data_source": "x", "prompt": [{"role": "user", "content": "who is the capital"}]}
    row["reward_model"] = {"ground_truth": {"target": ["a1"]}}

    async def generate(request_id, prompt_ids, sampling_params):
        text = tokenizer.decode(prompt_ids)
        if "</information>" in text:
            reply = "<answer> a1 </answer>"
        elif text.rstrip().endswith("</search>"):  # continued inside the think block
            reply = "ok </think> <search> q1 </search>"
        else:
            reply = "<think> maybe <search> q0 </search>"
        ids = tokenizer.encode(reply, add_special_tokens=False)
        return SimpleNamespace(token_ids=ids, log_probs=[-0.5] * len(ids), extra_fields={})

    def queries(settings):
        searched = []

        def search(query, tree_id):
            searched.append(query)
            return "Doc 1 (Title: x) y"

        evaluator = Evaluator(SimpleNamespace(generate=generate), tokenizer, search, lambda **kw: 0.0, settings)
        asyncio.run(evaluator.evaluate_rows([row]))
        return searched

    _, recorded = recorded_run(qwen3_checkpoint)
    values, _ = with_recorded({}, recorded)
    assert queries(EvalSettings(**values)) == ["q1"]
    assert queries(EvalSettings()) == ["q0"]
