"""The second prespecified CARL-against-GRPO experiment (docs/carl_vs_grpo_2.md): forks in flight, the step-level fork
pool for CARL and for GRPO, and arms compared at equal generated-action budgets.

    python -m benchmarks.carl_vs_grpo_2 --out runs/carl_vs_grpo_2             # every arm x seed; run again to resume
    python -m benchmarks.carl_vs_grpo_2 --out runs/carl_vs_grpo_2 --report    # statistics, figure, table
    python -m benchmarks.carl_vs_grpo_2 --out runs/carl_vs_grpo_2 --export-scores scores.json  # per-question scores
    python -m benchmarks.carl_vs_grpo_2 --out /tmp/smoke --smoke              # CI: 2 arms, a few steps

What differs from the first protocol (`benchmarks.carl_vs_grpo`, whose runner this one reuses): the held-out set is
drawn fresh (`heldout_rows`: none of its questions was scored, trained or piloted on before), the retrieval is the
machine-independent one, and every arm runs until it has generated as many actions as GRPO did in its `grpo_steps`
steps (GRPO runs first in each seed and sets that seed's budget B). The trainer saves the policy after every step;
the policy is scored at the first step whose cumulative generated actions reach 1/3, 2/3 and all of B, and at steps
10, 20 and 30 (equal steps); the other checkpoints are then deleted. An arm that does not reach B within its
`max_steps` is scored at its last step and reported as short.

Layout of `--out` (as the first protocol's; a finished unit is never run again):

    shared/                                  data, SFT start, and heldout2.json (the fresh held-out set)
    start_eval.json                          the start on the held-out set
    runs/<arm>/seed<k>/{command.txt,train.log,metrics.jsonl,done.json}
    runs/<arm>/seed<k>/eval/step_<s>.json    per-question exact match of the step-s policy
    runs/<arm>/seed<k>/points.json           the budget B, the steps where 1/3, 2/3, all of it were reached
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import carl_vs_grpo as first
from benchmarks.carl_vs_grpo_2_report import build_report
from benchmarks.carl_vs_grpo_report import export_scores
from recipe.carl.io import write_json
from recipe.carl.synthhop.make_data import SynthHopConfig, build, write
from recipe.carl.tiny import launch
from recipe.carl.tiny.config import DemoConfig
from recipe.carl.tiny.report import read_metrics
from recipe.carl.tiny.trajectory import corpus_search

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Protocol2:
    """The settings every arm shares (docs/carl_vs_grpo_2.md; fixed before the comparison runs)."""

    seeds: int = 4
    demo: dict[str, Any] = field(default_factory=lambda: dict(first.PROTOCOL.demo))
    """The first protocol's shared settings (steps: GRPO's; CARL arms run up to `max_steps`)."""
    grpo_steps: int = 30
    """GRPO's steps: its cumulative generated actions after them are the seed's budget B."""
    max_steps: int = 55
    """The most steps any arm runs to reach B."""
    fractions: tuple[float, ...] = (1 / 3, 2 / 3, 1.0)
    """Budget points at which each arm is scored (and the rules decided at 1.0)."""
    equal_steps: tuple[int, ...] = (10, 20, 30)
    """Also scored: the first protocol's equal-step points."""
    eval_samples: int = 4
    eval_seed: int = 1234
    heldout_draw: int = 1500
    """Test questions drawn from the knowledge base (seed 0) for the fresh held-out set, before the exclusions."""
    heldout_keep: int = 500
    """The held-out set: the first this many that no earlier run, pilot or tuning saw."""
    exclude_first_protocol_tests: int = 500
    """The first protocol drew its 479 held-out questions from a test split of this size: all are excluded."""

    def steps(self, arm: str) -> int:
        return self.grpo_steps if arm == "grpo" else self.max_steps


PROTOCOL2 = Protocol2()
#: arm -> `DemoConfig` fields that differ from the shared ones. K and the pool's constants: docs/carl_vs_grpo_2.md.
ARMS2: dict[str, dict[str, Any]] = {
    "grpo": {"algo": "grpo"},
    "carl": {"algo": "carl"},
    "carl_k2": {"algo": "carl", "forks_in_flight": 2},
    "carl_pool": {"algo": "carl", "pool_floor": 3, "pool_prior": 4.0},
    "grpo_pool": {"algo": "grpo", "pool_floor": 4, "pool_prior": 1.0},
}
SMOKE2 = Protocol2(  # n_forks 3: the CARL pool's floor (3) must fit a tree's budget
    seeds=1, demo={**first.SMOKE.demo, "n_forks": 3}, grpo_steps=2, max_steps=4, equal_steps=(1, 2), eval_samples=2,
    heldout_draw=120, heldout_keep=20, exclude_first_protocol_tests=40,
)  # fmt: skip
SMOKE_ARMS2 = ("grpo", "carl_pool", "grpo_pool")


