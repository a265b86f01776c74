"""`recipe.carl.evaluate.engines`: vLLM's request mapping follows verl's server, and vLLM agrees with the CPU backend
(both need vLLM's CPU build: `bash scripts/install_cpu.sh --vllm`)."""

from __future__ import annotations

import json

import pytest

from recipe.carl.evaluate import engines
from recipe.carl.evaluate.cli import main
from recipe.carl.evaluate.settings import EvalSettings
from tests.recipe.evaluate.common import DEMO_FLAGS, SHIPPED

vllm_missing = pytest.mark.skipif(
    not engines.vllm_installed(),
    reason="vLLM is not installed here: run in the vLLM venv (bash scripts/install_cpu.sh --vllm; "
    ".venv-vllm/bin/python -m pytest -m vllm)",
)


@pytest.mark.vllm
@vllm_missing
def test_vllm_request_mapping_follows_verls_server():
    engine = engines.VLLMEngine(None, EvalSettings(prompt_length=100, response_length=50), max_model_len=150)
    prompt, params = engine.request([1, 2, 3], {"temperature": 0.0, "top_k": -1, "logprobs": True, "max_tokens": 500})
    assert prompt["prompt_token_ids"] == [1, 2, 3] and params.max_tokens == 147  # clamped to the room left
    assert params.logprobs == 0 and params.repetition_penalty == 1.0 and params.ignore_eos is False
    _, params = engine.request(list(range(120)), {"temperature": 1.0, "stop": ["</search>"]})
    assert params.max_tokens == 30 and params.logprobs is None and params.stop == ["</search>"]  # 100 + 50 - 120


@pytest.mark.vllm
@pytest.mark.slow
@vllm_missing
def test_vllm_engine_matches_the_cpu_backend_greedily(data_dir, retriever_url, tmp_path):
    """The shipped tiny policy, greedy, on the CPU build of vLLM and on the CPU backend: the same answers."""
    common = ["--model", str(SHIPPED), "--data", str(data_dir / "test.parquet"), "--retriever-url", retriever_url]
    common += [*DEMO_FLAGS, "--limit", "12"]
    hf = main([*common, "--out", str(tmp_path / "hf"), "--engine", "hf"])
    vllm_kwargs = json.dumps({"enforce_eager": True, "kv_cache_memory_bytes": 1 << 28})
    vllm_flags = ["--engine", "vllm", "--dtype", "float32", "--vllm-kwargs", vllm_kwargs]
    vl = main([*common, "--out", str(tmp_path / "vllm"), *vllm_flags])
    preds = {}
    for name in ("hf", "vllm"):
        lines = (tmp_path / name / "sft_seed0" / "synthhop.jsonl").read_text().splitlines()
        preds[name] = [json.loads(x)["samples"][0]["prediction"] for x in lines]
    same = sum(p == q for p, q in zip(preds["hf"], preds["vllm"], strict=True))
    print(f"vLLM vs the CPU backend, greedy: {same}/12 identical predictions")
    assert same >= 11, (preds, hf["models"], vl["models"])  # fp32 on both; at most one argmax tie may flip
    assert vl["models"]["sft_seed0"]["engine"] == "vllm"
