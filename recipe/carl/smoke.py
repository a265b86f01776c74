"""Before renting a node: two training steps of the GPU path on a tiny model, in minutes, then the checks a real run
needs (`scripts/smoke_gpu.sh` runs this).

    python -m recipe.carl.smoke --out runs/smoke_gpu                    # CARL, 1 GPU, a random tiny Qwen2 model
    python -m recipe.carl.smoke --out runs/smoke_grpo --algo grpo       # the GRPO script
    python -m recipe.carl.smoke --out runs/smoke_05b --model Qwen/Qwen2.5-0.5B-Instruct --gpus 8
    python -m recipe.carl.smoke --out runs/smoke_cpu --device cpu       # the same path on a CPU (CI: slow test)

What it runs is what a real run runs: `scripts/run_carl_qwen7b.sh` (or `run_grpo_qwen7b.sh`) with small sizes through
the environment (`SMOKE_ENV`) and a few overrides (`SMOKE_OVERRIDES`), so `main_carl`'s start-up checks, verl's Ray
trainer, FSDP2, vLLM's async rollout with CARL's agent loop and the search tool, the update, checkpoint saving and
deleting, validation, the metrics file and the tree dumps are the real ones. Then `python -m recipe.carl.evaluate`
on the last checkpoint (verl's merger, then vLLM), and the learning curve and tree picture of the checkpoint folder.
Nothing is downloaded with the default model: a randomly initialised Qwen2 (`recipe.carl.cpu.tiny_model`, head size
64, byte-level tokenizer), built here. Its turns are random bytes, so it rarely searches or answers and its rewards
are mostly 0: the smoke run checks the plumbing, not learning. `--model Qwen/Qwen2.5-0.5B-Instruct` (downloaded)
follows the prompt's tags and exercises searches and answers too.

The data: SynthHop's corpus (300 documents, served by `scripts/launch_retriever.sh` on a free port) and 16 training
and 8 validation questions in the Search-R1 prompt (`data_preprocess.common.make_search_row`). Everything is written
under `--out` (a smoke run's checkpoints there from before are deleted first: they would be resumed, not rerun); the
last lines list each check with `ok` or `FAILED`, and the exit code is 1 if one failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from data_preprocess.common import make_search_row
from recipe.carl.cpu.tiny_model import save_tiny_model
from recipe.carl.io import write_jsonl
from recipe.carl.tiny.run_folder import read_metrics, tree_dumps

REPO = Path(__file__).resolve().parents[2]
STEPS = 2
#: The run script's sizes for the smoke run (the variables of scripts/run_carl_qwen7b.sh and scripts/run_settings.sh).
SMOKE_ENV = {
    "NNODES": "1",
    "TRAIN_BATCH_SIZE": "4",
    "PPO_MINI_BATCH_QUESTIONS": "2",  # 2 updates a step
    "N0": "2",
    "N_FORKS": "2",
    "GROUP_SIZE": "4",  # GRPO: 4 chains per question
    "MAX_ACTIONS": "3",
    "MAX_ACTION_TOKENS": "64",
    "MAX_PROMPT_LENGTH": "1024",  # the byte-level tokenizer: ~750 tokens for the Search-R1 prompt
    "MAX_RESPONSE_LENGTH": "768",
    "TOTAL_STEPS": str(STEPS),
    "SAVE_FREQ": "1",  # a checkpoint at steps 1 and 2 ...
    "MAX_CKPT_TO_KEEP": "1",  # ... and step 1's deleted when step 2's is saved
    "TEST_FREQ": str(STEPS),
    "VAL_BEFORE_TRAIN": "true",
    "LOGGER": "console,file",
    "SEED": "0",
}
#: Overrides after the script's own (Hydra takes the last value of a key).
SMOKE_OVERRIDES = [
    "algorithm.carl.dump_every=1",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",  # a tiny model; leaves room on a shared GPU
]
#: What a CPU needs instead (as tests/recipe/test_readme_your_own_data.py runs the same script on a CPU).
CPU_OVERRIDES = [
    "+device=cpu",
    "actor_rollout_ref.rollout.name=carl_hf",
    "actor_rollout_ref.model.use_remove_padding=False",
    "actor_rollout_ref.model.enable_gradient_checkpointing=False",
]


def log(message: str) -> None:
    print(f"[smoke] {message}", flush=True)


def prepare_data(out: Path) -> dict[str, Path]:
    """SynthHop's corpus, and 16 training and 8 validation questions as verl parquet rows with the Search-R1 prompt."""
    import pandas as pd  # here, not at the top: `-h` needs no pandas

    from recipe.carl.synthhop.make_data import SynthHopConfig, build  # here, not at the top: it imports transformers

    data = build(SynthHopConfig(seed=0, n_entities=300, n_train=16, n_test=8))
    paths = {"corpus": out / "data" / "corpus.jsonl"}
    write_jsonl(paths["corpus"], data.kb.corpus())
    for split, name, questions in (("train", "train", data.train), ("test", "val", data.test)):
        rows = [
            make_search_row(data_source="smoke", question=q.text, answers=[q.answer], split=split, idx=i)
            for i, q in enumerate(questions)
        ]
        paths[name] = out / "data" / f"{name}.parquet"
        pd.DataFrame(rows).to_parquet(paths[name], index=False)
    return paths


