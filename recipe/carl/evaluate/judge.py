"""LasJ, the paper's second metric: an LLM judge's binary verdict (correct or incorrect) on each prediction.

The paper reports F1 and LasJ, judged by GPT-5-nano with a binary verdict; its judge prompt (its Fig. 6) is not in
the sources we have. The prompt here is therefore ASearcher's default judge (inclusionAI/ASearcher,
`evaluation/evaluate.py`, `DefaultJudge`, called by `evaluation/llm_as_judge.py`), with its parsing: a JSON object
in a ```json block whose "judgement" is "Correct" or "Incorrect". As there: the prediction is cut to 500 characters,
sampling at temperature 0.6 with at most 1,024 new tokens, and a reply without a verdict is asked again (here at most
`retries` times; then the trajectory counts as incorrect and its status says `invalid`). A trajectory without an
answer is incorrect without a call.

Any OpenAI-compatible endpoint serves (`POST {url}/chat/completions`): a local vLLM server
(`vllm serve Qwen/Qwen2.5-72B-Instruct`, ASearcher's local judge) or a hosted API. The key, if one is needed, is read
from the environment variable named by `--judge-key-env` (default `OPENAI_API_KEY`), never from a flag.

    python -m recipe.carl.evaluate --model ... --data ... --out ... \\
        --judge-url http://127.0.0.1:8001/v1 --judge-model Qwen/Qwen2.5-72B-Instruct
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["JUDGE_PROMPT", "Judge", "JudgeError", "add_lasj", "parse_verdict"]

#: ASearcher's `DefaultJudge.JUDGE_PROMPT` (evaluation/evaluate.py), kept as is so verdicts compare with its numbers.
JUDGE_PROMPT = """You are an evaluation assistant. Please determine if the predicted answer is equivalent to the labeled answer.

Question: {question}

Labeled Answer: {gt_answer}

Predicted Answer: {pred_answer}

Did the model give an answer **equivalent** to the labeled answer? Please respond with "Correct" if they are equivalent, or "Incorrect" if they are not equivalent.

The output should in the following json format:
```json
{{
    "rationale": your rationale for the judgement, as a text,
    "judgement": your judgement result, can only be "Correct" or "Incorrect",
}}
```
"""  # noqa: E501  (the prompt's own lines)

_VERDICT = re.compile(r'"judgement"\s*:\s*"?\s*(correct|incorrect)\b', re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge endpoint cannot be used (unreachable, refusing, or answering without choices); names the fix."""


def parse_verdict(reply: str) -> bool | None:
    """The verdict of a judge's reply: True (Correct), False (Incorrect), None (no verdict found).

    The reply's last ```json block (or the whole reply) is read as JSON, else as a Python literal (ASearcher's two
    tries); failing both, a `"judgement": "correct"` pattern anywhere in it decides.
    """
    body = reply.split("```json")[-1].split("```")[0].strip()
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(body)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict) and isinstance(value.get("judgement"), str):
            verdict = value["judgement"].strip().lower()
            if verdict in ("correct", "incorrect"):
                return verdict == "correct"
    match = _VERDICT.search(reply)
    return None if match is None else match.group(1).lower() == "correct"


@dataclass
class Judge:
    """An OpenAI-compatible chat endpoint asked for one verdict per prediction.

    Args:
        url: the API's base URL (``http://host:port/v1``); a URL ending in ``/chat/completions`` is taken as is.
        model: the served model's name.
        key_env: the environment variable holding the API key (none needed when it is unset or empty).
        temperature: sampling temperature of the judge (ASearcher's 0.6).
        max_tokens: new tokens per verdict (ASearcher's 1024).
        retries: extra asks when a reply has no verdict.
        concurrency: verdicts in flight at once.
        timeout: seconds per request.
    """

    url: str
    model: str
    key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.6
    max_tokens: int = 1024
    retries: int = 2
    concurrency: int = 16
    timeout: float = 120.0
    calls: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise JudgeError("--judge-model is missing: name the model the judge endpoint serves.")
        url = self.url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else f"{url}/chat/completions"

    async def _ask(self, client: httpx.AsyncClient, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        self.calls += 1
        try:
            response = await client.post(self.endpoint, json=body)
        except httpx.HTTPError as error:
            raise JudgeError(
                f"judge {self.endpoint}: {type(error).__name__}: {error}; start the judge (e.g. vllm serve <model>) "
                "or fix --judge-url."
            ) from error
        if response.status_code != 200:
            raise JudgeError(f"judge {self.endpoint} answered HTTP {response.status_code}: {response.text:.300}")
        try:
            return str(response.json()["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise JudgeError(f"judge {self.endpoint} sent no chat completion: {response.text:.300}") from error

    async def verdict(self, client: httpx.AsyncClient, question: str, gold: list[str], prediction: str | None) -> dict:
        """`{"lasj": 1.0 or 0.0, "status": "ok" | "no_answer" | "invalid", "reply": last reply}` for one trajectory."""
        if prediction is None or not prediction.strip():
            return {"lasj": 0.0, "status": "no_answer", "reply": None}
        prompt = JUDGE_PROMPT.format(question=question, gt_answer="; ".join(gold), pred_answer=prediction[:500])
        reply = ""
        for _ in range(self.retries + 1):
            reply = await self._ask(client, prompt)
            correct = parse_verdict(reply)
            if correct is not None:
                return {"lasj": float(correct), "status": "ok", "reply": reply}
        return {"lasj": 0.0, "status": "invalid", "reply": reply}

    def headers(self) -> dict[str, str]:
        key = os.environ.get(self.key_env, "")
        return {"Authorization": f"Bearer {key}"} if key else {}


async def add_lasj(judge: Judge, records: list[dict[str, Any]]) -> None:
    """Judges every trajectory of `records` (`recipe.carl.evaluate.runner` question records) in place: each sample
    gets `lasj` and `judge` (status and reply), each question `lasj`, the mean over its samples.

    Raises:
        JudgeError: the endpoint failed (the message names it and the fix).
    """
    limit = asyncio.Semaphore(judge.concurrency)
    async with httpx.AsyncClient(timeout=judge.timeout, headers=judge.headers()) as client:

        async def one(record: dict, sample: dict) -> None:
            async with limit:
                result = await judge.verdict(client, record["question"], record["gold"] or [], sample["prediction"])
            sample["lasj"], sample["judge"] = result.pop("lasj"), result

        await asyncio.gather(*(one(r, s) for r in records for s in r["samples"]))
    for record in records:
        record["lasj"] = sum(s["lasj"] for s in record["samples"]) / max(len(record["samples"]), 1)