def demo_config(protocol: Protocol2, arm: str, seed: int) -> DemoConfig:
    fields = {**protocol.demo, **ARMS2[arm], "rl_seed": seed, "steps": protocol.steps(arm), "test_freq": 1}
    return DemoConfig(**fields)


# ------------------------------------------------------------------------------------------------ held-out set
def heldout_rows(shared: Path, protocol: Protocol2) -> list[dict[str, Any]]:
    """The fresh held-out set (made once, `shared/heldout2/`): test questions of the same knowledge base that are
    not among the training questions (the SFT demonstrations, the RL questions and every pilot's come from them), the
    demo's test questions, or the first protocol's held-out draw; the first `heldout_keep` of them."""
    import pandas as pd  # here, not at the top: only the runs need it

    folder = shared / "heldout2"
    if not (folder / "test.parquet").exists():
        cfg = DemoConfig(**protocol.demo)
        kb = {"seed": cfg.seed, "n_entities": cfg.n_entities, "n_train": cfg.n_train}
        demo = build(SynthHopConfig(**kb, n_test=cfg.n_test))  # the demo's (and every run's) training and test split
        before = build(SynthHopConfig(**kb, n_test=protocol.exclude_first_protocol_tests))
        seen = sorted({q.text for split in (demo.train, demo.test, before.test) for q in split})
        write(build(SynthHopConfig(**kb, n_test=protocol.heldout_draw)), folder, overwrite=True,
              command="benchmarks.carl_vs_grpo_2 (fresh held-out draw)")  # fmt: skip
        write_json(folder / "excluded.json", {"questions": seen})
    seen = set(json.loads((folder / "excluded.json").read_text())["questions"])
    rows = [r for r in pd.read_parquet(folder / "test.parquet").to_dict("records")
            if r["extra_info"]["question"] not in seen][: protocol.heldout_keep]  # fmt: skip
    if len(rows) < protocol.heldout_keep:
        raise SystemExit(f"error: only {len(rows)} fresh held-out questions; raise Protocol2.heldout_draw.")
    return rows


# --------------------------------------------------------------------------------------------------- budgets
def cumulative_generated(run_dir: Path) -> list[float]:
    """Actions generated up to and including each step (every sample), from the trainer's metrics."""
    rows = {int(r["step"]): r for r in read_metrics(run_dir / "metrics.jsonl") if "carl/questions" in r}
    total, out = 0.0, []
    for s in sorted(rows):
        total += rows[s]["carl/actions_generated_per_question"] * rows[s]["carl/questions"]
        out.append(total)
    return out


def budget_points(cumulative: list[float], budget: float, fractions: tuple[float, ...]) -> dict[str, int | None]:
    """The first step (1-based) whose cumulative generated actions reach each fraction of the budget (None: never)."""
    points: dict[str, int | None] = {}
    for f in fractions:
        reached = [s for s, c in enumerate(cumulative, start=1) if c >= f * budget * (1 - 1e-9)]
        points[f"{f:.3f}"] = reached[0] if reached else None
    return points


def run_arm(arm: str, seed: int, out: Path, shared: Path, url: str, protocol: Protocol2) -> Path:
    """One (arm, seed) run through verl's trainer, the policy saved after every step (the first protocol's `train`)."""
    cfg = demo_config(protocol, arm, seed)
    return first.train(arm, seed, out, shared, url, _AsFirst(protocol, cfg), cfg=cfg)


@dataclass(frozen=True)
class _AsFirst:
    """The first protocol's runner fields that `first.train` and `first.score_policy` read."""

    protocol: Protocol2
    cfg: DemoConfig

    @property
    def eval_samples(self) -> int:
        return self.protocol.eval_samples

    @property
    def eval_seed(self) -> int:
        return self.protocol.eval_seed

    @property
    def eval_every(self) -> int:
        return 1


def score_points(arm: str, seed: int, out: Path, shared: Path, rows: list[dict[str, Any]], protocol: Protocol2) -> None:
    """The seed's budget B (GRPO's cumulative generated actions after `grpo_steps`), this run's points, its scores."""
    run_dir = out / "runs" / arm / f"seed{seed}"
    grpo_dir = out / "runs" / "grpo" / f"seed{seed}"
    budget = cumulative_generated(grpo_dir)[protocol.grpo_steps - 1]
    cumulative = cumulative_generated(run_dir)
    points = budget_points(cumulative, budget, protocol.fractions)
    last = len(cumulative)
    steps = sorted({*(p if p is not None else last for p in points.values()), *protocol.equal_steps} & set(
        range(1, last + 1)))  # fmt: skip
    write_json(run_dir / "points.json", {"budget": budget, "points": points, "short": points[f"{1.0:.3f}"] is None,
                                         "cumulative": cumulative, "scored": steps})  # fmt: skip
    cfg = demo_config(protocol, arm, seed)
    for step in steps:
        path = run_dir / "eval" / f"step_{step:03d}.json"
        if path.exists():
            continue
        policy = run_dir / "ckpt" / f"global_step_{step}" / "actor" / "huggingface"
        write_json(path, {"step": step, **first.score_policy(policy, shared, rows, _AsFirst(protocol, cfg), cfg)})
    for ckpt in (run_dir / "ckpt").glob("global_step_*"):  # the scored steps' policies are kept, the rest deleted
        if int(ckpt.name.split("_")[-1]) not in steps:
            shutil.rmtree(ckpt)


