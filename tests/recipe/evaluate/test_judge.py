"""LasJ (`recipe.carl.evaluate.judge`): verdicts parsed as ASearcher parses them, asked of a fake OpenAI-compatible
judge server in this process (no network), and reported by `python -m recipe.carl.evaluate --judge-url` beside EM
and F1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request

from recipe.carl.evaluate.judge import JUDGE_PROMPT, Judge, JudgeError, add_lasj, parse_verdict
from recipe.carl.search.server import bind_socket
from tests.recipe.evaluate.test_recorded_settings import evaluate, scripted  # noqa: F401  (the fixture)

CORRECT = 'ok.\n```json\n{\n    "rationale": "same entity",\n    "judgement": "Correct",\n}\n```'
INCORRECT = '```json\n{"rationale": "another city", "judgement": "Incorrect"}\n```'


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        (CORRECT, True),  # ASearcher's own format: a trailing comma (not JSON, a Python literal)
        (INCORRECT, False),
        ("```json\n{'rationale': 'a Python dict', 'judgement': 'Correct'}\n```", True),  # only a literal parses it
        ('{"judgement": "correct"}', True),
        ('The answer is wrong. "judgement": "Incorrect"', False),  # no block: the pattern decides
        ("I cannot decide.", None),
        ('```json\n{"judgement": "maybe"}\n```', None),
    ],
)
def test_verdicts_are_parsed_as_asearcher_parses_them(reply, verdict):
    assert parse_verdict(reply) is verdict


class FakeJudge:
    """An OpenAI-compatible `/v1/chat/completions`: "Correct" when the prompt's predicted answer equals one of its
    labeled answers (case-insensitive); "undecided" predictions get no verdict; every request is recorded."""

    def __init__(self):
        self.requests: list[dict] = []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def complete(request: Request):
            body = await request.json()
            self.requests.append({"body": body, "auth": request.headers.get("authorization")})
            prompt = body["messages"][0]["content"]
            gold = re.search(r"Labeled Answer: (.*)\n", prompt).group(1).lower().split("; ")
            pred = re.search(r"Predicted Answer: (.*)\n", prompt).group(1).lower()
            reply = "hmm" if pred == "undecided" else CORRECT if pred in gold else INCORRECT
            return {"choices": [{"message": {"role": "assistant", "content": reply}}]}

        self.app = app

    @contextlib.contextmanager
    def serve(self):
        sock = bind_socket("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()


def records():
    """Two questions: one answered right and wrong, one without an answer and undecided."""
    paris = {"prediction": "paris"}, {"prediction": "Lyon"}
    return [
        {"question": "Capital of France?", "gold": ["Paris", "City of Paris"], "samples": [dict(s) for s in paris]},
        {
            "question": "Capital of Mars?",
            "gold": ["none"],
            "samples": [{"prediction": None}, {"prediction": "undecided"}],
        },
    ]


def test_every_trajectory_gets_a_verdict_and_every_question_its_mean(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    fake = FakeJudge()
    recs = records()
    with fake.serve() as url:
        judge = Judge(url, "judge-model", key_env="JUDGE_KEY", retries=1)
        asyncio.run(add_lasj(judge, recs))
    assert [s["lasj"] for s in recs[0]["samples"]] == [1.0, 0.0] and recs[0]["lasj"] == 0.5
    assert [s["judge"]["status"] for s in recs[1]["samples"]] == ["no_answer", "invalid"] and recs[1]["lasj"] == 0.0
    # 2 verdicts for the first question, 1 + 1 retry for "undecided", none for the trajectory without an answer.
    assert len(fake.requests) == judge.calls == 4
    first = next(r for r in fake.requests if "Predicted Answer: paris\n" in r["body"]["messages"][0]["content"])
    assert first["body"]["messages"][0]["content"] == JUDGE_PROMPT.format(
        question="Capital of France?", gt_answer="Paris; City of Paris", pred_answer="paris"
    )
    assert first["body"]["model"] == "judge-model" and first["body"]["temperature"] == 0.6
    assert first["body"]["max_tokens"] == 1024 and first["auth"] == "Bearer sk-test"


def test_a_long_prediction_is_cut_and_no_key_sends_no_header(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake = FakeJudge()
    recs = [{"question": "q", "gold": ["a"], "samples": [{"prediction": "x" * 900}]}]
    with fake.serve() as url:
        asyncio.run(add_lasj(Judge(f"{url}/chat/completions", "m"), recs))
    (request,) = fake.requests
    assert "Predicted Answer: " + "x" * 500 + "\n" in request["body"]["messages"][0]["content"]
    assert request["auth"] is None and recs[0]["lasj"] == 0.0


def test_an_unreachable_or_refusing_judge_is_named():
    with pytest.raises(JudgeError, match=r"judge http://127.0.0.1:9/v1/chat/completions: ConnectError.*--judge-url"):
        asyncio.run(add_lasj(Judge("http://127.0.0.1:9/v1", "m"), records()))
    with pytest.raises(JudgeError, match="--judge-model is missing"):
        Judge("http://127.0.0.1:9/v1", "")
    refusing = FakeJudge()
    refusing.app.router.routes.clear()
    with refusing.serve() as url, pytest.raises(JudgeError, match="answered HTTP 404"):
        asyncio.run(add_lasj(Judge(url, "m"), records()))


def test_the_evaluation_reports_lasj_beside_em_and_f1(tmp_path, data_dir, retriever_url, scripted, capsys):  # noqa: F811
    """Scripted model (question i: right answer, another question's answer, no answer): LasJ 1/3, as EM."""
    from tests.recipe.evaluate.common import SHIPPED

    fake = FakeJudge()
    with fake.serve() as url:
        results = evaluate(tmp_path, data_dir, retriever_url, SHIPPED, "--judge-url", url, "--judge-model", "m")
    (table,) = [t["synthhop"] for t in (m["tables"] for m in results["models"].values())]
    assert table["lasj"] == pytest.approx(1 / 3) == table["em"] and table["judge_invalid"] == 0
    assert len(fake.requests) == 2  # the third trajectory has no answer: no call
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert "| EM % | F1 % | LasJ % |" in markdown and "| 33.3 | 33.3 | 33.3 |" in markdown
    (lines,) = [p.read_text().splitlines() for p in (tmp_path / "eval").glob("*/synthhop.jsonl")]
    judged = [json.loads(line)["samples"][0]["judge"]["status"] for line in lines]
    assert judged == ["ok", "ok", "no_answer"]


def test_the_judge_flags_are_checked_before_anything_runs(tmp_path):
    from recipe.carl.evaluate.cli import main

    with pytest.raises(SystemExit, match="--judge-url needs --judge-model"):
        main(["--model", "m", "--data", "d.parquet", "--out", str(tmp_path), "--judge-url", "http://x/v1"])
