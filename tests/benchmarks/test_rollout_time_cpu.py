"""The CPU validation of the rollout-time model (`benchmarks/rollout_time_cpu.py`) without vLLM: the curve fit
against a planted engine whose times are known exactly, the interval by hand, and the real trees being the model's
trees (only the clock differs). The run itself needs vLLM's CPU build and a quiet machine: docs/measurements.md."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

import benchmarks.rollout_time_cpu as cpu
from benchmarks.rollout_sim import ServerModel
from benchmarks.rollout_time import run_step

T0, T1, T2, PREFILL = 0.004, 0.0015, 0.002, 1e-4  # s per step, per sequence, per sequence x 1k context, per token


def planted_time(b: int, context: int, tokens: int) -> float:
    """A batch of b prompts of `context` tokens, `tokens` generated each: prefill, then one decode step per token whose
    cost grows with the sequences and with their context (which grows by one per step)."""
    return PREFILL * context * b + sum(T0 + T1 * b + T2 * b * (context + i) / 1000 for i in range(tokens))


def test_the_curve_fit_recovers_a_planted_engine(monkeypatch):
    async def timed(engine, prompts, tokens):
        assert len({len(p) for p in prompts}) == 1
        return planted_time(len(prompts), len(prompts[0]), tokens)

    monkeypatch.setattr(cpu, "_timed", timed)
    curve = asyncio.run(cpu.measure_curve(object(), [1, 2, 4, 8], short=16, long=80))
    fit = curve["fit"]
    # By hand: (T(80) - T(16)) / 64 = T0 + b (T1 + T2 (context + 47.5) / 1000); the fit's regressor uses context + 48,
    # so its per-sequence term absorbs -T2 * 0.5 / 1000; the prefill difference (1152 - 128 tokens, one decode step
    # each) adds T2 * 1024 / 1000 / 1024.
    assert fit["t0"] == pytest.approx(T0, rel=1e-6)
    assert fit["t1"] == pytest.approx(T1 - T2 * 0.5 / 1000, rel=1e-6)
    assert fit["t2"] == pytest.approx(T2, rel=1e-6)
    assert fit["prefill"] == pytest.approx(PREFILL + T2 / 1000, rel=1e-6)
    assert curve["rms_residual_s"] < 1e-12
    assert [(r["b"], r["context"]) for r in curve["rows"]] == [(b, c) for c in (300, 1000) for b in (1, 2, 4, 8)]


def test_interval_is_a_t_interval_over_rounds():
    got = cpu.interval([1.0, 2.0, 3.0])
    half = 4.30 * 1.0 / math.sqrt(3)  # t(0.975, 2 df) = 4.30, sd 1
    assert got == pytest.approx({"mean": 2.0, "low": 2.0 - half, "high": 2.0 + half})
    assert math.isnan(cpu.interval([5.0])["low"])


class FakeEngine:
    """Generates exactly the asked number of tokens, instantly, each action distinct (as sampling makes them, so nothing
    merges); records the prefix lengths it was given."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    async def generate(self, prompt, tokens):
        self.calls.append((len(prompt), tokens))
        return [1000 + len(self.calls)] + [7] * (tokens - 1)


class FakeTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 50 + 3 for c in text]


@pytest.mark.parametrize("algo,k", [("grpo", 1), ("carl", 1), ("carl", 4)])
def test_real_trees_are_the_models_trees(algo, k):
    """The same draws decide the trees in the real run and in the model: the same actions and tokens per question."""
    carl = dataclasses.replace(cpu.TREE, forks_in_flight=k)
    engine, searches = FakeEngine(), []

    def search(query):
        searches.append(query)
        return [{"title": "t", "text": "some words about the entity"}]

    real = {"engine": engine, "tokenizer": FakeTokenizer(), "search": search, "search_s": []}
    measured = asyncio.run(cpu.real_step(real, carl, algo, 8, 3, seed=1))
    predicted = run_step(cpu.POLICY, ServerModel(t0=0.01, t1=0.001), carl, algo=algo, group=8, replicas=1, workers=1,
                         questions=3, seed=1)  # fmt: skip
    assert measured["actions_per_question"] == predicted["actions_per_question"]
    assert measured["tokens_per_question"] == predicted["tokens_per_question"]
    assert sum(t for _, t in engine.calls) == measured["tokens_per_question"] * 3
    assert len(engine.calls) == round(measured["actions_per_question"] * 3)
    assert len(searches) == len(real["search_s"]) > 0


class FakeLLM:
    def shutdown(self):
        pass


class FakeVllmEngine(FakeEngine):
    """`Engine`'s interface (block size, capacity, `llm.shutdown`) without vLLM."""

    def __init__(self, model, threads, kv_bytes):
        super().__init__()
        self.block, self.max_num_seqs, self.kv_tokens, self.llm = 16, 256, 100_000, FakeLLM()


def test_the_whole_command_with_a_planted_engine(monkeypatch, tmp_path):
    """`main` end to end (curve, real steps, the model's prediction beside each, the summary) on a planted engine:
    the model runs its own event loop inside the measurement's, and every setting gets a row per round."""
    import transformers

    async def timed(engine, prompts, tokens):
        return planted_time(len(prompts), len(prompts[0]), tokens)

    monkeypatch.setattr(cpu, "_timed", timed)
    monkeypatch.setattr(cpu, "Engine", FakeVllmEngine)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name: FakeTokenizer())
    out = tmp_path / "cpu.json"
    argv = ["--model", "fake", "--questions", "2", "--group", "4", "--ks", "2", "--rounds", "2", "--batches", "1", "2",
            "--out", str(out)]  # fmt: skip
    result = cpu.main(argv)
    assert [(r["round"], r["algo"], r["k"]) for r in result["rounds"]] == [
        (r, a, k) for r in range(2) for a, k in [("grpo", 1), ("carl", 1), ("carl", 2)]
    ]
    assert set(result["summary"]) == {"grpo_k1", "carl_k1", "carl_k2"}
    assert all(r["predicted_s"] > 0 and r["measured_s"] >= 0 for r in result["rounds"])
    assert result["server"]["t0"] == pytest.approx(T0, rel=1e-6) and out.exists()