def record_protocol(out: Path, protocol: Protocol2, arms: list[str]) -> dict[str, Any]:
    """`out/protocol.json`: the protocol and every arm ever run in `out` (the report reads its arms), this call's
    added to the earlier ones. Refuses a folder started with another protocol, or with other settings for an arm."""
    saved = out / "protocol.json"
    before = json.loads(saved.read_text()) if saved.exists() else None
    if before and before["protocol"] != json.loads(json.dumps(dataclasses.asdict(protocol))):
        raise SystemExit(f"error: {out} was started with another protocol ({saved}); use another --out.")
    known = before["arms"] if before else {}
    for arm, fields in known.items():
        if arm not in ARMS2 or json.loads(json.dumps(ARMS2[arm])) != fields:
            raise SystemExit(f"error: {saved} ran arm {arm} with {fields}, not ARMS2's {ARMS2.get(arm)}; "
                             "use another --out.")  # fmt: skip
    record = {"protocol": dataclasses.asdict(protocol), "arms": {a: ARMS2[a] for a in ARMS2 if a in known or a in arms}}
    out.mkdir(parents=True, exist_ok=True)
    write_json(saved, record)
    return record


def run(out: Path, protocol: Protocol2, arms: list[str], lock: str | None, seeds: list[int] | None = None) -> None:
    """Every unit not finished yet: set-up, the start's score, per seed GRPO first (its budget), then the other arms."""
    record_protocol(out, protocol, arms)
    with first.heavy_lock(lock):
        shared = first.prepare(out, _FirstShape(protocol))
    rows = heldout_rows(shared, protocol)
    cfg0 = demo_config(protocol, arms[0], 0)
    if not (out / "start_eval.json").exists():
        with first.heavy_lock(lock):
            start = first.score_policy(shared / "policy_sft", shared, rows, _AsFirst(protocol, cfg0), cfg0)
            write_json(out / "start_eval.json", {"step": 0, **start})
    retriever, _ = corpus_search(shared / "data" / "corpus.jsonl", cfg0.topk)
    ordered = ["grpo", *[a for a in arms if a != "grpo"]]
    with launch.retriever_server(retriever, 0) as url:
        for seed in seeds if seeds is not None else range(protocol.seeds):
            for arm in ordered:
                print(f"=== {arm} seed {seed}", flush=True)
                with first.heavy_lock(lock):
                    run_arm(arm, seed, out, shared, f"{url.rstrip('/')}/retrieve", protocol)
                with first.heavy_lock(lock):
                    score_points(arm, seed, out, shared, rows, protocol)


@dataclass(frozen=True)
class _FirstShape:
    """What `first.prepare` reads of a protocol: the demo settings (data, SFT start) and the held-out draw size."""

    protocol: Protocol2

    @property
    def demo(self) -> dict[str, Any]:
        return self.protocol.demo

    @property
    def heldout_tests(self) -> int:
        return self.protocol.exclude_first_protocol_tests


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.carl_vs_grpo_2", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "carl_vs_grpo_2")
    p.add_argument("--arms", nargs="+", choices=list(ARMS2), help="a subset of the arms (GRPO always runs first)")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--report", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--lock", help="a file to flock around each heavy unit")
    p.add_argument("--export-scores", type=Path, metavar="JSON", help="write every scored policy's per-question "
                   "held-out scores in --out to this file (compact, as the first protocol's) and stop")  # fmt: skip
    args = p.parse_args(argv)
    protocol = SMOKE2 if args.smoke else PROTOCOL2
    arms = list(dict.fromkeys(["grpo", *(args.arms or (SMOKE_ARMS2 if args.smoke else ARMS2))]))
    out = args.out.resolve()
    if args.export_scores:
        return export_scores(out, args.export_scores)
    if args.report:
        return build_report(out)
    bad = sorted(set(args.seeds or ()) - set(range(protocol.seeds)))
    if bad:
        raise SystemExit(f"error: --seeds {bad}: the protocol has seeds 0..{protocol.seeds - 1}.")
    run(out, protocol, arms, args.lock, args.seeds)
    return None


if __name__ == "__main__":
    main()
