"""Run a few GRPO steps of verl's real trainer on CPU and report what happened (used by the slow e2e test and CI).

It builds a tiny random Qwen2 model and byte tokenizer (``recipe.carl.cpu.tiny_model``), a 16-row chat parquet
and a toy dense reward, then launches the trainer under ``CARL_DEVICE=cpu`` with
``recipe/carl/config/device/cpu.yaml`` in its own session with a hard timeout, and samples the memory of every
process it started. Metrics come from verl's ``file`` logger (one JSON line per step); weight checksums come from
the ``carl_hf update_weights`` lines the rollout server prints.

CLI (prints one JSON summary line, exit code 0 only if the run exited 0)::

    python tests/recipe/cpu/grpo_smoke.py --steps 2 [--no-sync] [--launcher "python -m recipe.carl.main_carl"]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
CONFIG_DIR = REPO / "recipe" / "carl" / "config"
REWARD_FILE = Path(__file__).resolve().parent / "toy_reward.py"
#: The trainer entry point: the recipe's own main (verl's run_ppo after CARL's config checks).
DEFAULT_LAUNCHER = f"{shlex.quote(sys.executable)} -m recipe.carl.main_carl"
TOOL_YAML = REPO / "recipe" / "carl" / "search" / "search_tool.yaml"
_CHECKSUM_RE = re.compile(r"carl_hf update_weights #(\d+): .*checksum=([-+0-9.eE]+)")


@dataclass
class SmokeResult:
    """Outcome of one smoke run."""

    returncode: int
    wall_s: float
    peak_rss_gb: float
    peak_pss_gb: float
    peak_system_delta_gb: float
    timed_out: bool
    log_path: str
    metrics: list[dict] = field(default_factory=list)
    checksums: list[float] = field(default_factory=list)

    def series(self, key: str) -> list[float]:
        """Return ``key``'s value at every logged step that has it."""
        return [m[key] for m in self.metrics if key in m]


def make_dataset(path: Path, rows: int = 16) -> Path:
    """Write a chat-prompt parquet in verl's RLHFDataset schema."""
    import pandas as pd

    words = ["apple", "river", "stone", "cloud", "light", "green", "table", "music"]
    records = []
    for i in range(rows):
        question = f"Say something about {words[i % len(words)]} {i}."
        records.append(
            {
                "data_source": "carl_cpu_toy",
                "prompt": [{"role": "user", "content": question}],
                "ability": "toy",
                "reward_model": {"style": "rule", "ground_truth": words[i % len(words)]},
                "extra_info": {"index": i, "split": "train"},
            }
        )
    pd.DataFrame(records).to_parquet(path)
    return path


def toy_search(queries: list[str], topk: int) -> list[list[dict[str, Any]]]:
    """A fixed answer for every query: the live retriever of the CARL smoke run (no index, no data)."""
    return [[{"document": {"id": "0", "contents": "Toy\nA passage about apples."}, "score": 1.0}] for _ in queries]


@contextlib.contextmanager
def serve_retriever(retriever: Any = None) -> Iterator[tuple[str, list[int]]]:
    """Serves `retriever` (default: `toy_search`) over the Search-R1 protocol in a thread of this process.

    Yields:
        The `/retrieve` URL and a list that grows by the number of queries of every search request served.
    """
    from recipe.carl.search.server import serve_in_thread

    queries: list[int] = []
    search = retriever.search_documents if retriever is not None else toy_search

    def counted(batch: list[str], topk: int) -> list[list[dict[str, Any]]]:
        queries.append(len(batch))
        return search(batch, topk)

    with serve_in_thread(search_fn=counted) as base:
        yield f"{base.rstrip('/')}/retrieve", queries


