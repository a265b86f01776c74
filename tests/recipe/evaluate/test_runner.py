"""`recipe.carl.evaluate.runner`: numbers from hand-derivable (scripted) policies through the agent loop's
environment, failed searches, several samples per question."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from recipe.carl.evaluate.cli import make_search
from recipe.carl.evaluate.report import diagnose, summarize
from recipe.carl.evaluate.runner import Evaluator
from recipe.carl.evaluate.settings import EvalSettings
from recipe.carl.search.reward import compute_score
from tests.recipe.evaluate.common import ScriptedServer, rows_of


def test_scripted_policies_give_hand_derived_numbers(data_dir, retriever_url, tokenizer):
    rows = rows_of(data_dir, 6)
    server = ScriptedServer(tokenizer, rows)
    settings = EvalSettings(max_actions=6, max_action_tokens=32, prompt_length=256, response_length=384)
    evaluator = Evaluator(server, tokenizer, make_search(retriever_url, 2), compute_score, settings)
    records = asyncio.run(evaluator.evaluate_rows(rows))
    table = summarize(records)

    hops = [len(r["extra_info"]["oracle_queries"]) for r in rows]
    tokens = [sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in server.turns(i)) for i in range(6)]
    assert table["questions"] == 6 and table["samples"] == 1
    assert table["em"] == pytest.approx(2 / 6) and table["f1"] == pytest.approx(2 / 6)
    assert table["format"] == pytest.approx(4 / 6)
    assert table["reward"] == pytest.approx((2 * 1.1 + 2 * 0.1) / 6)  # F1 + 0.1 format (recipe.carl.search.reward)
    assert table["actions_per_question"] == pytest.approx(
        sum(h + 1 if i % 3 < 2 else 1 for i, h in enumerate(hops)) / 6
    )
    assert table["searches_per_question"] == pytest.approx(sum(h if i % 3 < 2 else 0 for i, h in enumerate(hops)) / 6)
    assert table["generated_tokens_per_question"] == pytest.approx(sum(tokens) / 6)
    assert table["finish_reasons"] == {"answer": pytest.approx(4 / 6), "invalid:no_action": pytest.approx(2 / 6)}
    assert table["search_errors"] == 0 and table["search_error_rate"] == 0.0

    right = records[0]
    assert right["question"] == rows[0]["extra_info"]["question"] and right["gold"] == [server.turns(0)[-1][9:-10]]
    trajectory = right["samples"][0]
    assert trajectory["prediction"] == right["gold"][0] and trajectory["finish_reason"] == "answer"
    assert [a["kind"] for a in trajectory["actions"]] == ["search"] * hops[0] + ["answer"]
    assert [a.get("query") for a in trajectory["actions"][:-1]] == list(rows[0]["extra_info"]["oracle_queries"])
    # The first hop's document is in the observation the policy saw; the answer has none.
    first_hop = rows[0]["extra_info"]["oracle_path"][0]
    assert (
        "<information>" in trajectory["actions"][0]["observation"]
        and first_hop in trajectory["actions"][0]["observation"]
    )
    assert trajectory["actions"][-1]["observation"] is None
    garbage = records[2]["samples"][0]
    assert garbage["prediction"] is None and garbage["reward"] == 0.0 and garbage["actions"][0]["reason"] == "no_action"
    assert any("malformed" in note for note in diagnose(summarize(records[2::3])))


def test_failed_searches_are_counted_and_end_the_trajectory(data_dir, tokenizer):
    rows = rows_of(data_dir, 3)[:1] * 2  # the same right-answering question twice; the second one's search fails

    def search(query, tree_id):
        if tree_id == "eval1":
            raise ConnectionError("retriever down")
        return "Doc 1 (Title: x) y"

    settings = EvalSettings(max_actions=6, max_action_tokens=32, prompt_length=256, response_length=384)
    records = asyncio.run(
        Evaluator(ScriptedServer(tokenizer, rows), tokenizer, search, compute_score, settings).evaluate_rows(rows)
    )
    table = summarize(records)
    assert table["search_errors"] == 1 and table["finish_reasons"]["tool_error"] == 0.5
    assert records[1]["samples"][0]["actions"][0]["error"].startswith("ConnectionError")
    assert any("searches failed" in note for note in diagnose(table))


def test_several_samples_give_mean_and_pass_at_k(data_dir, tokenizer):
    rows = rows_of(data_dir, 3)
    server = ScriptedServer(tokenizer, rows)

    async def generate(request_id, prompt_ids, sampling_params):  # sample 1 of question 0 writes no tag (as 2 does)
        i, j = request_id.removeprefix("eval").split(".")
        return await server.generate(f"eval{2 if (i, j) == ('0', '1') else i}", prompt_ids, sampling_params)

    settings = EvalSettings(
        max_actions=6, max_action_tokens=32, prompt_length=256, response_length=384, temperature=1.0, samples=2
    )
    search = lambda q, t: "Doc 1 (Title: x) y"  # noqa: E731
    records = asyncio.run(
        Evaluator(SimpleNamespace(generate=generate), tokenizer, search, compute_score, settings).evaluate_rows(rows)
    )
    assert [r["em"] for r in records] == [0.5, 0.0, 0.0]
    table = summarize(records)
    assert (
        table["samples"] == 2
        and table["em"] == pytest.approx(0.5 / 3)
        and table["em_pass_at_k"] == pytest.approx(1 / 3)
    )
