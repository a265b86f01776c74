"""Does CARL beat GRPO here? The prespecified experiment of docs/carl_vs_grpo.md, from one command.

    python -m benchmarks.carl_vs_grpo --out runs/carl_vs_grpo            # every arm x seed; run again to resume
    python -m benchmarks.carl_vs_grpo --out runs/carl_vs_grpo --report   # statistics, figure, table (what finished)
    python -m benchmarks.carl_vs_grpo --out /tmp/smoke --smoke           # CI: 2 arms, 2 steps, a handful of questions
    python -m benchmarks.carl_vs_grpo --out runs/repro --arms grpo --seeds 0          # one run again, in a new folder
    python -m benchmarks.carl_vs_grpo --out runs/repro --report --against runs/carl_vs_grpo   # ... and its drift

Every run is verl's trainer on the CPU (`python -m recipe.carl.main_carl +demo=tiny_cpu +device=cpu`, the embedded
default's settings, `recipe.carl.tiny.demo.trainer_overrides`), from the shipped SFT start, with the settings of
`PROTOCOL` and the arm's changes of `ARMS`; nothing else differs between arms. Two arms with the same seed see the
same questions in the same order (`data.seed`) and, with per-request sampling seeds (`full_determinism`), the same
random numbers wherever their requests coincide. The trainer validates nothing: it saves the policy every
`eval_every` steps, and each saved policy is scored here on the held-out set (`heldout_questions` questions of the
same knowledge base that no run or the SFT ever trained on), sampled (`eval_samples` episodes per question at the
rollout temperature) and greedy, through the agent loop's own environment (`recipe.carl.tiny.local_agent`). The
start is scored once and shared.

Layout of `--out` (a finished unit is never run again; an unfinished training run is started over):

    shared/data, shared/heldout, shared/policy_sft       the demo's data, the held-out set, the SFT start
    start_eval.json                                      the start on the held-out set (step 0 of every arm)
    runs/<arm>/seed<k>/command.txt                       the trainer's command line (cwd: the repository)
    runs/<arm>/seed<k>/{train.log,metrics.jsonl,ckpt/}   verl's log, per-step metrics, the saved policies
    runs/<arm>/seed<k>/done.json                         wall time, load average, commit: the run finished
    runs/<arm>/seed<k>/eval/step_<s>.json                per-question held-out exact match of the step-s policy

`--report` reads what has finished and writes `results.json` and `accuracy_vs_actions.png` into `--out`
(`benchmarks.carl_vs_grpo_report`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.carl_vs_grpo_report import build_report, export_scores, reproduction
from recipe.carl.io import write_json, write_text
from recipe.carl.synthhop.make_data import SynthHopConfig, build, write
from recipe.carl.tiny import launch
from recipe.carl.tiny.config import ROLLOUT_DEVICES, SHIPPED_SFT, DemoConfig
from recipe.carl.tiny.demo import trainer_overrides
from recipe.carl.tiny.local_agent import LocalAgent
from recipe.carl.tiny.trajectory import corpus_search
from recipe.carl.tiny.warm_start import warm_start

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Protocol:
    """The settings every arm shares (docs/carl_vs_grpo.md; fixed before the comparison runs)."""

    seeds: int = 4
    """RL seeds per arm (question order, rollout and planner randomness)."""
    demo: dict[str, Any] = field(
        default_factory=lambda: {
            "steps": 30,
            "batch_prompts": 16,
            "lr": 3e-4,
            "temperature": 0.7,
            "n0": 2,
            "n_forks": 6,
            "max_actions": 6,
            "full_determinism": True,
            "packing": "tree",
        }
    )
    """`DemoConfig` fields shared by every arm (the rest are the demo's defaults: model, data, lengths, batches)."""
    eval_every: int = 10
    """Score the policy after every this many steps (and the start once)."""
    eval_samples: int = 4
    """Sampled episodes per held-out question, at the rollout temperature."""
    heldout_tests: int = 500
    """Test questions drawn from the knowledge base; those in the training split are dropped (479 remain)."""
    eval_seed: int = 1234
    """Seed of the per-request sampling seeds of the evaluation (the same for every policy)."""

    def steps(self) -> list[int]:
        """The steps whose policy is scored (0 is the shared start)."""
        return [0, *range(self.eval_every, self.demo["steps"] + 1, self.eval_every)]


PROTOCOL = Protocol()
#: arm -> `DemoConfig` fields that differ from the protocol's shared ones.
ARMS: dict[str, dict[str, Any]] = {
    "grpo": {"algo": "grpo"},  # grpo_group = N0 + N: as many trajectories per question as CARL's tree has leaves
    "carl": {"algo": "carl"},  # the demo's N0 = 2, N = 6, density forks (Eq. 12), merging on
    "carl_lite": {"algo": "carl", "n0": 1},  # N0 = 1, the same N
    "carl_random": {"algo": "carl", "selection": "random"},  # the paper's ablation #2
    "carl_spread": {"algo": "carl", "selection": "spread"},  # forks that follow outcomes (Eq. 12')
    "carl_nomerge": {"algo": "carl", "merge": False},  # every sample its own node: merging's ablation
}
SMOKE = Protocol(
    seeds=1,
    demo={
        **PROTOCOL.demo,
        "steps": 2,
        "batch_prompts": 2,
        "n0": 2,
        "n_forks": 2,
        "max_actions": 3,
        "n_train": 200,
        "n_test": 8,
        "sft_steps": 30,
        "sft_time_budget_s": 60,
    },  # fmt: skip
    eval_every=1,
    eval_samples=2,
    heldout_tests=40,
)
SMOKE_ARMS = ("grpo", "carl_spread")


def demo_config(protocol: Protocol, arm: str, seed: int):
    """The run's `DemoConfig`: the protocol's shared fields, the arm's, the seed; no validation inside the trainer."""
    fields = {**protocol.demo, **ARMS[arm], "rl_seed": seed, "test_freq": protocol.eval_every}
    return DemoConfig(**fields)


def trainer_command(cfg, run_dir: Path, shared: Path, tool_yaml: Path) -> list[str]:
    """The trainer's command line: the demo's overrides, no validation, the policy saved every `test_freq` steps."""
    overrides = trainer_overrides(cfg, run_dir, shared / "data", shared / "policy_sft", tool_yaml)
    overrides = [o for o in overrides if not o.startswith(("trainer.save_freq=", "trainer.test_freq="))]
    overrides += ["trainer.val_before_train=False", "trainer.test_freq=-1", f"trainer.save_freq={cfg.test_freq}"]
    device = f"+device={ROLLOUT_DEVICES[cfg.rollout]}"
    return [sys.executable, "-m", "recipe.carl.main_carl", "+demo=tiny_cpu", device, *overrides]


@contextlib.contextmanager
def heavy_lock(path: str | None):
    """Holds an exclusive `flock` on `path` (None: no lock): one heavy job at a time on a shared machine."""
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return (out.stdout.strip() or None) if out.returncode == 0 else None


# ----------------------------------------------------------------------------------------------------- set-up
def prepare(out: Path, protocol: Protocol) -> Path:
    """The shared data, held-out set and SFT start under `out/shared` (made once, reused on resume)."""
    shared = out / "shared"
    cfg = DemoConfig(**protocol.demo)
    if not (shared / "ready.json").exists():
        data = build(SynthHopConfig(seed=cfg.seed, n_entities=cfg.n_entities, n_train=cfg.n_train, n_test=cfg.n_test))
        write(data, shared / "data", overwrite=True, command="benchmarks.carl_vs_grpo")
        launch.write_val_file(shared / "data", 1)  # verl loads a validation file even when it never validates
        # The held-out set: a larger test split of the same knowledge base (the same seed draws the same KB), minus
        # every question of the training split (the SFT demonstrations and the RL questions come from it).
        big = build(SynthHopConfig(seed=cfg.seed, n_entities=cfg.n_entities, n_train=cfg.n_train,
                                   n_test=protocol.heldout_tests))  # fmt: skip
        write(big, shared / "heldout", overwrite=True, command="benchmarks.carl_vs_grpo (held-out)")
        _, search = corpus_search(shared / "data" / "corpus.jsonl", cfg.topk)
        shipped = SHIPPED_SFT if cfg.policy == "tiny" else None
        model_dir, sft = warm_start(shared, shared / "data", search, cfg, shipped)
        if model_dir != shared / "policy_sft":
            raise SystemExit(f"error: the SFT start is at {model_dir}, expected {shared / 'policy_sft'}")
        write_json(shared / "ready.json", {"sft": sft, "commit": commit()})
    return shared


def heldout_rows(shared: Path) -> list[dict[str, Any]]:
    """The held-out questions: the large test split without any question of the training split."""
    import pandas as pd

    seen = {e["question"] for e in pd.read_parquet(shared / "data" / "train.parquet")["extra_info"]}
    rows = pd.read_parquet(shared / "heldout" / "test.parquet").to_dict("records")
    return [r for r in rows if r["extra_info"]["question"] not in seen]


# ----------------------------------------------------------------------------------------------- evaluation
def score_policy(policy: Path, shared: Path, rows: list[dict[str, Any]], protocol: Protocol, cfg) -> dict[str, Any]:
    """Per-question held-out exact match of one policy: the mean over `eval_samples` sampled episodes, and greedy."""
    start = time.time()
    agent = LocalAgent(policy, shared / "heldout", topk=cfg.topk, max_actions=cfg.max_actions,
                       response_length=cfg.max_response_length, seed=protocol.eval_seed)  # fmt: skip
    agent.request_seed = protocol.eval_seed  # per-request seeds: every policy meets the same random numbers
    k = protocol.eval_samples

    async def run_all(temperature: float, samples: int) -> list[float]:
        jobs = [agent.rollout(r, temperature, f"q{i}.{j}") for i, r in enumerate(rows) for j in range(samples)]
        return [float(info.get("em", 0.0)) for _, _, info in await asyncio.gather(*jobs)]

    sampled = asyncio.run(run_all(cfg.temperature, k))
    greedy = asyncio.run(run_all(0.0, 1))
    return {
        "policy": str(policy),
        "questions": [r["extra_info"]["question"] for r in rows],
        "sampled": [sum(sampled[i * k : (i + 1) * k]) / k for i in range(len(rows))],
        "greedy": greedy,
        "wall_s": round(time.time() - start, 1),
    }


# ------------------------------------------------------------------------------------------------- training
def train(arm: str, seed: int, out: Path, shared: Path, url: str, protocol: Protocol, cfg=None) -> Path:
    """One (arm, seed) run through verl's trainer, unless it finished before; returns its folder (`cfg`: the run's
    `DemoConfig`, default this protocol's for the arm and seed)."""
    run_dir = out / "runs" / arm / f"seed{seed}"
    if (run_dir / "done.json").exists():
        return run_dir
    if run_dir.exists():  # an unfinished run: verl cannot resume the tree dumps and metrics cleanly, so start over
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg = cfg or demo_config(protocol, arm, seed)
    cmd = trainer_command(cfg, run_dir, shared, launch.write_tool_yaml(run_dir, cfg.topk))
    write_text(run_dir / "command.txt", " ".join(cmd[1:]) + "\n")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="carl-") as ray_dir:  # short: Ray's socket paths stay < 108 bytes
        env = {**launch.trainer_env(run_dir, url, REPO), "RAY_TMPDIR": ray_dir}
        per_question = 1 if cfg.algo == "carl" or cfg.pool_floor else cfg.grpo_group or cfg.n0 + cfg.n_forks
        sessions = cfg.batch_prompts * per_question
        trainer = launch.TrainerRun(cmd, env, run_dir, cfg.steps, [], cfg.timeout_s, sessions)
        if trainer.run(cwd=REPO) != 0:
            print("\n".join(trainer.tail[-15:]), file=sys.stderr)
            raise SystemExit(f"error: {arm} seed {seed}: the trainer exited with {trainer.proc.returncode}; "
                             f"see {run_dir / 'train.log'}")  # fmt: skip
    wall = trainer.end - trainer.start
    write_json(run_dir / "done.json", {"arm": arm, "seed": seed, "wall_s": round(wall, 1), "phases": trainer.phases(),
                                       "load_before": load_before, "load_after": os.getloadavg(),
                                       "config": dataclasses.asdict(cfg), "commit": commit()})  # fmt: skip
    return run_dir


