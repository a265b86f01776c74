"""`recipe.carl.evaluate`: numbers from hand-derivable policies, the CLI on the shipped tiny policy, bad inputs,
checkpoint resolution (with verl's merger) and the paired interval against a slow reference."""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from recipe.carl import evaluate
from recipe.carl.evaluate import EvalError, EvalSettings, Evaluator, main, make_search, paired_difference, summarize
from recipe.carl.search.retriever import Retriever, RetrieverConfig
from recipe.carl.search.reward import compute_score
from recipe.carl.search.server import serve_in_thread
from recipe.carl.synthhop.make_data import SynthHopConfig, build, write

SHIPPED = Path(__file__).resolve().parents[2] / "recipe" / "carl" / "tiny" / "checkpoints" / "sft_seed0"
#: The SynthHop demo's own limits (32-token turns, top-2, T_max 6), as the demo passes them.
DEMO_FLAGS = ["--topk", "2", "--max-actions", "6", "--max-action-tokens", "32", "--prompt-length", "256"]
DEMO_FLAGS += ["--response-length", "384"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """SynthHop of the shipped policy's knowledge base (seed 0, 300 entities: every name is in its vocabulary)."""
    out = tmp_path_factory.mktemp("synthhop0")
    write(build(SynthHopConfig(seed=0, n_entities=300, n_train=20, n_test=24)), out, overwrite=True)
    return out


@pytest.fixture(scope="module")
def retriever_url(data_dir):
    retriever = Retriever.from_config(RetrieverConfig(corpus_path=str(data_dir / "corpus.jsonl")))
    with serve_in_thread(retriever) as url:
        yield f"{url}/retrieve"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SHIPPED))


def rows_of(data_dir, n):
    return pd.read_parquet(data_dir / "test.parquet").head(n).to_dict("records")


class ScriptedServer:
    """Question i (request id `eval{i}`) is played by behaviour i % 3: 0 searches its oracle queries then answers
    right, 1 does the same and answers another question's answer, 2 writes no tag at all."""

    def __init__(self, tokenizer, rows):
        self.tok, self.rows = tokenizer, rows

    def turns(self, i):
        row = self.rows[i]
        queries = [f"<search> {q} </search>" for q in row["extra_info"]["oracle_queries"]]
        gold = row["reward_model"]["ground_truth"]["target"][0]
        answers = [r["reward_model"]["ground_truth"]["target"][0] for r in self.rows]
        other = next((a for a in answers if a != gold), "Nowhere")  # another question's answer
        return [queries + [f"<answer> {gold} </answer>"], queries + [f"<answer> {other} </answer>"], ["hmm ."]][i % 3]

    async def generate(self, request_id, prompt_ids, sampling_params):
        i = int(request_id.removeprefix("eval").split(".")[0])
        done = self.tok.decode(prompt_ids).count("</information>")  # observations so far (the prompt has none)
        ids = self.tok.encode(self.turns(i)[done], add_special_tokens=False)
        return SimpleNamespace(token_ids=ids, log_probs=[-0.5] * len(ids), extra_fields={})


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
    assert any("malformed" in note for note in evaluate.diagnose(summarize(records[2::3])))


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
    assert any("searches failed" in note for note in evaluate.diagnose(table))


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