def prepare_model(out: Path, model: str) -> str:
    """`random`: a randomly initialised Qwen2 written to `out/model` (nothing downloaded); else `model` itself."""
    if model != "random":
        return model
    # Head size 64 (256 / 4), which flash-attn and vLLM's attention kernels take; 2 layers.
    return save_tiny_model(out / "model", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=512, max_position_embeddings=4096)  # fmt: skip


def start_retriever(corpus: Path, out: Path) -> tuple[subprocess.Popen, str]:
    """`scripts/launch_retriever.sh` on a free port; returns the process and its URL once it listens."""
    port_file = out / "retriever.port"
    port_file.unlink(missing_ok=True)
    env = {**os.environ, "CORPUS": str(corpus), "PORT": "0", "PORT_FILE": str(port_file), "PYTHON": sys.executable}
    with open(out / "retriever.log", "wb") as f:
        proc = subprocess.Popen(["bash", "scripts/launch_retriever.sh"], cwd=REPO, env=env, stdout=f, stderr=f)
    deadline = time.monotonic() + 300
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"error: the retriever did not start; see {out / 'retriever.log'}")
        time.sleep(0.5)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}/retrieve"


def train_command(
    algo: str, model: str, files: dict[str, Path], ckpt_dir: Path, gpus: int, device: str
) -> tuple[list[str], dict[str, str]]:
    """The run script's command line and the environment variables the smoke run sets for it."""
    script = "scripts/run_grpo_qwen7b.sh" if algo == "grpo" else "scripts/run_carl_qwen7b.sh"
    env = {
        **SMOKE_ENV,
        "MODEL_PATH": model,
        "TRAIN_FILE": str(files["train"]),
        "VAL_FILE": str(files["val"]),
        "CKPT_DIR": str(ckpt_dir),
        "EXPERIMENT": f"smoke_{algo}",
        "GPUS_PER_NODE": str(gpus),
    }
    overrides = [*SMOKE_OVERRIDES, *(CPU_OVERRIDES if device == "cpu" else [])]
    if device == "cpu":
        env["CARL_DEVICE"] = "cpu"
    return ["bash", script, *overrides], env


