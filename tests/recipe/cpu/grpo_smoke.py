"""Run a few GRPO steps of verl's real trainer on CPU and report what happened (used by the slow e2e test and CI).

It builds a tiny random Qwen2 model and byte tokenizer (``recipe.carl.cpu.tiny_model``), a 16-row chat parquet
and a toy dense reward, then launches the trainer under ``CARL_DEVICE=cpu`` with
``recipe/carl/config/device/cpu.yaml`` in its own session with a hard timeout, and samples the memory of every
process it started. Metrics come from verl's ``file`` logger (one JSON line per step); weight checksums come from
the ``carl_hf update_weights`` lines the rollout server prints.

Options (all default to the above): ``device="cpu_vllm"`` runs verl's own vLLM rollout (``+device=cpu_vllm``; the
launcher's Python must have vLLM's CPU build, see ``recipe/carl/cpu/vllm_cpu.py``) and logs every ``generate``
call of the vLLM server (``SmokeResult.requests``); ``data="synthhop"`` runs on SynthHop data with a live BM25
retriever and the project's SynthHop reward, with ``model_dir`` (e.g. :data:`SHIPPED_SFT`) as the policy.

CLI (prints one JSON summary line, exit code 0 only if the run exited 0)::

    python tests/recipe/cpu/grpo_smoke.py --steps 2 [--no-sync] [--launcher "python -m recipe.carl.main_carl"]
        [--device cpu_vllm] [--algo carl --data synthhop --model recipe/carl/tiny/checkpoints/sft_seed0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
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
#: The shipped SFT start of the tiny SynthHop policy (its tokenizer, data seed and sizes are in its manifest).
SHIPPED_SFT = REPO / "recipe" / "carl" / "tiny" / "checkpoints" / "sft_seed0"
#: The request log of the vLLM server (recipe.carl.cpu.vllm_cpu.REQUEST_LOG_ENV).
REQUEST_LOG_ENV = "CARL_VLLM_REQUEST_LOG"
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
    requests: list[dict] = field(default_factory=list)
    """One record per ``generate`` call of the vLLM server (``device="cpu_vllm"`` only; see ``vllm_cpu``)."""

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
        # One question per update: 2 updates a step, each with half the step's rows (recipe.carl.schedule).
        return [
            "algorithm.adv_estimator=carl",
            "algorithm.carl.n0=2",
            "algorithm.carl.n_forks=2",
            "algorithm.carl.max_actions=2",
            "algorithm.carl.dump_every=1",
            "data.train_batch_size=2",
            "actor_rollout_ref.rollout.n=1",
            f"actor_rollout_ref.rollout.multi_turn.tool_config_path={TOOL_YAML}",
            "actor_rollout_ref.actor.ppo_mini_batch_size=1",
            "actor_rollout_ref.actor.use_dynamic_bsz=True",
            "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096",
            "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
            "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=4096",
        ]
    raise ValueError(f"algo={algo!r}: use grpo or carl")


def make_synthhop(workdir: Path, rows: int = 32) -> tuple[Path, Path, Path]:
    """SynthHop exactly as the shipped SFT start was trained on (seed, entities and sizes of its manifest).

    Returns:
        ``(data_dir, train_parquet, val_parquet)``: the full data set (``corpus.jsonl`` for the retriever), the first
        ``rows`` training rows (agent ``carl_agent``), and the held-out rows (agent ``carl_chain_agent``).
    """
    import pandas as pd

    from recipe.carl.synthhop.make_data import SynthHopConfig, build, write

    key = json.loads((SHIPPED_SFT / "sft_manifest.json").read_text())["key"]
    config = SynthHopConfig(seed=key["seed"], n_entities=key["n_entities"], n_train=key["n_train"], n_test=100)
    data_dir = workdir / "synthhop"
    write(build(config), data_dir, overwrite=True, command="tests/recipe/cpu/grpo_smoke.py")
    train = workdir / "synthhop_train.parquet"
    pd.read_parquet(data_dir / "train.parquet").head(rows).to_parquet(train)
    return data_dir, train, data_dir / "test.parquet"


def synthhop_overrides(workdir: Path, topk: int = 2) -> list[str]:
    """What a SynthHop run adds: the tiny policy's lengths and rollout temperature, and a search tool with ``topk``
    documents per search (the shipped SFT start was trained on 2)."""
    text = TOOL_YAML.read_text()
    if "topk: 3" not in text:
        raise RuntimeError(f"{TOOL_YAML} no longer sets `topk: 3`; update synthhop_overrides")
    tool_yaml = workdir / "search_tool.yaml"
    tool_yaml.write_text(text.replace("topk: 3", f"topk: {topk}"))
    return [
        "data.max_prompt_length=64",
        "data.max_response_length=384",
        "actor_rollout_ref.rollout.temperature=0.7",
        "actor_rollout_ref.rollout.top_k=-1",
        f"actor_rollout_ref.rollout.multi_turn.tool_config_path={tool_yaml}",
    ]


def build_overrides(
    model_dir: Path,
    data: Path,
    workdir: Path,
    steps: int,
    algo: str = "grpo",
    val_data: Path | None = None,
    reward: bool = True,
    ray_dir: Path | None = None,
) -> list[str]:
    """Hydra overrides on top of ``carl_trainer.yaml`` + ``device/cpu.yaml`` (model, data, sizes, logging).

    ``val_data`` defaults to ``data``; ``reward=False`` keeps the project's reward instead of the toy one;
    ``ray_dir`` (default ``workdir/ray``) is Ray's temp dir, whose socket paths must stay under 108 bytes.
    """
    toy_reward = [
        f"reward.custom_reward_function.path={REWARD_FILE}",
        "reward.custom_reward_function.name=compute_score",
    ]
    return algo_overrides(algo) + [
        f"data.train_files={data}",
        f"data.val_files={val_data or data}",
        "data.max_prompt_length=64",
        "data.max_response_length=32",
        "data.filter_overlong_prompts=True",
        f"actor_rollout_ref.model.path={model_dir}",
        # A large learning rate so one step visibly moves the weights (and the negative control diverges).
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        *(toy_reward if reward else []),
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
        f"+ray_kwargs.ray_init._temp_dir={ray_dir or workdir / 'ray'}",
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
    device: str = "cpu",
    data: str = "toy",
    model_dir: Path | None = None,
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
        retriever_url: The trainer's ``RETRIEVER_URL``. None: a CARL run gets a live retriever served from this
            process for the duration (main_carl refuses to start against a retriever that does not answer): the toy
            one, or with ``data="synthhop"`` BM25 over the SynthHop corpus.
        kill_after_step: SIGKILL the trainer's whole session as soon as the metrics file has this step (a crash).
        device: The device config option, ``cpu`` (carl_hf rollout) or ``cpu_vllm`` (verl's vLLM rollout).
        data: ``toy`` (16 chat rows, toy reward) or ``synthhop`` (:func:`make_synthhop`, the project's SynthHop
            reward).
        model_dir: The policy folder; default a fresh tiny random Qwen2 (``recipe.carl.cpu.tiny_model``).
    """
    from contextlib import ExitStack

    if data not in ("toy", "synthhop"):
        raise ValueError(f"data={data!r}: use toy or synthhop")
    if algo == "carl" and data == "toy" and retriever_url is None and "RETRIEVER_URL" not in (extra_env or {}):
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
                device=device,
                data=data,
                model_dir=model_dir,
            )
    from recipe.carl.cpu.tiny_model import save_tiny_model

    workdir = Path(workdir or tempfile.mkdtemp(prefix="carl_smoke_"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(model_dir).resolve() if model_dir is not None else Path(save_tiny_model(workdir / "model"))
    metrics_path = workdir / "metrics.jsonl"
    log_path = workdir / "train.log"
    request_log = workdir / "vllm_requests.jsonl"
    # A short private Ray temp dir: Ray's socket paths (<dir>/session_<date>_<pid>/sockets/plasma_store) must stay
    # under 108 bytes, which a pytest tmp path such as /tmp/pytest-of-root/pytest-57/vllm_synced0/ray exceeds.
    ray_dir = Path(tempfile.mkdtemp(prefix="carl-ray-"))
    cmd = shlex.split(launcher) + [
        "--config-path",
        str(CONFIG_DIR),
        "--config-name",
        "carl_trainer",
        f"+device={device}",
    ]
    stack = ExitStack()
    env = dict(os.environ)
    if data == "toy":
        train = make_dataset(workdir / "train.parquet")
        cmd += build_overrides(model_dir, train, workdir, steps, algo, ray_dir=ray_dir)
    else:
        from recipe.carl.search.retriever import Retriever, RetrieverConfig

        data_dir, train, val = make_synthhop(workdir)
        if retriever_url is None and "RETRIEVER_URL" not in (extra_env or {}):
            retriever = Retriever.from_config(RetrieverConfig(corpus_path=str(data_dir / "corpus.jsonl")))
            retriever_url, _ = stack.enter_context(serve_retriever(retriever))
        cmd += build_overrides(model_dir, train, workdir, steps, algo, val_data=val, reward=False, ray_dir=ray_dir)
        cmd += synthhop_overrides(workdir)
    cmd += list(extra_overrides or [])

    env.update(
        CARL_DEVICE="cpu",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        VERL_FILE_LOGGER_PATH=str(metrics_path),
        RAY_AUTH_MODE="disabled",
        RAY_DEDUP_LOGS="0",
        HYDRA_FULL_ERROR="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if device == "cpu_vllm":
        request_log.unlink(missing_ok=True)
        env[REQUEST_LOG_ENV] = str(request_log)
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

    marker = str(ray_dir)
    baseline = _system_used()
    peaks = {"rss": 0, "pss": 0, "sys": 0}
    done = threading.Event()
    t0 = time.time()
    with stack, open(log_path, "wb") as log:
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
            shutil.rmtree(ray_dir, ignore_errors=True)

    metrics = []
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # blank, or cut short by a kill
                continue
            metrics.append({"step": row["step"], **row["data"]})
    checksums = [float(m.group(2)) for m in _CHECKSUM_RE.finditer(log_path.read_text(errors="replace"))]
    requests = [json.loads(line) for line in request_log.read_text().splitlines()] if request_log.exists() else []
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
        requests=requests,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-sync", action="store_true", help="negative control: skip rollout weight sync")
    parser.add_argument("--launcher", default=os.environ.get("CARL_SMOKE_LAUNCHER", DEFAULT_LAUNCHER))
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--algo", choices=["grpo", "carl"], default="grpo")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--device", choices=["cpu", "cpu_vllm"], default="cpu", help="carl_hf or verl's vLLM rollout")
    parser.add_argument("--data", choices=["toy", "synthhop"], default="toy")
    parser.add_argument("--model", type=Path, default=None, help="policy folder (default: a tiny random Qwen2)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    res = run_smoke(
        args.steps,
        not args.no_sync,
        args.launcher,
        args.timeout,
        args.workdir,
        args.overrides,
        args.algo,
        device=args.device,
        data=args.data,
        model_dir=args.model,
    )
    summary = asdict(res)
    keep = ("training/rollout_probs_diff_max", "critic/score/mean", "actor/grad_norm", "timing_s/step")
    summary["metrics"] = [{k: m.get(k) for k in ("step", *keep)} for m in res.metrics]
    summary["requests"] = len(res.requests)
    print(json.dumps(summary))
    return 0 if res.returncode == 0 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