# ------------------------------------------------------------------------------------------- the CLI, end to end
@pytest.fixture(scope="module")
def random_policy(tmp_path_factory, tokenizer):
    """The shipped policy's architecture and tokenizer with random weights: a baseline that should lose."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("random_policy")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(SHIPPED))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_cli_compares_two_models_and_agrees_with_the_in_process_evaluator(
    data_dir, retriever_url, random_policy, tmp_path
):
    from recipe.carl.tiny.local_agent import LocalAgent

    out = tmp_path / "eval"
    args = ["--model", str(SHIPPED), "--baseline", str(random_policy), "--data", str(data_dir / "test.parquet")]
    results = main([*args, "--out", str(out), "--retriever-url", retriever_url, "--engine", "hf", *DEMO_FLAGS])

    labels = list(results["models"])
    assert labels == ["sft_seed0", random_policy.name]
    model, baseline = (results["models"][label]["tables"]["synthhop"] for label in labels)
    assert model["questions"] == baseline["questions"] == 24
    # Greedy through HTTP and the search tool gives what the demo's in-process evaluator gives.
    agent = LocalAgent(SHIPPED, data_dir, topk=2, max_actions=6, max_action_tokens=32, response_length=384)
    local = agent.evaluate(agent.rows("test"))
    assert model["em"] == pytest.approx(local["em"]) and model["reward"] == pytest.approx(local["score"])
    assert model["format"] == pytest.approx(local["format"]) and model["em"] > 0.2
    assert baseline["format"] < model["format"]

    lines = [json.loads(x) for x in (out / "sft_seed0" / "synthhop.jsonl").read_text().splitlines()]
    assert len(lines) == 24 and {"question", "gold", "em", "f1", "reward", "samples"} <= set(lines[0])
    assert {"prediction", "actions", "finish_reason", "reward"} <= set(lines[0]["samples"][0])
    assert sum(r["em"] for r in lines) / 24 == pytest.approx(model["em"])

    c = results["comparison"]["synthhop"]["em"]
    assert c["diff"] == pytest.approx(model["em"] - baseline["em"]) and c["low"] <= c["diff"] <= c["high"]
    text = (out / "results.md").read_text()
    assert "| synthhop | em |" in text and "95 % paired bootstrap" in text and "sft_seed0" in text
    assert json.loads((out / "results.json").read_text())["settings"]["topk"] == 2
    assert (out / "results.json").stat().st_mode & 0o044 == 0o044  # readable by others

    with pytest.raises(SystemExit, match="already holds results.json; pass --overwrite"):
        main([*args, "--out", str(out), "--retriever-url", retriever_url, *DEMO_FLAGS])


# ---------------------------------------------------------------------------------------------------- bad inputs
def cli(tmp_path, *extra, model=str(SHIPPED), data=None, url="http://127.0.0.1:9/retrieve"):
    data = data or [str(tmp_path / "none.parquet")]
    return main(["--model", model, "--data", *data, "--out", str(tmp_path / "o"), "--retriever-url", url, *extra])


def test_missing_model_folder_names_it(tmp_path):
    with pytest.raises(SystemExit, match=r"--model .*nope: no such folder; give a Hugging Face model folder"):
        cli(tmp_path, model=str(tmp_path / "nope"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="has config.json but no weights"):
        cli(tmp_path, model=str(tmp_path / "cfg"))
    with pytest.raises(SystemExit, match="neither a model folder nor a verl FSDP checkpoint"):
        cli(tmp_path, model=str(tmp_path))


def test_missing_or_bad_parquet_names_it(tmp_path):
    with pytest.raises(SystemExit, match=r"--data .*none.parquet: no such file; write it with python -m data_"):
        cli(tmp_path)
    pd.DataFrame({"question": ["q"]}).to_parquet(tmp_path / "raw.parquet")
    with pytest.raises(SystemExit, match=r"missing columns \['data_source', 'prompt', 'reward_model'\]"):
        cli(tmp_path, data=[str(tmp_path / "raw.parquet")])
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(SystemExit, match="not a readable parquet file"):
        cli(tmp_path, data=[str(tmp_path / "text.parquet")])


def test_unreachable_retriever_names_the_url_and_the_fix(data_dir, tmp_path):
    with pytest.raises(
        SystemExit,
        match=r"retriever http://127.0.0.1:9/retrieve: GET http://127.0.0.1:9/health "
        r"failed .*scripts/launch_retriever.sh",
    ):
        cli(tmp_path, "--engine", "hf", data=[str(data_dir / "test.parquet")])


def test_the_retriever_check_waits_when_asked(monkeypatch):
    import socket
    import threading

    from recipe.carl.search import client

    with socket.socket() as sock:  # a free port, for a retriever that starts 1 s after the check
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/retrieve"
    with pytest.raises(EvalError, match="CARL_RETRIEVER_WAIT_S=600 waits"):  # no wait by default
        evaluate.check_retriever(url, timeout=2)
    monkeypatch.setenv(client.RETRIEVER_WAIT_ENV, "bad")
    with pytest.raises(EvalError, match="CARL_RETRIEVER_WAIT_S='bad'"):
        evaluate.check_retriever(url, timeout=2)
    monkeypatch.setenv(client.RETRIEVER_WAIT_ENV, "20")
    monkeypatch.setattr(client, "WAIT_EVERY_S", 0.2)
    stop = threading.Event()

    def late_server():
        stop.wait(1.0)
        with serve_in_thread(search_fn=lambda queries, topk: [[] for _ in queries], port=port):
            stop.wait(30)

    thread = threading.Thread(target=late_server, daemon=True)
    thread.start()
    try:
        assert evaluate.check_retriever(url, timeout=2)["status"] == "ok"
    finally:
        stop.set()
        thread.join(10)


def test_vllm_asked_for_but_missing_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "vllm_installed", lambda: False)
    with pytest.raises(SystemExit, match=r"--engine vllm: vLLM is not installed .*pip install -e '.\[gpu\]'"):
        cli(tmp_path, "--engine", "vllm")


def test_settings_and_json_flags_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="--samples 4 with greedy decoding gives 4 identical trajectories"):
        cli(tmp_path, "--samples", "4")
    with pytest.raises(SystemExit, match="--chat-template-kwargs .*not JSON"):
        cli(tmp_path, "--chat-template-kwargs", "{enable_thinking: false}")
    with pytest.raises(EvalError, match="--reward-path .*nope.py: no such file"):
        evaluate.load_reward(str(tmp_path / "nope.py"), None, None)


def test_a_custom_reward_is_loaded_as_verl_loads_it(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(
        "def score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):\n    return 2.0 + bonus\n"
    )
    fn = evaluate.load_reward(str(path), "score", {"bonus": 0.5})
    assert fn(data_source="x", solution_str="y", ground_truth=["z"], extra_info=None) == 2.5
    with pytest.raises(EvalError, match="--reward-name nope"):
        evaluate.load_reward(str(path), "nope", None)


# ---------------------------------------------------------------------------------------- checkpoint resolution
def fake_fsdp_checkpoint(root: Path, with_hf_weights: bool = False) -> Path:
    """`global_step_1/actor` as verl's FSDP checkpoint manager lays it out (world size 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    actor = root / "exp" / "global_step_1" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(str(SHIPPED))
    torch.save(model.state_dict(), actor / "model_world_size_1_rank_0.pt")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
    model.config.save_pretrained(actor / "huggingface")
    AutoTokenizer.from_pretrained(str(SHIPPED)).save_pretrained(actor / "huggingface")
    if with_hf_weights:
        model.save_pretrained(actor / "huggingface")
    return actor


