"""The embedded default: train a small CARL search agent with verl's real trainer on a CPU, end to end.

`bash scripts/run_carl_tiny_cpu.sh` runs this module. Steps (each writes under the run folder):

1. SynthHop: knowledge base, corpus, questions, noisy reference demonstrations (`data/`).
2. The BM25 retriever server over the corpus (Search-R1 protocol), in this process, on a free port by default.
3. The SFT start (`policy_sft/`, `recipe.carl.tiny.warm_start`): the shipped one when it was built from exactly
   this data, otherwise a ~1.1M word-level policy (or SmolLM2-135M) trained here on the demonstrations.
4. RL through `python -m recipe.carl.main_carl +demo=tiny_cpu +device=cpu` (settings: `config/demo/tiny_cpu.yaml`,
   sizes: `DemoConfig` in `recipe.carl.tiny.config`): the CARL tree agent loop and `carl` estimator (or verl's GRPO
   with `--algo grpo`), the CPU rollout backend, verl's FSDP2 trainer. Held-out accuracy is verl's validation
   before training and every `test_freq` steps: `val_samples` episodes per question sampled at the rollout
   temperature, mean exact match. The trained policy is kept (`policy_rl/`).
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
from pathlib import Path

from recipe.carl.io import write_json, write_text
from recipe.carl.search.pages import PageStore
from recipe.carl.tiny import cli, launch, report
from recipe.carl.tiny.config import REPO, ROLLOUT_DEVICES, DemoConfig


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
    if cfg.full_determinism:
        settings["actor_rollout_ref.rollout.full_determinism"] = True
        settings["actor_rollout_ref.rollout.seed"] = cfg.rl_seed
    if cfg.action_space == "paper":
        settings["algorithm.carl.action_space"] = cfg.action_space
        settings["algorithm.carl.page_chunk_chars"] = cfg.page_chunk_chars
    if cfg.algo == "carl":
        keys = ("n0", "n_forks", "selection", "update_set", "merge", "spread_prior", "packing", "forks_in_flight")
        settings.update({f"algorithm.carl.{k}": getattr(cfg, k) for k in keys})
    else:
        settings["algorithm.adv_estimator"] = "grpo"
        settings["actor_rollout_ref.rollout.n"] = 1 if cfg.pool_floor else cfg.grpo_group or leaves
    if cfg.pool_floor:  # the step-level fork pool (GRPO: groups of varying size from the same total)
        group = 0 if cfg.algo == "carl" else cfg.grpo_group or leaves
        pool = f"{{floor: {cfg.pool_floor}, prior: {cfg.pool_prior}, group: {group}}}"
        settings["algorithm.carl.fork_pool"] = pool
    # Questions per update (recipe.carl.schedule; GRPO: prompts): a step's rows in one update, for both algorithms.
    settings["actor_rollout_ref.actor.ppo_mini_batch_size"] = cfg.batch_prompts
    return [f"{key}={value}" for key, value in settings.items()]


def run_demo(
    cfg: DemoConfig, run_dir: Path, *, shipped_sft: Path | None = None, port: int = 0, sft_only: bool = False
) -> dict:
    """One run into an empty `run_dir`: data, retriever, SFT start (`shipped_sft` when its key fits, e.g.
    `cfg.shipped_start()`; None: trained here), RL, summary.

    Returns:
        The summary (also written to `run_dir/summary.json`), or `{"sft", "policy_sft"}` with `sft_only`.
    """
    # Here, not at the top: these import torch and transformers, which `--help` and a refused flag never need.
    from recipe.carl.synthhop.make_data import SynthHopConfig, build, write
    from recipe.carl.tiny.trajectory import corpus_search
    from recipe.carl.tiny.warm_start import pages_config, warm_start

    start = clock = time.time()
    phases: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        phases[name], clock = round(time.time() - clock, 1), time.time()

    print(f"[1/5] SynthHop data -> {run_dir / 'data'}", flush=True)
    data_dir = run_dir / "data"
    pages = pages_config(cfg)  # the paper's action space: SynthHop's pages variant
    sizes = {"seed": cfg.seed, "n_entities": cfg.n_entities, "n_train": cfg.n_train, "n_test": cfg.n_test}
    if pages is not None:
        sizes.update(pages=pages, max_turns=cfg.max_actions)
    data = build(SynthHopConfig(**sizes))
    write(data, data_dir, overwrite=True, command="recipe.carl.tiny.demo")
    retriever, search = corpus_search(data_dir / "corpus.jsonl", cfg.topk)
    with contextlib.ExitStack() as stack:
        print("[2/5] BM25 retriever and SFT start", flush=True)
        store = PageStore(retriever.corpus) if pages is not None else None
        url = stack.enter_context(launch.retriever_server(retriever, port, pages=store))
        model_dir, sft = warm_start(run_dir, data_dir, search, cfg, shipped_sft)
        lap("data and SFT start")
        if sft_only:
            print(f"SFT start written to {model_dir}: {sft}")
            return {"sft": sft, "policy_sft": str(model_dir)}
        print(f"[3/5] {cfg.algo} through verl's trainer on CPU (log: {run_dir / 'train.log'})", flush=True)
        launch.write_val_file(data_dir, cfg.val_samples)
        tool_yaml = launch.write_tool_yaml(run_dir, cfg.topk, cfg.snippet_words if pages is not None else None)
        overrides = trainer_overrides(cfg, run_dir, data_dir, model_dir, tool_yaml)
        device = f"+device={ROLLOUT_DEVICES[cfg.rollout]}"
        cmd = [launch.trainer_python(cfg), "-m", "recipe.carl.main_carl", "+demo=tiny_cpu", device, *overrides]
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
    p = cli.parser()
    args = p.parse_args(argv)
    cfg = cli.config_from(args, p)
    run_dir = args.run_dir.resolve()
    if run_dir.exists():
        shutil.rmtree(run_dir)
    write_text(run_dir / "command.txt", cli.rerun_command(args, argv))
    shipped = None if args.no_shipped_sft else cfg.shipped_start()
    try:
        summary = run_demo(cfg, run_dir, shipped_sft=shipped, port=args.port, sft_only=args.sft_only)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the trainer and its Ray session are stopped; {run_dir} holds an unfinished run.",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    if not args.sft_only:
        print("\n" + report.format_table(summary))
    return summary


if __name__ == "__main__":
    main()
