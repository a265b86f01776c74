"""verl's trainer as a child of the demo: its environment, a quiet log, a progress bar that names the phase, a stop
that ends its Ray session, and the time each phase took.

Log. The trainer's output is kept whole in `train.full.log`; `train.log` leaves out the lines in `NOISE`, which repeat
for every rollout session and say nothing to a user (in a default run they were 9,000 of train.log's 10,539 lines).
transfer_queue's "target_num_threads 8 should not exceed total physical CPU cores" warning is silenced at its source
instead: `TQ_NUM_THREADS` is set to the machine's physical cores, the value transfer_queue falls back to anyway.

Stop. The trainer's main process is the Ray driver: its `ray.init()` started the session (GCS, raylet, workers) and
installed a SIGTERM handler that exits through `ray.shutdown()`, which stops them. So the demo stops a trainer (after
its time budget, on Ctrl-C or on SIGTERM) by sending SIGTERM to that one process and waiting; only if it is still
running after `STOP_GRACE_S` is its process group killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from recipe.carl.cpu.vllm_cpu import vllm_python
from recipe.carl.io import atomic_path, public_mode, write_text
from recipe.carl.search.server import serve_in_thread
from recipe.carl.tiny.config import DemoConfig
from recipe.carl.tiny.report import read_metrics

NOISE = (
    # verl's agent loop, once per rollout session: the tiny policy is a Llama, for which verl has no model-specific
    # token builder, and the default one is right for its template.
    "No model-specific Continuous Token builder is registered",
    # Kept as a fallback when TQ_NUM_THREADS cannot be set (e.g. a user's own environment overrides it).
    "should not exceed total physical CPU cores",
)
"""Substrings of log lines that `train.log` leaves out (`train.full.log` keeps them)."""

PHASES = (
    ("Started a local Ray instance", "starting the trainer"),
    ("Using dataset class", "loading the data"),
    ("Before FSDP", "loading the policy"),
    ("Total steps:", "starting the rollout workers"),
    ("Continuous Token builder", "validating the start"),
    ("Initial validation metrics", "first RL step"),
)
"""(marker in the trainer's output, phase from then on) until the first step; later phases come from the metrics."""

STOP_GRACE_S = 60.0
"""How long a stopping trainer may take to shut its Ray session down before its process group is killed."""


def trainer_env(run_dir: Path, retriever_url: str, repo: Path) -> dict[str, str]:
    """The trainer's environment: the demo's own, plus what the recipe and verl read."""
    import psutil

    env = dict(os.environ)
    env.update(
        CARL_DEVICE="cpu",
        RETRIEVER_URL=retriever_url,
        VERL_FILE_LOGGER_PATH=str(run_dir / "metrics.jsonl"),
        RAY_AUTH_MODE="disabled",
        RAY_DEDUP_LOGS="0",
        HYDRA_FULL_ERROR="1",
        TOKENIZERS_PARALLELISM="false",
        # glibc's per-thread malloc arenas (8 per core) let each of the ~10 Ray processes hold freed memory.
        MALLOC_ARENA_MAX="2",
        # transfer_queue asks torch for 8 threads per put/get and warns (once per call) that it gets the cores.
        TQ_NUM_THREADS=str(min(8, psutil.cpu_count(logical=False) or 1)),
        PYTHONPATH=os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p),
    )
    return env


def trainer_python(cfg: DemoConfig) -> str:
    """The interpreter of the trainer (and its Ray workers): the vLLM venv for `rollout=vllm`, else this one; the rest
    of the demo stays in this process. Raises RuntimeError naming the install command when vLLM is missing."""
    if cfg.rollout == "vllm":
        return vllm_python()
    return sys.executable


def is_noise(line: str) -> bool:
    """Whether `train.log` leaves this line of the trainer's output out (`train.full.log` keeps it)."""
    return any(noise in line for noise in NOISE)