def test_a_checkpoint_with_hf_weights_is_used_as_is(tmp_path):
    actor = fake_fsdp_checkpoint(tmp_path, with_hf_weights=True)
    assert evaluate.resolve_model(actor) == actor / "huggingface"
    assert evaluate.resolve_model(actor.parent) == actor / "huggingface"  # global_step_N works too
    assert evaluate.model_label(actor / "huggingface") == "exp/global_step_1"


def test_fsdp_shards_are_merged_once_with_verls_merger(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    actor = fake_fsdp_checkpoint(tmp_path)
    merged = evaluate.resolve_model(actor)
    assert merged == actor / "merged_hf" and (merged / "merged_from.json").exists()
    original, loaded = AutoModelForCausalLM.from_pretrained(str(SHIPPED)), AutoModelForCausalLM.from_pretrained(merged)
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name  # verl's FSDP merger saves bf16 weights
    # Reused while the shards are unchanged (the merger is not run again) ...
    monkeypatch.setattr(evaluate.subprocess, "run", lambda *a, **k: pytest.fail("merged twice"))
    assert evaluate.resolve_model(actor) == merged
    # ... and merged again when they change; a failing merger is reported with its command.
    monkeypatch.setattr(
        evaluate.subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=3, stderr="boom", stdout="")
    )
    shard = actor / "model_world_size_1_rank_0.pt"
    shard.write_bytes(shard.read_bytes() + b"\0")
    with pytest.raises(EvalError, match=r"model merger failed \(exit 3\): boom\ncommand: .*verl.model_merger merge"):
        evaluate.resolve_model(actor)
    assert (merged / "model.safetensors").exists()  # the failed merge left the old folder in place
    other = tmp_path / "busy"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(EvalError, match="holds something else"):
        evaluate.resolve_model(actor, merge_dir=other)


def test_cheap_checks_come_before_a_merge(tmp_path, data_dir):
    """An unreachable retriever is reported before any checkpoint is merged (or model downloaded)."""
    actor = fake_fsdp_checkpoint(tmp_path)
    with pytest.raises(SystemExit, match="retriever http://127.0.0.1:9/retrieve"):
        cli(tmp_path, "--engine", "hf", model=str(actor), data=[str(data_dir / "test.parquet")])
    assert not (actor / "merged_hf").exists()


