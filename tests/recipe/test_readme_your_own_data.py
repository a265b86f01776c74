"""README "Your own data", run as written: corpus -> scripts/launch_retriever.sh -> data_preprocess.qa_file ->
recipe.carl.evaluate -> scripts/run_carl_qwen7b.sh -> recipe.carl.evaluate of the checkpoint against the start;
then scripts/eval.sh on the checkpoint with no budget given, which takes the settings the run recorded.

The commands are read from the README's code block and run from the repository root with only the substitutions in
`adapt` (paths under a temporary folder, a free port, the shipped tiny policy and its budgets, the CPU form of the
training script), so the README cannot drift from what CI runs. The corpus and questions are generated here
(SynthHop, the shipped policy's knowledge base, written in the generic formats the README asks for). Slow: ~70 s
on 2 cores, most of it verl's trainer start-up.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from recipe.carl.synthhop.make_data import SynthHopConfig, build, write
from tests.recipe.cpu.grpo_smoke import _kill, _session_pids

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "recipe" / "carl" / "tiny" / "checkpoints" / "sft_seed0"
MODEL_ID = "Qwen/Qwen2.5-7B-Instruct"
#: The shipped tiny policy's budgets (its turns are a few words; its context holds 1024 positions).
TINY_EVAL = "--engine hf --topk 3 --max-actions 3 --max-action-tokens 32 --prompt-length 256 --response-length 384"
#: Sizes of a 1-step CARL run of the tiny policy: the CPU form of scripts/run_carl_qwen7b.sh (docs/your_own_data.md).
TINY_TRAIN_ENV = {
    "CARL_DEVICE": "cpu",
    "GPUS_PER_NODE": "1",
    "TRAIN_BATCH_SIZE": "2",
    "N0": "2",
    "N_FORKS": "2",
    "MAX_ACTIONS": "3",
    "MAX_ACTION_TOKENS": "32",
    "TOTAL_STEPS": "1",
    "PPO_MINI_BATCH_QUESTIONS": "2",
    "MAX_PROMPT_LENGTH": "256",
    "MAX_RESPONSE_LENGTH": "384",
    "EXPERIMENT": "carl_n08_qwen2.5_7b",
}
#: The agent settings that run records (TINY_TRAIN_ENV's budgets; top-3 from recipe/carl/search/search_tool.yaml).
TINY_AGENT = {
    "max_actions": 3,
    "max_action_tokens": 32,
    "thinking": False,
    "invalid_action": "end",
    "prompt_length": 256,
    "response_length": 384,
    "chat_template_kwargs": {},
    "topk": 3,
    "action_space": "search_r1",  # the script's default ACTION_SPACE (issue 30), recorded for evaluation
    "page_chunk_chars": 4000,
}
CPU_OVERRIDES = [
    "+device=cpu",
    "actor_rollout_ref.rollout.name=carl_hf",
    "actor_rollout_ref.model.use_remove_padding=False",
    "actor_rollout_ref.model.enable_gradient_checkpointing=False",
    "trainer.logger=[console,file]",
    "trainer.save_freq=1",
    "trainer.test_freq=-1",
    "trainer.val_before_train=False",
]


def readme_commands() -> list[str]:
    """The command lines of the README's "Your own data" code block (comments dropped)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Your own data\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def write_fixture(root: Path) -> None:
    """`data/myqa/{corpus,train,test}.jsonl`: a 300-document corpus and 8 + 8 questions in the generic formats."""
    data = build(SynthHopConfig(seed=0, n_entities=300, n_train=8, n_test=8))
    synthhop = root / "synthhop"
    write(data, synthhop, overwrite=True)
    myqa = root / "data" / "myqa"
    myqa.mkdir(parents=True)
    (myqa / "corpus.jsonl").write_text((synthhop / "corpus.jsonl").read_text())
    for split, questions in (("train", data.train), ("test", data.test)):
        lines = [
            json.dumps({"id": f"{split}{i}", "question": q.text, "answers": [q.answer]})
            for i, q in enumerate(questions)
        ]
        (myqa / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def adapt(line: str, root: Path, url: str | None) -> str:
    """The substitutions that make a README line run here (listed in docs/your_own_data.md)."""
    for prefix in ("data/", "runs/", "checkpoints"):
        line = re.sub(rf"(?<![\w/.]){prefix}", f"{root}/{prefix}", line)
    line = line.replace(MODEL_ID, str(SHIPPED))
    if url:
        line = line.replace("http://127.0.0.1:8000/retrieve", url)
    if "recipe.carl.evaluate" in line:
        line += f" {TINY_EVAL}"
    if "run_carl_qwen7b.sh" in line:
        line += " " + " ".join(shlex.quote(o) for o in CPU_OVERRIDES)
    return line.replace("global_step_100", "global_step_1")


def run_line(line: str, env: dict[str, str], log: Path, timeout: int) -> None:
    """Runs one line with bash from the repository root in its own session; its leftovers are killed after it."""
    with log.open("ab") as out:
        out.write(f"\n$ {line}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            ["bash", "-c", line], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        finally:
            _kill(_session_pids(proc.pid, env.get("CARL_RAY_MARKER", "\0")))
    assert code == 0, f"`{line}` exited {code}; the last lines of {log}:\n" + "\n".join(
        log.read_text(errors="replace").splitlines()[-40:]
    )


def test_readme_your_own_data_sequence_retriever_preprocess_evaluate_train_evaluate(tmp_path):
    commands = readme_commands()
    kinds = ["launch_retriever.sh", "RETRIEVER_URL=", "--split train", "--split test", "--out runs/myqa_start"]
    kinds += ["run_carl_qwen7b.sh", "--baseline"]
    assert len(commands) == len(kinds) and all(k in c for k, c in zip(kinds, commands, strict=True)), commands
    write_fixture(tmp_path)
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    log = tmp_path / "commands.log"
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",  # `python`/`python3` of this environment
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        VERL_FILE_LOGGER_PATH=str(tmp_path / "metrics.jsonl"),
        RAY_AUTH_MODE="disabled",
        HYDRA_FULL_ERROR="1",
        TOKENIZERS_PARALLELISM="false",
        CARL_RAY_MARKER=ray_dir,
    )
    started = time.monotonic()

    # 1. The retriever, through the script, on a free port.
    launch = [
        "bash",
        "-c",
        f"PORT=0 PORT_FILE={tmp_path}/port {adapt(commands[0].rstrip('&').strip(), tmp_path, None)}",
    ]
    with (tmp_path / "retriever.log").open("wb") as out:
        server = subprocess.Popen(
            launch, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "port").exists() or not (tmp_path / "port").read_text().strip():
            assert server.poll() is None, (tmp_path / "retriever.log").read_text()
            assert time.monotonic() < deadline, "the retriever did not start in 120 s"
            time.sleep(0.2)
        url = f"http://127.0.0.1:{(tmp_path / 'port').read_text().strip()}/retrieve"
        env["RETRIEVER_URL"] = adapt(commands[1], tmp_path, url).split("=", 1)[1]  # the README's `export`
        assert env["RETRIEVER_URL"] == url

        # 2. Preprocessing; 3. the start model.
        for line in commands[2:5]:
            run_line(adapt(line, tmp_path, url), env, log, timeout=300)
        for split in ("train", "test"):
            frame = pd.read_parquet(tmp_path / "data" / "myqa" / f"{split}.parquet")
            assert len(frame) == 8 and set(frame["data_source"]) == {"myqa"}
        start = json.loads((tmp_path / "runs" / "myqa_start" / "results.json").read_text())
        table = start["models"]["sft_seed0"]["tables"]["myqa"]
        assert table["questions"] == 8 and sum(table["finish_reasons"].values()) == pytest.approx(1.0)
        lines = (tmp_path / "runs" / "myqa_start" / "sft_seed0" / "myqa.jsonl").read_text().splitlines()
        assert len(lines) == 8

        # 4. CARL, one step, through the GPU script in its CPU form.
        run_line(
            " ".join(f"{k}={v}" for k, v in TINY_TRAIN_ENV.items()) + " " + adapt(commands[5], tmp_path, url),
            env,
            log,
            timeout=900,
        )
        metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert [m["step"] for m in metrics] == [1] and metrics[0]["data"]["carl/trees"] == 2.0
        actor = tmp_path / "checkpoints" / "carl_n08_qwen2.5_7b" / "global_step_1" / "actor"
        assert (actor / "model_world_size_1_rank_0.pt").exists()
        # The trainer recorded the run's agent settings beside the checkpoint (recipe.carl.run_record).
        record = actor.parent / "carl_run_config.json"
        assert json.loads(record.read_text())["agent"] == TINY_AGENT
        assert (actor.parent.parent / "carl_run_config.json").read_text() == record.read_text()

        # 5. The checkpoint (its FSDP shards merged by verl's merger) against the start.
        run_line(adapt(commands[6], tmp_path, url), env, log, timeout=300)
        result = json.loads((tmp_path / "runs" / "myqa_step100" / "results.json").read_text())

        # 6. scripts/eval.sh on the checkpoint with no budget variable: the recorded settings apply (on a CPU: hf).
        eval_sh = f"MODEL_PATH={actor} TEST_FILES={tmp_path}/data/myqa/test.parquet OUT={tmp_path}/runs/eval_sh"
        run_line(f"{eval_sh} bash scripts/eval.sh --engine hf --limit 2", env, log, timeout=300)
        by_script = json.loads((tmp_path / "runs" / "eval_sh" / "results.json").read_text())["settings"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert (actor / "merged_hf" / "merged_from.json").exists()
    assert list(result["models"]) == ["carl_n08_qwen2.5_7b/global_step_1", "sft_seed0"]
    compared = result["comparison"]["myqa"]["em"]
    assert compared["n"] == 8 and compared["low"] <= compared["diff"] <= compared["high"]
    assert result["settings"]["recorded_run"] == str(record) and result["settings"]["overrides"] == {}
    assert by_script["recorded_run"] == str(record) and {k: by_script[k] for k in TINY_AGENT} == TINY_AGENT
    print(f"README 'Your own data' sequence: {time.monotonic() - started:.0f} s")