def checks(run: Path, algo: str) -> list[tuple[str, bool]]:
    """What a finished smoke run must have left in its checkpoint folder."""
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    last = rows.get(STEPS, {})
    found = [
        (f"metrics.jsonl has steps 0-{STEPS} (validation before step 1)", sorted(rows) == list(range(STEPS + 1))),
        ("each step logged its budget (carl/questions)", all("carl/questions" in rows.get(s, {}) for s in (1, 2))),
        ("running totals (carl/total/actions_generated)", last.get("carl/total/actions_generated", 0) > 0),
        (f"validation at step {STEPS}", any(k.startswith("val-") for k in last)),
        ("the search tool answered (no failed search)", bool(last) and last.get("search/errors", 0) == 0),
        (f"checkpoint global_step_{STEPS}/actor", (run / f"global_step_{STEPS}" / "actor").is_dir()),
        ("MAX_CKPT_TO_KEEP=1 deleted global_step_1/actor",
         (run / "global_step_1").is_dir() and not (run / "global_step_1" / "actor").exists()),
        ("run record and totals beside the checkpoint", all(
            (run / f"global_step_{STEPS}" / name).exists() for name in ("carl_run_config.json", "carl_totals.json"))),
    ]  # fmt: skip
    if algo == "carl":
        found.append(("tree dumps (carl_trees/)", len(tree_dumps(run)) == STEPS))
    return found


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log(f"data and model under {out}")
    files = prepare_data(out)
    model = prepare_model(out, args.model)
    retriever, url = start_retriever(files["corpus"], out)
    log(f"retriever on {url}")
    ckpt = out / "ckpt"
    command, env = train_command(args.algo, model, files, ckpt, args.gpus, args.device)
    run_dir = ckpt / f"smoke_{args.algo}"
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier smoke run's checkpoints would be resumed, not rerun
    results: list[tuple[str, bool]] = []
    try:
        env = {**os.environ, **env, "RETRIEVER_URL": url}
        # The script runs `python3`: this interpreter's (its environment's bin first), importing this checkout.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        log(f"training: {' '.join(f'{k}={v}' for k, v in env.items() if k in SMOKE_ENV)} {' '.join(command)}")
        started = time.monotonic()
        with open(out / "train.log", "wb") as f:
            code = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        log(f"training exited {code} after {time.monotonic() - started:.0f} s (log: {out / 'train.log'})")
        results.append(("the run script exited 0", code == 0))
        results += checks(run_dir, args.algo)
        if code == 0:
            results.append(("evaluation of the last checkpoint", evaluate(run_dir, files, url, out, args.device)))
            results.append(("pictures of the checkpoint folder", pictures(run_dir, files, out, args.algo)))
    finally:
        retriever.terminate()
        retriever.wait()
    for name, ok in results:
        print(f"{'ok    ' if ok else 'FAILED'} {name}")
    (out / "checks.json").write_text(json.dumps(dict(results), indent=1))
    return 0 if all(ok for _, ok in results) else 1


def evaluate(run_dir: Path, files: dict[str, Path], url: str, out: Path, device: str) -> bool:
    """`python -m recipe.carl.evaluate` on the last checkpoint (merged by verl's merger; vLLM on a GPU)."""
    command = [sys.executable, "-m", "recipe.carl.evaluate", "--model", str(run_dir / f"global_step_{STEPS}" / "actor"),
               "--data", str(files["val"]), "--limit", "4", "--out", str(out / "eval"), "--overwrite",
               "--retriever-url", url, "--engine", "hf" if device == "cpu" else "vllm"]  # fmt: skip
    if device != "cpu":
        command += ["--gpu-memory-utilization", "0.3"]
    with open(out / "eval.log", "wb") as f:
        code = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    return code == 0 and (out / "eval" / "results.json").exists()


def pictures(run_dir: Path, files: dict[str, Path], out: Path, algo: str) -> bool:
    """The learning curve and (CARL) the tree picture, from the checkpoint folder."""
    from recipe.carl.tiny import plots  # here, not at the top: it imports matplotlib

    plots.main(["compare", str(run_dir), "-o", str(out / "learning_curve.png")])
    if algo == "carl":
        plots.main(["tree", str(run_dir), "--data", str(files["train"]), "-o", str(out / "tree.png")])
    return (out / "learning_curve.png").exists() and (algo != "carl" or (out / "tree.png").exists())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.carl.smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for data, model, checkpoints, logs and pictures")
    p.add_argument("--algo", choices=["carl", "grpo"], default="carl", help="which run script (default carl)")
    p.add_argument("--model", default="random", help="random (a tiny Qwen2, built here) or a model folder / hub id")
    p.add_argument("--gpus", type=int, default=1, help="GPUS_PER_NODE (default 1; 8 exercises FSDP over 8 ranks)")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="cpu: the same path on a CPU")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
