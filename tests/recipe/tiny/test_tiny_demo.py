"""The embedded default's entry point (`python -m recipe.carl.tiny.demo`): the CI smoke run, its outputs, its bad
inputs, and the trainer config it composes."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipe.carl.io import read_jsonl
from recipe.carl.tiny import cli, demo
from recipe.carl.tiny.config import ROLLOUT_DEVICES, DemoConfig
from recipe.carl.tiny.demo import main, trainer_overrides
from recipe.carl.tiny.launch import NOISE
from tests.core.support import check_tree_record

REPO = Path(__file__).resolve().parents[3]
CONFIG_DIR = REPO / "recipe" / "carl" / "config"


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
    names = ("metrics.jsonl", "learning_curve.png", "tree.png", "summary.json", "train.log", "train.full.log")
    for name in (*names, "command.txt"):
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo"] == "carl" and summary["curve"]["step"] == [0, 2]  # validation before and after training
    # Tiny mode: 2 sampled episodes per question, as 2 copies of each question in val.parquet with one episode each.
    assert summary["accuracy_metric"] == "val-aux/synthhop/em/mean@1"
    assert summary["n_questions"] == 8 and summary["episodes_per_question"] == 2 and len(summary["curve"]["se"]) == 2
    assert 0.0 <= summary["degenerate_tree_fraction"] <= 1.0 and "zero_advantage_fraction" in summary
    assert {"RL steps", "validations", "trainer start-up", "greedy check"} <= set(summary["phases_s"])
    for text in ("held-out accuracy, sampled at T=0.7", "held-out accuracy, greedy", "trees with no signal", " ± "):
        assert text in proc.stdout, text
    # The trained policy is kept as a Hugging Face folder, and the greedy check read both policies.
    assert (run_dir / "policy_rl" / "model.safetensors").stat().st_size > 0
    assert 0.0 <= summary["greedy_before"] <= 1.0 and 0.0 <= summary["greedy_after"] <= 1.0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 1 in steps and 2 in steps


@pytest.mark.slow
def test_the_run_folder_is_readable_by_others_and_its_log_is_quiet(tiny_run):
    run_dir, proc = tiny_run
    umask = os.umask(0)
    os.umask(umask)
    private = [str(p) for p in run_dir.rglob("*") if p.is_file() and p.stat().st_mode & 0o777 != 0o666 & ~umask]
    assert private == [], f"files without the public mode: {private[:5]}"  # tree dumps, policy_rl weights, ...
    quiet, full = (run_dir / "train.log").read_text(), (run_dir / "train.full.log").read_text()
    assert not any(noise in quiet for noise in NOISE) and len(quiet) < len(full)
    assert "should not exceed total physical CPU cores" not in full  # silenced at its source (TQ_NUM_THREADS)


@pytest.mark.slow
def test_every_dumped_tree_satisfies_the_invariants(tiny_run):
    run_dir, proc = tiny_run
    dumps = sorted((run_dir / "ckpt" / "carl_trees").glob("step_*.jsonl"))
    assert len(dumps) == 2, proc.stdout[-2000:]
    for dump in dumps:
        for record in read_jsonl(dump):
            check_tree_record(record)  # values are child means, A = V(v) - V(u), only branched states train
            assert record["question"] and all("text" in n for n in record["nodes"])


def test_command_txt_reruns_the_same_run(tmp_path, monkeypatch):
    # Relative folder, ALGO from the environment: command.txt must not depend on either.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALGO", "grpo")
    argv = ["--run-dir", "rel/run", "--steps", "3", "--rl-seed", "2"]
    p = cli.parser()
    args = p.parse_args(argv)
    line = cli.rerun_command(args, argv)
    cd, rest = line.strip().split(" && ", 1)
    assert cd == f"cd {shlex.quote(str(REPO))}"
    words = shlex.split(rest)
    assert words[:3] == [sys.executable, "-m", "recipe.carl.tiny.demo"] and words[-1] == "--overwrite"
    monkeypatch.delenv("ALGO")
    monkeypatch.chdir(REPO)
    p = cli.parser()  # its --algo default no longer comes from ALGO
    again = p.parse_args(words[3:])
    assert again.run_dir == tmp_path / "rel" / "run" and again.overwrite
    assert cli.config_from(again, p) == cli.config_from(args, p) and cli.config_from(again, p).algo == "grpo"
    assert "carl-" not in line and "ray" not in line.lower()  # no temporary Ray folder


def _run_main(argv: list[str]) -> subprocess.CompletedProcess:
    """`main(argv)` in a fresh interpreter that then reports whether torch or verl were imported."""
    code = (
        "import sys\nfrom recipe.carl.tiny.demo import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
        "    print('LOADED', sorted(m for m in ('torch', 'verl', 'ray') if m in sys.modules))\n"
    )
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "argument --steps: must be > 0, got 0"),
        (["--sft-steps", "-3"], "argument --sft-steps: must be > 0, got -3"),
        (["--lr", "0"], "argument --lr: must be > 0, got 0"),
        (["--temperature", "-1"], "argument --temperature: must be > 0, got -1"),
        (["--test-freq", "x"], "argument --test-freq: invalid int value: 'x'"),
        (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        (["--port", "99999"], "argument --port: 99999 is not a port: use 1-65535, or 0 for a free one"),
        (["--tiny", "--policy", "smollm2"], "--tiny is the CI smoke mode"),
    ],
)
def test_bad_flags_are_named_before_anything_is_loaded_or_written(tmp_path, argv, message):
    proc = _run_main([*argv, "--run-dir", str(tmp_path / "run")])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "LOADED []" in proc.stdout  # no torch, verl or Ray imported: it failed at once
    assert not (tmp_path / "run").exists()


def test_a_retriever_port_in_use_is_named_before_anything_is_written(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = _run_main(["--tiny", "--run-dir", str(tmp_path / "run"), "--port", str(port)])
    assert proc.returncode == 2 and f"argument --port: port {port} is not free" in proc.stderr, proc.stderr
    assert "LOADED []" in proc.stdout and not (tmp_path / "run").exists()


def test_a_run_folder_that_holds_a_run_is_refused_and_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    proc = _run_main(["--run-dir", str(tmp_path / "run")])
    assert proc.returncode == 2 and "already holds a run; pass --overwrite" in proc.stderr
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    (tmp_path / "file").write_text("")
    proc = _run_main(["--run-dir", str(tmp_path / "file")])
    assert proc.returncode == 2 and "is a file; give a folder" in proc.stderr


def test_the_flags_choose_the_default_run_the_smoke_mode_or_smollm2(tmp_path):
    p = cli.parser()

    def config(*argv):
        return cli.config_from(p.parse_args([*argv, "--run-dir", str(tmp_path / "run")]), p)

    assert config() == DemoConfig()  # 30 steps, 100 held-out questions: the README's run
    assert config("--tiny") == DemoConfig.tiny()
    assert config("--policy", "smollm2", "--algo", "grpo") == DemoConfig.smollm2("grpo")
    assert config("--steps", "7", "--rl-seed", "3", "--test-freq", "5") == DemoConfig(steps=7, rl_seed=3, test_freq=5)
    # The tree's knobs: the default run packs rows per tree and merges identical actions, with the paper's forks.
    assert (DemoConfig().packing, DemoConfig().merge, DemoConfig().selection) == ("tree", True, "density")
    wanted = DemoConfig(selection="spread", packing="path", merge=False)
    assert config("--selection", "spread", "--packing", "path", "--no-merge") == wanted


def test_every_flag_has_help():
    p = cli.parser()
    missing = [a.option_strings for a in p._actions if not a.help and a.option_strings != ["-h", "--help"]]
    assert missing == [], missing
    assert "folder for the run's outputs" in p.format_help() and "train a small CARL search agent" in p.format_help()
    assert cli.DESCRIPTION == demo.__doc__.splitlines()[0]  # --help says what the module's docstring says


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["--run-dir", str(tmp_path / "run")])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert exit_.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted: the trainer and its Ray session are stopped")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # main() installed its handler in this process


def _compose(cfg: DemoConfig, tmp_path: Path):
    from hydra import compose, initialize_config_dir

    overrides = trainer_overrides(cfg, tmp_path, tmp_path / "data", tmp_path / "sft", tmp_path / "tool.yaml")
    device = f"+device={ROLLOUT_DEVICES[cfg.rollout]}"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="carl_trainer", overrides=["+demo=tiny_cpu", device, *overrides])


def test_the_demo_yaml_only_sets_keys_the_trainer_has(tmp_path):
    # A misspelt key in config/demo/tiny_cpu.yaml would be added silently; every key must exist without it.
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    own = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "demo" / "tiny_cpu.yaml"))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        base = compose(config_name="carl_trainer", overrides=["+device=cpu"])
    keys = [k for k in leaves({k: v for k, v in own.items() if k != "hydra"}) if k != "defaults"]
    assert len(keys) >= 15
    assert [k for k in keys if OmegaConf.select(base, k, default="<missing>") == "<missing>"] == []


def test_the_composed_trainer_config_carries_the_run_and_the_yaml(tmp_path):
    from omegaconf import OmegaConf

    config = _compose(DemoConfig(temperature=0.5, val_samples=3), tmp_path)
    rollout = config.actor_rollout_ref.rollout
    assert rollout.name == "carl_hf" and rollout.temperature == 0.5
    assert rollout.val_kwargs.temperature == 0.5 and rollout.val_kwargs.do_sample
    assert rollout.val_kwargs.n == 1 and config.data.val_files.endswith("val.parquet")  # val_samples copies, n=1
    assert config.actor_rollout_ref.actor.ppo_mini_batch_size == 16 and config.algorithm.adv_estimator == "carl"
    assert config.trainer.save_freq == 30 and config.trainer.default_local_dir == str(tmp_path / "ckpt")
    assert config.trainer.v1.sampler.custom_sampler.name == "QuickPollReplayBuffer"
    assert OmegaConf.to_container(config, resolve=True)  # every interpolation resolves
    grpo = _compose(DemoConfig(algo="grpo", grpo_group=16), tmp_path)
    assert grpo.algorithm.adv_estimator == "grpo" and grpo.actor_rollout_ref.rollout.n == 16
    assert grpo.actor_rollout_ref.actor.ppo_mini_batch_size == 16  # one update a step, as CARL's


def test_ablation_and_smollm2_knobs_reach_the_trainer(tmp_path):
    cfg = DemoConfig(selection="random", update_set="all_inherit", n0=8, n_forks=16)
    overrides = set(trainer_overrides(cfg, tmp_path, tmp_path, tmp_path, tmp_path / "t.yaml"))
    assert {"algorithm.carl.selection=random", "algorithm.carl.update_set=all_inherit"} <= overrides
    assert {"algorithm.carl.n0=8", "algorithm.carl.n_forks=16"} <= overrides
    smol = set(trainer_overrides(DemoConfig.smollm2(), tmp_path, tmp_path, tmp_path, tmp_path / "t.yaml"))
    assert {
        "data.max_response_length=1024",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=2048",
        "actor_rollout_ref.model.enable_gradient_checkpointing=True",
    } <= smol
    with pytest.raises(ValueError, match="micro_batch_tokens 1000: a micro-batch must hold one whole row.* 1216"):
        DemoConfig(policy="smollm2", max_prompt_length=192, max_response_length=1024, micro_batch_tokens=1000)


def test_validation_steps_follow_test_freq():
    assert DemoConfig().validations() == [0, 10, 20, 30]
    assert DemoConfig(test_freq=30).validations() == [0, 30]
    assert DemoConfig(steps=7, test_freq=3).validations() == [0, 3, 6, 7]


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
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    left = subprocess.run(["pgrep", "-af", str(run_dir)], capture_output=True, text=True).stdout
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
    assert 0.0 <= summary["degenerate_tree_fraction"] <= 1.0 and "groups with no signal" in proc.stdout
    log = (run_dir / "train.log").read_text()
    assert "'adv_estimator': 'grpo'" in log and "'n': 4" in log  # verl prints the resolved config
    assert not (run_dir / "ckpt" / "carl_trees").exists()  # no trees: verl's GRPO on one trajectory per session
    # One chain per session: at most group (4) x T_max (3) actions per question, all trained. (The rows name
    # carl_agent; when the tree loop ran under GRPO, each of the 4 sessions grew a whole tree.)
    rows = [json.loads(line)["data"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    budget = [r for r in rows if "carl/actions_generated_per_question" in r]
    assert len(budget) == 2
    for r in budget:
        assert r["carl/questions"] == 2 and 4 <= r["carl/actions_generated_per_question"] <= 4 * 3
        assert r["carl/actions_trained_per_question"] == r["carl/actions_generated_per_question"]