def algo_overrides(algo: str) -> list[str]:
    """What differs between the GRPO and the CARL smoke runs."""
    if algo == "grpo":
        # verl's GRPO, 4 prompts x n=2 single-turn samples per step (the recipe's trainer passes GRPO through).
        return [
            "algorithm.adv_estimator=grpo",
            "data.train_batch_size=4",
            "actor_rollout_ref.rollout.n=2",
            "actor_rollout_ref.rollout.agent.default_agent_loop=single_turn_agent",
            "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        ]
    if algo == "carl":
        # CARL's tree agent loop and estimator: 2 prompts, trees of N0 + N = 4 leaves, at most 2 actions per
        # trajectory; the search tool reads RETRIEVER_URL (run_smoke serves a toy retriever unless given a URL).
        return [
            "algorithm.adv_estimator=carl",
            "algorithm.carl.n0=2",
            "algorithm.carl.n_forks=2",
            "algorithm.carl.max_actions=2",
            "algorithm.carl.dump_every=1",
            "data.train_batch_size=2",
            "actor_rollout_ref.rollout.n=1",
            f"actor_rollout_ref.rollout.multi_turn.tool_config_path={TOOL_YAML}",
            "actor_rollout_ref.actor.ppo_mini_batch_size=2",
            "actor_rollout_ref.actor.use_dynamic_bsz=True",
            "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096",
            "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
            "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=4096",
        ]
    raise ValueError(f"algo={algo!r}: use grpo or carl")


def build_overrides(model_dir: Path, data: Path, workdir: Path, steps: int, algo: str = "grpo") -> list[str]:
    """Hydra overrides on top of ``carl_trainer.yaml`` + ``device/cpu.yaml`` (model, data, sizes, logging)."""
    return algo_overrides(algo) + [
        f"data.train_files={data}",
        f"data.val_files={data}",
        "data.max_prompt_length=64",
        "data.max_response_length=32",
        "data.filter_overlong_prompts=True",
        f"actor_rollout_ref.model.path={model_dir}",
        # A large learning rate so one step visibly moves the weights (and the negative control diverges).
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        f"reward.custom_reward_function.path={REWARD_FILE}",
        "reward.custom_reward_function.name=compute_score",
        "trainer.logger=[console,file]",
        "trainer.project_name=carl_cpu",
        "trainer.experiment_name=smoke",
        f"trainer.total_training_steps={steps}",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.resume_mode=disable",
        f"trainer.default_local_dir={workdir / 'ckpt'}",
        # A private Ray temp dir: lets the cleanup find exactly this run's leftover processes.
        f"+ray_kwargs.ray_init._temp_dir={workdir / 'ray'}",
    ]


def _logged_steps(path: Path, step: int) -> bool:
    """True once the metrics file has a complete line of `step` or a later one."""
    if not path.exists():
        return False
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] >= step:
                return True
        except (ValueError, KeyError, TypeError):  # a line being written
            continue
    return False


def _session_pids(sid: int, marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) == sid:
                pids.append(pid)
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(pid)
        except (ProcessLookupError, PermissionError, FileNotFoundError, OSError):
            continue
    return pids