def evaluate_run(run_dir: Path, shared: Path, rows: list[dict[str, Any]], protocol: Protocol, cfg) -> None:
    """Scores every saved policy of a finished run (each step once)."""
    for step in protocol.steps()[1:]:
        path = run_dir / "eval" / f"step_{step:03d}.json"
        if path.exists():
            continue
        policy = run_dir / "ckpt" / f"global_step_{step}" / "actor" / "huggingface"
        if not (policy / "config.json").exists():
            raise SystemExit(f"error: {run_dir} finished but saved no policy at step {step} ({policy})")
        write_json(path, {"step": step, **score_policy(policy, shared, rows, protocol, cfg)})


def run(out: Path, protocol: Protocol, arms: list[str], lock: str | None, seeds: list[int] | None = None) -> None:
    """Every unit of the experiment that has not finished: set-up, the start's score, each (seed, arm) run and its
    scores. Seeds are the outer loop, so an interrupted experiment holds whole seeds of every arm."""
    out.mkdir(parents=True, exist_ok=True)
    if not sys.stderr.isatty():  # a log file: no "Loading weights" bar per scored policy (the trainer prints lines)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    write_json(out / "protocol.json", {"protocol": dataclasses.asdict(protocol), "arms": {a: ARMS[a] for a in arms}})
    with heavy_lock(lock):
        shared = prepare(out, protocol)
    rows = heldout_rows(shared)
    cfg0 = demo_config(protocol, arms[0], 0)
    if not (out / "start_eval.json").exists():
        with heavy_lock(lock):
            write_json(out / "start_eval.json", {"step": 0, **score_policy(shared / "policy_sft", shared, rows,
                                                                             protocol, cfg0)})  # fmt: skip
    retriever, _ = corpus_search(shared / "data" / "corpus.jsonl", cfg0.topk)
    with launch.retriever_server(retriever, 0) as url:
        for seed in seeds if seeds is not None else range(protocol.seeds):
            for arm in arms:
                print(f"=== {arm} seed {seed} (load {os.getloadavg()[0]:.1f})", flush=True)
                with heavy_lock(lock):
                    run_dir = train(arm, seed, out, shared, f"{url.rstrip('/')}/retrieve", protocol)
                with heavy_lock(lock):
                    evaluate_run(run_dir, shared, rows, protocol, demo_config(protocol, arm, seed))


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.carl_vs_grpo", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "carl_vs_grpo", help="the experiment's folder")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="a subset of the arms (default: all)")
    p.add_argument("--report", action="store_true", help="only the statistics, figure and table of what finished")
    p.add_argument("--smoke", action="store_true", help="CI: 2 arms, 2 steps, 1 seed, a few questions")
    p.add_argument("--seeds", nargs="+", type=int, help="a subset of the seeds (default: all); e.g. to rerun one")
    p.add_argument(
        "--against",
        type=Path,
        help="with --report: compare each finished run with the same run in this "
        "experiment folder (the reproduction check; writes reproduction.json)",
    )
    p.add_argument("--lock", help="a file to flock around each heavy unit (one heavy job at a time on a shared box)")
    p.add_argument("--export-scores", type=Path, metavar="JSON", help="write every scored policy's per-question "
                   "held-out scores of the experiment in --out to this file (compact) and stop")  # fmt: skip
    args = p.parse_args(argv)
    if args.export_scores:
        return export_scores(args.out.resolve(), args.export_scores)
    protocol = SMOKE if args.smoke else PROTOCOL
    arms = args.arms or (list(SMOKE_ARMS) if args.smoke else list(ARMS))
    out = args.out.resolve()
    bad = sorted(set(args.seeds or ()) - set(range(protocol.seeds)))
    if bad:
        raise SystemExit(f"error: --seeds {bad}: the protocol has seeds 0..{protocol.seeds - 1}; pick from those.")
    if args.against and not args.report:
        raise SystemExit("error: --against compares finished runs; add --report (run the rerun first without it).")
    if args.report:
        for folder in (out, args.against.resolve()) if args.against else (out,):
            if not (folder / "start_eval.json").exists():
                raise SystemExit(
                    f"error: {folder} holds no experiment (no start_eval.json); run without --report first."
                )
        return reproduction(out, args.against.resolve()) if args.against else build_report(out)
    saved = out / "protocol.json"
    if saved.exists():
        before = json.loads(saved.read_text())["protocol"]
        if before != json.loads(json.dumps(dataclasses.asdict(protocol))):
            raise SystemExit(f"error: {out} was started with another protocol ({saved}); use another --out.")
    run(out, protocol, arms, args.lock, args.seeds)
    return build_report(out)


if __name__ == "__main__":
    main()