class TrainerRun:
    """One trainer process: start, follow (log, phases, progress bar), stop.

    Args:
        cmd: the trainer's command line.
        env: its environment.
        run_dir: the run folder (`train.log`, `train.full.log`, `metrics.jsonl`).
        steps: the run's RL steps.
        validations: the steps after which the trainer validates (0 = before training).
        timeout_s: the trainer's time budget.
        sessions_per_step: rollout sessions of one training step (trees, or GRPO trajectories): more sessions since
            the last step's metrics mean the trainer is validating (verl logs one line per session, see `NOISE`).
    """

    def __init__(self, cmd, env, run_dir: Path, steps: int, validations: list[int], timeout_s: float,
                 sessions_per_step: int = 1):  # fmt: skip
        self.cmd, self.env, self.run_dir = cmd, env, run_dir
        self.steps, self.validations, self.timeout_s = steps, validations, timeout_s
        self.sessions_per_step, self.sessions, self.sessions_at_step = sessions_per_step, 0, 0
        self.phase = "starting Ray"
        self.marks: dict[str, float] = {}  # phase -> when it began (time.time())
        self.tail: list[str] = []  # the last lines of train.log, for error messages
        self.proc: subprocess.Popen | None = None

    def run(self, cwd: Path) -> int:
        """Runs the trainer to its end (or `timeout_s`); returns its exit status.

        Progress goes to stderr: on a terminal as a bar; elsewhere (a file, CI, a pipe) as one line per phase and per
        step (`progress_line`), since a bar written to a file is one line of thousands of carriage returns.
        """
        from tqdm.auto import tqdm

        interactive = sys.stderr.isatty()
        last_line = ""
        self.start = time.time()
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        reader = threading.Thread(target=self._follow_output, name="trainer-log", daemon=True)
        reader.start()
        bar = tqdm(total=self.steps, unit="step", bar_format="{desc}: {n}/{total} steps |{bar}| {elapsed}{postfix}",
                   disable=not interactive)  # fmt: skip
        shown = 0  # steps shown so far (a disabled tqdm bar counts nothing)
        try:
            while True:
                running = self.proc.poll() is None
                rows = read_metrics(self.run_dir / "metrics.jsonl")
                done = max((r["step"] for r in rows), default=0) if rows else 0
                if done > shown:
                    self.sessions_at_step = self.sessions
                bar.update(max(0, min(done, self.steps) - shown))
                shown = max(shown, min(done, self.steps))
                phase, left = self._phase(rows, done), self._time_left(rows, done)
                bar.set_description_str(phase, refresh=False)
                bar.set_postfix_str(left, refresh=True)
                line = progress_line(phase, shown, self.steps)
                if not interactive and line != last_line:
                    print(f"[{time.time() - self.start:6.0f} s] {line}, {left}", file=sys.stderr, flush=True)
                    last_line = line
                if not running:
                    break
                if time.time() - self.start > self.timeout_s:
                    self.stop()
                    log = self.run_dir / "train.log"
                    raise SystemExit(f"error: the trainer ran past {self.timeout_s:.0f} s and was stopped; see {log}")
                time.sleep(1.0)
        except BaseException:
            self.stop()
            raise
        finally:
            bar.close()
            reader.join(timeout=10)
        self.end = time.time()
        return self.proc.returncode

    def _follow_output(self) -> None:
        """Copies the trainer's output to `train.full.log` (all) and `train.log` (without `NOISE`), noting phases."""
        assert self.proc is not None and self.proc.stdout is not None
        pending = list(PHASES)
        with open(self.run_dir / "train.full.log", "wb") as full, open(self.run_dir / "train.log", "wb") as quiet:
            for raw in self.proc.stdout:
                full.write(raw)
                line = raw.decode(errors="replace")
                self.sessions += NOISE[0] in line
                for k, (marker, phase) in enumerate(pending):  # in order; a marker that never comes is skipped
                    if marker in line:
                        self.phase = phase
                        self.marks.setdefault(phase, time.time())
                        del pending[: k + 1]
                        break
                if is_noise(line):
                    continue
                quiet.write(raw)
                quiet.flush()
                self.tail = (self.tail + [line.rstrip()])[-40:]

    def _phase(self, rows: list[dict], done: int) -> str:
        if done == 0:
            return self.phase
        if done >= self.steps:
            return "saving the policy, stopping Ray"
        if done + 1 in self.validations and self.sessions - self.sessions_at_step > self.sessions_per_step:
            return f"validating after step {done + 1}"
        return f"RL step {done + 1}"

    def _time_left(self, rows: list[dict], done: int) -> str:
        """Remaining steps at their median time, plus the validations still to come at the last one's time."""
        step_s = [r["timing_s/step"] for r in rows if "timing_s/step" in r]
        if not step_s:
            return "time left: known after the first step"
        val_s = [r["timing_s/testing"] for r in rows if "timing_s/testing" in r] or [self.first_validation_s() or 0]
        left = (self.steps - done) * statistics.median(step_s) + val_s[-1] * sum(v > done for v in self.validations)
        return f"about {left / 60:.0f} min left" if left >= 90 else f"about {left:.0f} s left"

    def first_validation_s(self) -> float | None:
        """How long the validation before training took (from its marker to the step-0 metrics), if known."""
        begin, end = self.marks.get("validating the start"), self.marks.get("first RL step")
        return end - begin if begin and end else None

    def phases(self) -> dict[str, float]:
        """Seconds per phase of the trainer: start-up (to the first validation), validations, RL steps, and the
        shut-down after the last step (saving the policy, stopping Ray)."""
        rows = read_metrics(self.run_dir / "metrics.jsonl")
        steps = sum(r.get("timing_s/step", 0.0) for r in rows)
        later_vals = sum(r.get("timing_s/testing", 0.0) for r in rows)
        first_val = self.first_validation_s()
        to_first_step = self.marks.get("first RL step", self.start) - self.start
        total = self.end - self.start
        out = {"trainer start-up": to_first_step - (first_val or 0.0)}
        out["validations"] = (first_val or 0.0) + later_vals
        out["RL steps"] = steps
        out["trainer shut-down"] = total - to_first_step - steps - later_vals
        return {k: round(v, 1) for k, v in out.items()}

    def stop(self) -> None:
        """Stops the trainer and its Ray session (see the module docstring); safe to call twice."""
        if self.proc is None or self.proc.poll() is not None:
            return
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shut-down short
        try:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        finally:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def retriever_server(retriever, port: int, pages=None):
    """The run's retriever served in a thread of this process (`recipe.carl.search.server`; `pages`: its page store
    for `/access`); yields its URL."""
    try:
        server = serve_in_thread(retriever, port=port, pages=pages)
        url = server.__enter__()
    except OSError as error:
        raise SystemExit(f"error: --port {port}: cannot start the retriever there ({error}); use --port 0") from error
    try:
        yield url
    finally:
        server.__exit__(None, None, None)


