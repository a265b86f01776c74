"""`python -m recipe.carl.evaluate`: the CLI on the shipped tiny policy against a random baseline, bad inputs named
with their fix, the retriever check, custom rewards, and scripts/eval.sh."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from recipe.carl.evaluate import cli as evaluate_cli
from recipe.carl.evaluate import engines
from recipe.carl.evaluate.cli import main
from recipe.carl.evaluate.settings import EvalError
from recipe.carl.search.server import serve_in_thread
from tests.recipe.evaluate.common import DEMO_FLAGS, SHIPPED, cli, fake_fsdp_checkpoint


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
        evaluate_cli.check_retriever(url, timeout=2)
    monkeypatch.setenv(client.RETRIEVER_WAIT_ENV, "bad")
    with pytest.raises(EvalError, match="CARL_RETRIEVER_WAIT_S='bad'"):
        evaluate_cli.check_retriever(url, timeout=2)
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
        assert evaluate_cli.check_retriever(url, timeout=2)["status"] == "ok"
    finally:
        stop.set()
        thread.join(10)


def test_vllm_asked_for_but_missing_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "vllm_installed", lambda: False)
    with pytest.raises(SystemExit, match=r"--engine vllm: vLLM is not installed .*pip install -e '.\[gpu\]'"):
        cli(tmp_path, "--engine", "vllm")


def test_settings_and_json_flags_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="--samples 4 with greedy decoding gives 4 identical trajectories"):
        cli(tmp_path, "--samples", "4")
    with pytest.raises(SystemExit, match="--chat-template-kwargs .*not JSON"):
        cli(tmp_path, "--chat-template-kwargs", "{enable_thinking: false}")
    with pytest.raises(EvalError, match="--reward-path .*nope.py: no such file"):
        evaluate_cli.load_reward(str(tmp_path / "nope.py"), None, None)


def test_a_custom_reward_is_loaded_as_verl_loads_it(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(
        "def score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):\n    return 2.0 + bonus\n"
    )
    fn = evaluate_cli.load_reward(str(path), "score", {"bonus": 0.5})
    assert fn(data_source="x", solution_str="y", ground_truth=["z"], extra_info=None) == 2.5
    with pytest.raises(EvalError, match="--reward-name nope"):
        evaluate_cli.load_reward(str(path), "nope", None)


def test_cheap_checks_come_before_a_merge(tmp_path, data_dir):
    """An unreachable retriever is reported before any checkpoint is merged (or model downloaded)."""
    actor = fake_fsdp_checkpoint(tmp_path)
    with pytest.raises(SystemExit, match="retriever http://127.0.0.1:9/retrieve"):
        cli(tmp_path, "--engine", "hf", model=str(actor), data=[str(data_dir / "test.parquet")])
    assert not (actor / "merged_hf").exists()


# ------------------------------------------------------------------------------------------------ scripts/eval.sh
SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "eval.sh"
#: The script's variables (a caller's shell may have exported some of them).
EVAL_VARIABLES = ("PROFILE", "MAX_ACTIONS", "MAX_ACTION_TOKENS", "TOPK", "MAX_PROMPT_LENGTH", "MAX_RESPONSE_LENGTH")
EVAL_VARIABLES += ("THINKING", "INVALID_ACTION", "CHAT_TEMPLATE_KWARGS", "MODEL_PATH", "BASELINE_PATH")


def run_eval_script(tmp_path, *extra, **variables):
    """scripts/eval.sh with `python3` replaced by a recorder: its exit, stderr and the CLI arguments it passed."""
    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    stub.chmod(0o755)
    keep = {k: v for k, v in os.environ.items() if k not in EVAL_VARIABLES}  # the caller's shell may set them
    env = {**keep, "PATH": f"{stub.parent}:{os.environ['PATH']}", "ARGS_OUT": str(tmp_path / "args")}
    env.update(TEST_FILES="a.parquet b.parquet", RETRIEVER_URL="http://h:1/retrieve", OUT="o", **variables)
    (tmp_path / "args").unlink(missing_ok=True)
    done = subprocess.run(["bash", str(SCRIPT), *extra], env=env, capture_output=True, text=True)
    args = (tmp_path / "args").read_text().split("\n")[:-1] if (tmp_path / "args").exists() else []
    return done, args


def flags_of(args):
    return dict(zip(args[2::1], args[3::1], strict=False))


def test_eval_script_leaves_the_rollout_settings_to_the_checkpoints_record(tmp_path):
    """scripts/eval.sh on a GPU node: vLLM, every test file, the baseline, extra flags; no budget flag unless asked
    (the CLI takes a checkpoint's recorded settings, else its defaults: run_carl_qwen7b.sh's)."""
    model = {"MODEL_PATH": "ckpt/global_step_9/actor", "BASELINE_PATH": "Qwen/Qwen2.5-7B-Instruct"}
    done, args = run_eval_script(tmp_path, "--samples", "4", **model)
    assert done.returncode == 0, done.stderr
    assert args[:2] == ["-m", "recipe.carl.evaluate"]
    flags = flags_of(args)
    assert flags["--model"] == "ckpt/global_step_9/actor" and flags["--baseline"] == "Qwen/Qwen2.5-7B-Instruct"
    assert args[args.index("--data") + 1 : args.index("--data") + 3] == ["a.parquet", "b.parquet"]
    assert flags["--engine"] == "vllm" and flags["--retriever-url"] == "http://h:1/retrieve"
    assert flags["--samples"] == "4"
    recorded = ("--max-actions", "--max-action-tokens", "--topk", "--prompt-length", "--response-length")
    recorded += ("--thinking", "--no-thinking", "--invalid-action", "--chat-template-kwargs")
    assert not set(recorded) & set(args)
    done, _ = run_eval_script(tmp_path)
    assert done.returncode != 0 and "set MODEL_PATH" in done.stderr


def test_eval_script_passes_the_variables_given(tmp_path):
    budgets = dict(MAX_ACTIONS="32", MAX_ACTION_TOKENS="512", TOPK="3", MAX_PROMPT_LENGTH="2048")
    budgets.update(MAX_RESPONSE_LENGTH="12288", INVALID_ACTION="feedback", CHAT_TEMPLATE_KWARGS='{"a": 1}')
    done, args = run_eval_script(tmp_path, MODEL_PATH="m", THINKING="false", **budgets)
    assert done.returncode == 0, done.stderr
    flags = flags_of(args)
    assert (flags["--max-actions"], flags["--max-action-tokens"], flags["--topk"]) == ("32", "512", "3")
    assert (flags["--prompt-length"], flags["--response-length"]) == ("2048", "12288")
    assert flags["--invalid-action"] == "feedback" and flags["--chat-template-kwargs"] == '{"a": 1}'
    assert "--no-thinking" in args and "--thinking" not in args
    done, _ = run_eval_script(tmp_path, MODEL_PATH="m", THINKING="yes")
    assert done.returncode == 2 and "THINKING=yes: use true or false" in done.stderr
    done, _ = run_eval_script(tmp_path, MODEL_PATH="m", PROFILE="qwen9")
    assert done.returncode == 2 and "PROFILE=qwen9 is unknown: use qwen3" in done.stderr


def test_eval_scripts_qwen3_profile_is_how_run_carl_qwen3_4b_trains(tmp_path):
    """PROFILE=qwen3 gives the CLI the agent settings scripts/run_carl_qwen3_4b.sh gives the trainer."""
    from recipe.carl.evaluate.settings import EvalSettings
    from tests.recipe.test_carl_config import script_overrides

    (tmp_path / "train").mkdir()
    overrides = script_overrides(SCRIPT.parent / "run_carl_qwen3_4b.sh", tmp_path / "train")
    trained = dict(o.split("=", 1) for o in overrides)
    done, args = run_eval_script(tmp_path, MODEL_PATH="Qwen/Qwen3-4B", PROFILE="qwen3")
    assert done.returncode == 0, done.stderr
    flags = flags_of(args)
    assert flags["--max-actions"] == trained["algorithm.carl.max_actions"] == "10"
    assert flags["--max-action-tokens"] == trained["algorithm.carl.max_action_tokens"] == "2048"
    assert flags["--response-length"] == trained["data.max_response_length"] == "16384"
    assert trained["algorithm.carl.thinking"] == "true" and "--thinking" in args
    assert "--prompt-length" not in flags and EvalSettings().prompt_length == int(trained["data.max_prompt_length"])
    # an explicit variable still wins over the profile
    _, args = run_eval_script(tmp_path, MODEL_PATH="m", PROFILE="qwen3", MAX_ACTIONS="6")
    assert flags_of(args)["--max-actions"] == "6"
