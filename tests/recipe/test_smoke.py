"""`python -m recipe.carl.smoke` (scripts/smoke_gpu.sh): the run script's command it builds composes against verl's
real config as the GPU scripts' do, its data fit its budgets, its model is a Qwen2 the GPU kernels take, and its
checks tell a finished run from a broken one. The whole smoke run on a CPU is the slow test at the end."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config

from recipe.carl import preflight, smoke
from recipe.carl.settings import check_trainer_config, read_settings
from tests.recipe.test_carl_config import compose_carl

ROOT = Path(__file__).resolve().parents[2]


def recorded_overrides(command: list[str], env: dict[str, str], tmp_path: Path) -> list[str]:
    """Runs the command with `python3` replaced by a recorder; returns main_carl's overrides."""
    shim = tmp_path / "python3"
    shim.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$CARL_ARGS_OUT"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, **env, "PATH": f"{tmp_path}:{os.environ['PATH']}", "CARL_ARGS_OUT": str(tmp_path / "args")}
    subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True).check_returncode()
    args = (tmp_path / "args").read_text().split("\0")[:-1]
    assert args[:2] == ["-m", "recipe.carl.main_carl"]
    return args[2:]


@pytest.mark.parametrize("algo", ["carl", "grpo"])
@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_the_smoke_runs_command_composes_against_verls_config(algo, device, tmp_path):
    files = {"train": tmp_path / "train.parquet", "val": tmp_path / "val.parquet"}
    command, env = smoke.train_command(algo, str(tmp_path / "model"), files, tmp_path / "ckpt", 1, device)
    cfg = compose_carl(recorded_overrides(command, env, tmp_path))
    settings = check_trainer_config(cfg)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    preflight.check_batch(cfg)
    assert cfg.algorithm.adv_estimator == algo and cfg.trainer.total_training_steps == smoke.STEPS == 2
    assert cfg.actor_rollout_ref.model.path == str(tmp_path / "model")
    assert (cfg.trainer.save_freq, cfg.trainer.max_actor_ckpt_to_keep, cfg.trainer.test_freq) == (1, 1, 2)
    assert cfg.trainer.default_local_dir == f"{tmp_path}/ckpt/smoke_{algo}" and list(cfg.trainer.logger) == [
        "console",
        "file",
    ]
    assert (cfg.data.train_batch_size, cfg.actor_rollout_ref.actor.ppo_mini_batch_size) == (4, 2)
    assert cfg.actor_rollout_ref.rollout.n == (4 if algo == "grpo" else 1)
    assert read_settings(cfg).dump_every == 1 and settings.max_action_tokens == 64
    assert cfg.actor_rollout_ref.rollout.name == ("carl_hf" if device == "cpu" else "vllm")
    assert cfg.trainer.n_gpus_per_node == 1 and cfg.trainer.nnodes == 1


def test_the_data_fit_the_smoke_budgets(tmp_path):
    """Every row passes main_carl's data check, and the longest prompt fits MAX_PROMPT_LENGTH with the tiny model's
    byte-level tokenizer (the data filter would otherwise drop it)."""
    from recipe.carl.cpu.tiny_model import build_tokenizer

    files = smoke.prepare_data(tmp_path)
    tok = build_tokenizer()
    for name, agent in (("train", "carl_agent"), ("val", "carl_chain_agent")):
        rows = pq.read_table(files[name]).to_pylist()  # as main_carl's data check reads them
        assert len(rows) == (16 if name == "train" else 8) and {r["agent_name"] for r in rows} == {agent}
        known = {"carl_agent", "carl_chain_agent"}
        assert all(preflight.row_problems(r, r["agent_name"], known) == [] for r in rows)
        longest = max(len(tok.apply_chat_template(list(r["prompt"]), add_generation_prompt=True)) for r in rows)
        assert longest <= int(smoke.SMOKE_ENV["MAX_PROMPT_LENGTH"])
    assert sum(1 for _ in files["corpus"].open()) == 300


def test_the_random_model_is_a_qwen2_with_head_size_64(tmp_path):
    path = smoke.prepare_model(tmp_path, "random")
    config = json.loads((Path(path) / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # flash-attn and vLLM take it
    assert smoke.prepare_model(tmp_path, "Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def finished_run(root: Path) -> Path:
    """A checkpoint folder as a finished 2-step CARL smoke run leaves it."""
    run = root / "smoke_carl"
    lines = [(0, {"val-aux/smoke/em/mean@1": 0.0})]
    lines += [(s, {"carl/questions": 4.0, "carl/total/actions_generated": 20.0 * s}) for s in (1, 2)]
    lines[2][1]["val-aux/smoke/em/mean@1"] = 0.0
    (run / "global_step_2" / "actor").mkdir(parents=True)
    (run / "global_step_1").mkdir()
    for name in ("carl_run_config.json", "carl_totals.json"):
        (run / "global_step_2" / name).write_text("{}")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "data": d}) + "\n" for s, d in lines))
    (run / "carl_trees").mkdir()
    for s in (1, 2):
        (run / "carl_trees" / f"step_{s:06d}.jsonl").write_text("{}\n")
    return run


def test_the_checks_pass_a_finished_run_and_name_what_is_missing(tmp_path):
    run = finished_run(tmp_path)
    assert all(ok for _, ok in smoke.checks(run, "carl"))
    (run / "global_step_1" / "actor").mkdir()  # MAX_CKPT_TO_KEEP did not delete it
    (run / "carl_trees" / "step_000002.jsonl").unlink()
    failed = [name for name, ok in smoke.checks(run, "carl") if not ok]
    assert failed == ["MAX_CKPT_TO_KEEP=1 deleted global_step_1/actor", "tree dumps (carl_trees/)"]
    empty = [name for name, ok in smoke.checks(tmp_path / "never_ran", "grpo") if not ok]
    assert len(empty) == 8  # no check passes on a folder the run never wrote


@pytest.mark.slow
def test_the_smoke_run_passes_on_a_cpu(tmp_path):
    """The whole smoke run, CARL through scripts/run_carl_qwen7b.sh in its CPU form (~3 min on 2 cores)."""
    code = smoke.main(["--out", str(tmp_path / "smoke"), "--device", "cpu"])
    checks = json.loads((tmp_path / "smoke" / "checks.json").read_text())
    assert code == 0, (checks, (tmp_path / "smoke" / "train.log").read_text()[-3000:])
    assert len(checks) == 12 and all(checks.values())