def _mem_of(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        pass
    return rss, pss


def _system_used() -> int:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def _kill(pids: list[int]) -> None:
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_smoke(
    steps: int = 2,
    sync_weights: bool = True,
    launcher: str = DEFAULT_LAUNCHER,
    timeout_s: int = 600,
    workdir: Path | None = None,
    extra_overrides: list[str] | None = None,
    algo: str = "grpo",
    cwd: Path | None = None,
    extra_env: dict[str, str] | None = None,
    retriever_url: str | None = None,
    kill_after_step: int | None = None,
) -> SmokeResult:
    """Run the trainer once and collect exit code, wall time, peak memory, metrics and weight checksums.

    Args:
        steps: ``trainer.total_training_steps``.
        sync_weights: False sets ``CARL_ROLLOUT_SKIP_WEIGHT_SYNC=1`` (negative control).
        launcher: Command prefix that starts the trainer (Hydra CLI).
        timeout_s: Hard wall-clock limit; the whole process session is killed after it.
        workdir: Where model, data, logs and the Ray temp dir go (a fresh temp dir by default).
        extra_overrides: More Hydra overrides, appended last.
        algo: ``grpo`` or ``carl`` (``algo_overrides``).
        cwd: The trainer's working directory (default: ``workdir``).
        extra_env: More environment variables of the trainer, set last.
        retriever_url: The trainer's ``RETRIEVER_URL``. None: a CARL run gets a live toy retriever served from this
            process for the duration (main_carl refuses to start against a retriever that does not answer).
        kill_after_step: SIGKILL the trainer's whole session as soon as the metrics file has this step (a crash).
    """
    if algo == "carl" and retriever_url is None and "RETRIEVER_URL" not in (extra_env or {}):
        with serve_retriever() as (url, _):
            return run_smoke(
                steps,
                sync_weights,
                launcher,
                timeout_s,
                workdir,
                extra_overrides,
                algo,
                cwd,
                extra_env,
                url,
                kill_after_step,
            )
    from recipe.carl.cpu.tiny_model import save_tiny_model

    workdir = Path(workdir or tempfile.mkdtemp(prefix="carl_smoke_"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(save_tiny_model(workdir / "model"))
    data = make_dataset(workdir / "train.parquet")
    metrics_path = workdir / "metrics.jsonl"
    log_path = workdir / "train.log"
    cmd = shlex.split(launcher) + ["--config-path", str(CONFIG_DIR), "--config-name", "carl_trainer", "+device=cpu"]
    cmd += build_overrides(model_dir, data, workdir, steps, algo) + list(extra_overrides or [])

    env = dict(os.environ)
    env.update(
        CARL_DEVICE="cpu",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        VERL_FILE_LOGGER_PATH=str(metrics_path),
        RAY_AUTH_MODE="disabled",
        RAY_DEDUP_LOGS="0",
        HYDRA_FULL_ERROR="1",
        TOKENIZERS_PARALLELISM="false",
    )
    # Until the recipe's verl.plugins entry point is installed, load the CPU plugin explicitly.
    mods = [m for m in env.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    if "recipe.carl.cpu.verl_plugin" not in mods:
        mods.append("recipe.carl.cpu.verl_plugin")
    env["VERL_USE_EXTERNAL_MODULES"] = ",".join(mods)
    if sync_weights:
        env.pop("CARL_ROLLOUT_SKIP_WEIGHT_SYNC", None)
    else:
        env["CARL_ROLLOUT_SKIP_WEIGHT_SYNC"] = "1"
    if retriever_url is not None:
        env["RETRIEVER_URL"] = retriever_url
    env.update(extra_env or {})

    marker = str(workdir / "ray")
    baseline = _system_used()
    peaks = {"rss": 0, "pss": 0, "sys": 0}
    done = threading.Event()
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd or workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        sid = proc.pid

        def sample() -> None:
            while not done.is_set():
                mems = [_mem_of(p) for p in _session_pids(sid, marker)]
                peaks["rss"] = max(peaks["rss"], sum(m[0] for m in mems))
                peaks["pss"] = max(peaks["pss"], sum(m[1] for m in mems))
                peaks["sys"] = max(peaks["sys"], _system_used() - baseline)
                if kill_after_step is not None and _logged_steps(metrics_path, kill_after_step):
                    os.killpg(sid, signal.SIGKILL)  # a crash right after that step's metrics line
                    return
                done.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(sid, signal.SIGKILL)
            rc = proc.wait()
        finally:
            wall = time.time() - t0
            done.set()
            sampler.join()
            # Ray daemons and workers outlive the driver at times; kill exactly this run's processes.
            time.sleep(1.0)
            _kill(_session_pids(sid, marker))

    metrics = []
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # blank, or cut short by a kill
                continue
            metrics.append({"step": row["step"], **row["data"]})
    checksums = [float(m.group(2)) for m in _CHECKSUM_RE.finditer(log_path.read_text(errors="replace"))]
    return SmokeResult(
        returncode=rc,
        wall_s=wall,
        peak_rss_gb=peaks["rss"] / 2**30,
        peak_pss_gb=peaks["pss"] / 2**30,
        peak_system_delta_gb=peaks["sys"] / 2**30,
        timed_out=timed_out,
        log_path=str(log_path),
        metrics=metrics,
        checksums=checksums,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-sync", action="store_true", help="negative control: skip rollout weight sync")
    parser.add_argument("--launcher", default=os.environ.get("CARL_SMOKE_LAUNCHER", DEFAULT_LAUNCHER))
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--algo", choices=["grpo", "carl"], default="grpo")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    res = run_smoke(args.steps, not args.no_sync, args.launcher, args.timeout, args.workdir, args.overrides, args.algo)
    summary = asdict(res)
    keep = ("training/rollout_probs_diff_max", "critic/score/mean", "actor/grad_norm", "timing_s/step")
    summary["metrics"] = [{k: m.get(k) for k in ("step", *keep)} for m in res.metrics]
    print(json.dumps(summary))
    return 0 if res.returncode == 0 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
