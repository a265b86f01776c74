"""The trainer as the demo's child, with stand-in trainers: the quiet log, the phases, the time left, the stop."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from recipe.carl.tiny import launch
from recipe.carl.tiny.launch import NOISE, TrainerRun, is_noise, keep_trained_policy, write_tool_yaml, write_val_file

# A stand-in trainer: Ray's start line, a repeated warning, verl's phase lines, two steps in the metrics file.
FAKE_TRAINER = textwrap.dedent(
    """
    import json, sys, time
    metrics = sys.argv[1]
    def log(step, **data):
        with open(metrics, "a") as f:
            f.write(json.dumps({"step": step, "data": data}) + "\\n")
    print("INFO worker.py:2038 -- Started a local Ray instance.", flush=True)
    print("(TaskRunnerV1 pid=1) Using dataset class: RLHFDataset", flush=True)
    print("(WorkerDict pid=4) Total steps: 2, num_warmup_steps: 0", flush=True)
    for i in range(3):
        print("(AgentLoopWorkerTQ pid=2) WARNING: No model-specific Continuous Token builder is registered for "
              "config.json model_type='llama'; falling back to default.", flush=True)
        print("(SimpleStorageUnit pid=3) target_num_threads 8 should not exceed total physical CPU cores 2.",
              flush=True)
    time.sleep(0.3)
    print("(TaskRunnerV1 pid=1) Initial validation metrics: {}", flush=True)
    log(0, **{"val-aux/synthhop/em/mean@4": 0.3})
    time.sleep(0.3)
    log(1, **{"timing_s/step": 0.25})
    log(2, **{"timing_s/step": 0.25, "timing_s/testing": 0.1, "val-aux/synthhop/em/mean@4": 0.4})
    print("training done", flush=True)
    """
)


def test_the_quiet_log_leaves_out_the_repeated_warnings_and_the_full_log_keeps_them(tmp_path):
    run = TrainerRun(
        [sys.executable, "-c", FAKE_TRAINER, str(tmp_path / "metrics.jsonl")], dict(os.environ), tmp_path, 2, [0, 2], 60
    )
    assert run.run(cwd=tmp_path) == 0
    full = (tmp_path / "train.full.log").read_text()
    quiet = (tmp_path / "train.log").read_text()
    assert full.count("Continuous Token builder") == 3 and full.count("physical CPU cores") == 3
    assert not any(noise in quiet for noise in NOISE)
    assert "Initial validation metrics" in quiet and "training done" in quiet
    assert quiet.count("\n") == full.count("\n") - 6
    # Phases: start-up until the first validation began (its first agent-loop session), then that validation.
    # ("Before FSDP" never comes here: a missing marker is skipped.)
    assert list(run.marks) == [
        "starting the trainer",
        "loading the data",
        "starting the rollout workers",
        "validating the start",
        "first RL step",
    ]
    phases = run.phases()
    assert phases["RL steps"] == 0.5 and 0.3 <= phases["validations"] < 1.5
    assert sum(phases.values()) == pytest.approx(run.end - run.start, abs=0.5)


def test_is_noise_matches_the_two_warnings_only():
    assert is_noise("(pid=1) No model-specific Continuous Token builder is registered for config.json")
    assert is_noise("target_num_threads 8 should not exceed total physical CPU cores 2. Setting to 2.")
    assert not is_noise("(TaskRunnerV1 pid=605) Traceback (most recent call last):")


def test_the_phase_after_the_first_step_is_the_step_or_its_validation(tmp_path):
    run = TrainerRun(["true"], {}, tmp_path, steps=30, validations=[0, 10, 20, 30], timeout_s=60, sessions_per_step=16)
    assert run._phase([], 0) == "starting Ray"
    run.sessions_at_step, run.sessions = 100, 116  # step 10's 16 trees
    assert run._phase([], 9) == "RL step 10"
    run.sessions = 117  # one more session after them: the validation after step 10
    assert run._phase([], 9) == "validating after step 10"
    assert run._phase([], 8) == "RL step 9"  # no validation after step 9
    assert run._phase([], 30) == "saving the policy, stopping Ray"


def test_time_left_uses_the_measured_steps_and_validations(tmp_path):
    run = TrainerRun(["true"], {}, tmp_path, steps=30, validations=[0, 10, 20, 30], timeout_s=60)
    assert "known after the first step" in run._time_left([{"step": 0}], 0)
    rows = [{"step": s, "timing_s/step": 10.0} for s in range(1, 11)] + [{"step": 10, "timing_s/testing": 40.0}]
    # 20 steps x 10 s + 2 validations x 40 s = 280 s.
    assert run._time_left(rows, 10) == "about 5 min left"
    assert (
        run._time_left([*rows, {"step": 29, "timing_s/step": 10.0}], 29) == "about 50 s left"
    )  # 1 step + the last validation


STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
POLITE = (
    "import signal, sys, time\n"
    "def bye(*_):\n    open(sys.argv[1], 'w').write('clean'); sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, bye); print('up', flush=True); time.sleep(60)"
)


def _started(tmp_path, code, *args) -> TrainerRun:
    run = TrainerRun([sys.executable, "-c", code, *args], dict(os.environ), tmp_path, 1, [0, 1], 60)
    run.proc = subprocess.Popen(run.cmd, stdout=subprocess.PIPE, start_new_session=True)
    assert run.proc.stdout.readline() == b"up\n"
    return run


def test_stop_asks_the_driver_to_shut_down_first(tmp_path):
    run = _started(tmp_path, POLITE, str(tmp_path / "bye"))
    run.stop()
    assert (tmp_path / "bye").read_text() == "clean" and run.proc.returncode == 0


def test_stop_kills_a_trainer_that_ignores_sigterm_after_the_grace_time(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "STOP_GRACE_S", 0.5)
    run = _started(tmp_path, STUBBORN)
    run.stop()  # the stubborn trainer ignores SIGTERM forever: only the kill after the grace time ends it
    assert run.proc.returncode == -signal.SIGKILL


def test_ctrl_c_in_the_progress_loop_stops_the_trainer(tmp_path, monkeypatch):
    stopped = []
    monkeypatch.setattr(TrainerRun, "stop", lambda self: stopped.append(self.proc.pid))
    monkeypatch.setattr(launch.time, "sleep", lambda s: (_ for _ in ()).throw(KeyboardInterrupt))
    run = TrainerRun([sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ), tmp_path, 1, [0], 60)
    with pytest.raises(KeyboardInterrupt):
        run.run(cwd=tmp_path)
    assert stopped == [run.proc.pid]
    run.proc.kill()


RAY_DRIVER = textwrap.dedent(
    """
    import os, time, ray
    ray.init(num_cpus=1, include_dashboard=False)
    @ray.remote
    class Sleeper:
        def pid(self):
            return os.getpid()
    actor = Sleeper.remote()
    print("actor", ray.get(actor.pid.remote()), flush=True)
    while True:
        time.sleep(1)
    """
)


@pytest.mark.slow
def test_stop_ends_the_trainers_ray_session(tmp_path):
    # The trainer is a Ray driver; SIGTERM must end its session's processes (GCS, raylet, workers), not only it.
    ray_tmp = Path(tempfile.mkdtemp(prefix="carl-t-", dir="/tmp"))  # short: Ray's socket paths < 108 bytes
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled"}
    run = TrainerRun([sys.executable, "-c", RAY_DRIVER], env, tmp_path, 1, [0], 120)
    run.proc = subprocess.Popen(run.cmd, env=env, stdout=subprocess.PIPE, start_new_session=True)
    line = run.proc.stdout.readline().decode()
    actor = int(line.split()[1])

    def session_processes() -> str:  # every process of this Ray session names its temp folder
        out = subprocess.run(["pgrep", "-af", str(ray_tmp)], capture_output=True, text=True).stdout
        return "".join(p for p in out.splitlines(True) if "pgrep" not in p)

    assert session_processes(), "the Ray session's processes should name its temp folder"
    run.stop()
    assert run.proc.returncode is not None
    deadline = time.time() + 30
    while (session_processes() or Path(f"/proc/{actor}").exists()) and time.time() < deadline:
        time.sleep(0.5)
    assert not Path(f"/proc/{actor}").exists(), "the Ray actor outlived the stop"
    assert session_processes() == "", "Ray session processes outlived the stop"
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_kept_policy_is_readable_by_others(tmp_path):
    saved = tmp_path / "ckpt" / "global_step_3" / "actor" / "huggingface"
    saved.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (saved / name).write_text("{}")
        os.chmod(saved / name, 0o600)  # as verl writes its weights
    out = keep_trained_policy(tmp_path, 3)
    assert out == tmp_path / "policy_rl" and not saved.exists()
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(SystemExit, match="saved no policy"):
        keep_trained_policy(tmp_path, 4)


def test_the_tool_yaml_is_written_from_data(tmp_path):
    from omegaconf import OmegaConf

    path = write_tool_yaml(tmp_path, topk=2)
    tool = OmegaConf.load(path).tools[0]
    assert tool.config.topk == 2 and tool.class_name == "recipe.carl.search.search_tool.CarlSearchTool"
    assert "${oc.env:RETRIEVER_URL" in path.read_text()  # the URL is still read from the trainer's environment
    os.environ["RETRIEVER_URL"] = "http://127.0.0.1:1234/retrieve"
    try:
        assert tool.config.retrieval_service_url == "http://127.0.0.1:1234/retrieve"
    finally:
        del os.environ["RETRIEVER_URL"]
    assert json.loads(json.dumps(OmegaConf.to_container(tool, resolve=False)))["config"]["max_retries"] == 2


def test_the_validation_file_holds_each_question_once_per_episode(data_dir, tmp_path):
    import shutil

    import pandas as pd

    shutil.copy(data_dir / "test.parquet", tmp_path / "test.parquet")
    test = pd.read_parquet(tmp_path / "test.parquet")
    val = pd.read_parquet(write_val_file(tmp_path, copies=3))
    assert len(val) == 3 * len(test)
    questions = [e["question"] for e in val["extra_info"]]
    assert questions == [e["question"] for e in test["extra_info"] for _ in range(3)]
    assert list(val.columns) == list(test.columns)


def test_progress_in_a_file_is_one_line_per_phase_and_step(tmp_path, capfd):
    """Not a terminal (pytest captures stderr): no bar and no carriage return, each state once, the last one shown."""
    run = TrainerRun(
        [sys.executable, "-c", FAKE_TRAINER, str(tmp_path / "metrics.jsonl")], dict(os.environ), tmp_path, 2, [0, 2], 60
    )
    assert run.run(cwd=tmp_path) == 0
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and lines
    states = [line.split("] ", 1)[1].rsplit(", ", 1)[0] for line in lines]
    assert len(states) == len(set(states))  # printed only when the phase or the step changes
    assert states[-1] == "saving the policy, stopping Ray: 2/2 steps"
    assert all(re.fullmatch(r"\[ *\d+ s\] .+: [0-2]/2 steps, .+", line) for line in lines)