# ---------------------------------------------------------------------------------------------- paired interval
def slow_percentile_bootstrap(a, b, resamples, confidence=0.95, seed=1):
    """The textbook paired bootstrap, one question at a time: resample questions, difference of the two means."""
    rng = random.Random(seed)
    n = len(a)
    means = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        means.append(sum(a[i] for i in idx) / n - sum(b[i] for i in idx) / n)
    means.sort()
    tail = (1 - confidence) / 2
    return np.quantile(means, tail), np.quantile(means, 1 - tail)


def test_paired_interval_matches_a_slow_reference():
    rng = np.random.default_rng(3)
    a = (rng.random(200) < 0.55).astype(float).tolist()  # EM of two correlated models on 200 questions
    b = [x if rng.random() < 0.8 else 1.0 - x for x in a]
    fast = paired_difference(a, b, resamples=10_000, seed=0)
    low, high = slow_percentile_bootstrap(a, b, resamples=10_000)
    assert fast["diff"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
    assert fast["low"] == pytest.approx(low, abs=0.006) and fast["high"] == pytest.approx(high, abs=0.006)
    # and, at this n, the normal approximation of the paired differences
    d = np.array(a) - np.array(b)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert (fast["high"] - fast["low"]) / 2 == pytest.approx(half, rel=0.1)


def test_paired_interval_edge_cases():
    assert paired_difference([1.0, 0.0, 1.0], [0.0, -1.0, 0.0]) == {"diff": 1.0, "low": 1.0, "high": 1.0, "n": 3}
    nan = float("nan")
    out = paired_difference([1.0, nan, 0.0, 1.0], [0.0, 1.0, nan, 1.0])
    assert out["n"] == 2 and out["diff"] == 0.5
    assert math.isnan(paired_difference([], [])["diff"])


# --------------------------------------------------------------------------------------------------------- vLLM
vllm_missing = pytest.mark.skipif(
    not evaluate.vllm_installed(),
    reason="vLLM is not installed here: run in the vLLM venv (bash scripts/install_cpu.sh --vllm; "
    ".venv-vllm/bin/python -m pytest -m vllm)",
)


@pytest.mark.vllm
@vllm_missing
def test_vllm_request_mapping_follows_verls_server():
    engine = evaluate.VLLMEngine(None, EvalSettings(prompt_length=100, response_length=50), max_model_len=150)
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


def test_a_hub_id_is_taken_from_the_hub_cache(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(SHIPPED))
    assert evaluate.resolve_model("Qwen/Qwen2.5-7B-Instruct") == SHIPPED

    def offline(repo_id, **kw):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(EvalError, match=r"--model nobody/nothing: not a local folder, and the Hugging Face hub"):
        evaluate.resolve_model("nobody/nothing")


# ------------------------------------------------------------------------------------------------ scripts/eval.sh
def test_eval_script_passes_the_training_defaults_to_the_cli(tmp_path):
    """scripts/eval.sh on a GPU node: vLLM, run_carl_qwen7b.sh's budgets, every test file, the baseline, extra flags."""
    import os
    import subprocess

    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    stub.chmod(0o755)
    script = Path(__file__).resolve().parents[2] / "scripts" / "eval.sh"
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "ARGS_OUT": str(tmp_path / "args")}
    env.update(MODEL_PATH="ckpt/global_step_9/actor", BASELINE_PATH="Qwen/Qwen2.5-7B-Instruct", OUT="o")
    env.update(TEST_FILES="a.parquet b.parquet", RETRIEVER_URL="http://h:1/retrieve")
    subprocess.run(["bash", str(script), "--samples", "4"], env=env, check=True, capture_output=True)
    args = (tmp_path / "args").read_text().split("\n")
    assert args[:2] == ["-m", "recipe.carl.evaluate"]
    flags = dict(zip(args[2::1], args[3::1], strict=False))
    assert flags["--model"] == "ckpt/global_step_9/actor" and flags["--baseline"] == "Qwen/Qwen2.5-7B-Instruct"
    assert args[args.index("--data") + 1 : args.index("--data") + 3] == ["a.parquet", "b.parquet"]
    assert flags["--engine"] == "vllm" and flags["--retriever-url"] == "http://h:1/retrieve"
    assert (flags["--max-actions"], flags["--max-action-tokens"], flags["--topk"]) == ("32", "512", "3")
    assert (flags["--prompt-length"], flags["--response-length"]) == ("2048", "12288")
    assert flags["--samples"] == "4"
    del env["MODEL_PATH"]
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "set MODEL_PATH" in done.stderr