def write_val_file(data_dir: Path, copies: int) -> Path:
    """`data/val.parquet`: each held-out question of `test.parquet` `copies` times in a row, validated with
    `val_kwargs.n=1`: the same `copies` episodes per question as `n=copies`, sampled alike, and the same mean.

    Why: for n > 1 verl's `process_validation_metrics` adds bootstrap best@k/worst@k statistics (1000 resamples per
    question and per metric), which took 17 s of each validation's ~35 s here for 100 questions x 4 episodes x the
    reward's 16 metrics (0.04 s with n=1). verl gives every row its own uid, so each copy is its own group.
    """
    import pandas as pd

    frame = pd.read_parquet(data_dir / "test.parquet")
    with atomic_path(data_dir / "val.parquet") as tmp:
        frame.loc[frame.index.repeat(copies)].reset_index(drop=True).to_parquet(tmp)
    return data_dir / "val.parquet"


def progress_line(phase: str, done: int, steps: int) -> str:
    """The trainer's progress as one log line (without the time), printed whenever it changes."""
    return f"{phase}: {done}/{steps} steps"


def write_tool_yaml(run_dir: Path, topk: int, snippet_words: int | None = None) -> Path:
    """The recipe's search tool config with this run's documents per search (the retriever URL stays `${oc.env}`);
    with `snippet_words`, the paper's tools (`pages_tool.yaml`: search showing ids and snippets, and access)."""
    from omegaconf import OmegaConf

    name = "search_tool.yaml" if snippet_words is None else "pages_tool.yaml"
    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "search" / name)
    config.tools[0].config.topk = topk
    if snippet_words is not None:
        config.tools[0].config.snippet_words = snippet_words
    return write_text(run_dir / name, OmegaConf.to_yaml(config))


def keep_trained_policy(run_dir: Path, steps: int) -> Path:
    """The trainer's last Hugging Face checkpoint, moved to `run_dir/policy_rl` with public file modes (verl
    writes its weights 0600)."""
    saved = run_dir / "ckpt" / f"global_step_{steps}" / "actor" / "huggingface"
    if not (saved / "config.json").exists():
        raise SystemExit(f"error: the trainer saved no policy at {saved}; see {run_dir / 'train.log'}")
    out = Path(shutil.move(saved, run_dir / "policy_rl"))
    for path in [out, *out.rglob("*")]:
        os.chmod(path, public_mode(0o777 if path.is_dir() else 0o666))
    return out
