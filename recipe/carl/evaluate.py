"""Evaluate a model (and optionally a baseline) on search-QA test sets, in the environment the policy is trained in.

    python -m recipe.carl.evaluate --model runs/x/policy_rl --data data/myqa/test.parquet --out runs/eval_x
    python -m recipe.carl.evaluate --model ckpt/exp/global_step_100/actor --baseline Qwen/Qwen2.5-7B-Instruct \\
        --data data/nq_test.parquet data/hotpotqa_test.parquet --out runs/eval_step100     # GPU: scripts/eval.sh

Each question runs as one trajectory (or `--samples k` trajectories at `--temperature T`) through the agent loop's own
`SearchEnvironment` (`recipe/carl/agent_loop.py`): the same prompt tokenisation (the row's chat `prompt` through the
model's chat template), stop strings, action parsing, `<information>` observations, T_max and finish reasons as
training; searches go through the recipe's search tool (`CarlSearchTool`, the HTTP client of `RETRIEVER_URL`), and
each trajectory is scored by the training reward (`recipe.carl.search.reward.compute_score`, or a custom reward
function given the way verl takes one). The inference engine is the one training uses on that hardware: vLLM on a GPU
(in-process `AsyncLLM`, sampling parameters mapped as verl's `vLLMHttpServer` maps them), the CPU backend
(`HFRolloutServer`, in-process, no Ray) on a CPU.

`--model` (and `--baseline`) take a Hugging Face model folder (or hub id) or a verl checkpoint
(`.../global_step_N/actor`, or `global_step_N`): its `huggingface/` folder when it holds weights
(`checkpoint.save_contents` with `hf_model`), else the FSDP shards merged once with verl's own merger
(`python -m verl.model_merger merge --backend fsdp`, which writes bf16 weights) into `<actor>/merged_hf` (`--merge-dir`
to put it elsewhere), reused while the shards are unchanged.

Outputs in `--out`:

- `results.md` and `results.json`: per data set (`data_source`) and model, EM, F1, format validity, reward, actions,
  searches and generated tokens per question, finish reasons, search errors (and pass@k with `--samples k`); with
  `--baseline`, both models side by side with the difference and a 95 % paired bootstrap interval;
- `<label>/<data_source>.jsonl`: one line per question: question, gold answers, and per trajectory the prediction,
  every action's text and observation, the finish reason and the reward.

Defaults suit real models (Qwen2.5-7B as `scripts/run_carl_qwen7b.sh` trains it): per-turn budget 512 tokens,
T_max 32, top-3 documents, prompt 2048 and trajectory 12288 tokens. The SynthHop demo passes its own
(`recipe.carl.tiny.local_agent`: 32-token turns, top-2, T_max 6, its corpus in process).

Why a paired bootstrap: the two models answer the same questions, so the per-question differences carry the
comparison and the questions' difficulty cancels; EM differences take only the values -1, 0, 1 (mostly 0), which a
bootstrap over questions handles without assuming normality, for any metric (with `--samples k` a question's value is
its mean over the k samples, so questions stay the resampled unit).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from carl_core import CARLConfig, RolloutTree, rollout_from
from recipe.carl.io import atomic_dir, write_json, write_jsonl, write_text

logger = logging.getLogger(__name__)

DEFAULT_RETRIEVER_URL = "http://127.0.0.1:8000/retrieve"
#: The metrics compared between two models (per question: the mean over its samples).
COMPARED = ("em", "f1", "format", "reward")
#: `org/name`: a Hugging Face hub id (when no such local path exists).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: Files that hold a model's weights in a Hugging Face folder.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


class EvalError(RuntimeError):
    """A bad input: the message names it and says how to fix it."""


# ------------------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How each question is rolled out (defaults: a real model, as `scripts/run_carl_qwen7b.sh` trains it)."""

    max_actions: int = CARLConfig().max_actions
    """T_max: agent turns per trajectory (`algorithm.carl.max_actions`)."""
    max_action_tokens: int = 512
    """Token budget of one turn (`algorithm.carl.max_action_tokens`)."""
    prompt_length: int = 2048
    """Prompts longer than this end at the root as `prompt_too_long` (`data.max_prompt_length`)."""
    response_length: int = 12288
    """Budget of a whole trajectory after the prompt, observations included (`data.max_response_length`)."""
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = -1
    samples: int = 1
    """Trajectories per question."""
    seed: int = 0
    """With temperature > 0, every request gets its own seed derived from this one (reproducible samples)."""
    invalid_action: str = "end"
    """`algorithm.carl.invalid_action`: a malformed turn ends the trajectory (end) or gets feedback and goes on."""
    thinking: bool = False
    """`algorithm.carl.thinking` (Qwen3-style models)."""
    chat_template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """`data.apply_chat_template_kwargs`, e.g. {"enable_thinking": false}."""
    concurrency: int = 256
    """Trajectories in flight at once (the engine batches them)."""

    def __post_init__(self) -> None:
        for name in ("max_actions", "max_action_tokens", "prompt_length", "response_length", "samples", "concurrency"):
            if int(getattr(self, name)) < 1:
                raise EvalError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1.")
        if self.temperature < 0:
            raise EvalError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy).")
        if self.samples > 1 and self.temperature == 0:
            raise EvalError(
                f"--samples {self.samples} with greedy decoding gives {self.samples} identical trajectories: "
                "add --temperature (e.g. 0.7), or drop --samples."
            )
        if self.invalid_action not in ("end", "feedback"):
            raise EvalError(f"--invalid-action {self.invalid_action}: use end or feedback.")

    def sampling_params(self) -> dict[str, Any]:
        """What verl's agent loop sends per request (greedy: temperature 0, no top-k/top-p cut)."""
        if self.temperature == 0:
            return {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "repetition_penalty": 1.0}


# ----------------------------------------------------------------------------------------------------- engines
class HFEngine:
    """The CPU rollout backend (`HFRolloutServer`) in this process: the engine training uses on a CPU.

    On a GPU (without `CARL_DEVICE=cpu`) it runs there too, in `dtype` (bf16 by default); on a CPU always fp32.
    """

    name = "hf"

    def __init__(self, model_dir: str | Path, tokenizer: Any, settings: EvalSettings, dtype: str = "auto"):
        from transformers import AutoModelForCausalLM
        from verl.workers.config import RolloutConfig

        from recipe.carl.cpu.rollout import HFRolloutServer, _dtype, select_device

        device = select_device()
        # fp32 on a CPU (as the CPU rollout); elsewhere bf16 unless asked otherwise
        torch_dtype = _dtype("bfloat16" if dtype == "auto" else dtype, device)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype).to(device).eval()
        rollout = RolloutConfig(
            name="carl_hf",
            prompt_length=settings.prompt_length,
            response_length=settings.response_length,
            tensor_model_parallel_size=1,
            seed=settings.seed,
        )
        self.server = HFRolloutServer(rollout, model_config=None, model=model, tokenizer=tokenizer)

    async def generate(self, *, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any]) -> Any:
        return await self.server.generate(prompt_ids=prompt_ids, sampling_params=sampling_params, request_id=request_id)

    async def close(self) -> None:
        self.server = None


class VLLMEngine:
    """vLLM's `AsyncLLM` in this process, behind the `generate(request_id=, prompt_ids=, sampling_params=)` of verl.

    Hand-written rather than verl's `vLLMHttpServer`, which is a Ray actor that also runs an HTTP server and the
    trainer's weight sync; `generate` below maps the sampling parameters as its `generate` does (verl 0.9.1): a
    `max_tokens` clamped to [1, room left in max_model_len], `logprobs` True -> 0 (the sampled token's log-prob),
    `repetition_penalty` 1.0 and `ignore_eos` False unless given, and per-token log-probs read back for the sampled
    ids. The engine is built with the same worker extension as verl's and gets the same logits mask (no token id at
    or beyond `len(tokenizer)`: Qwen's embedding has unused rows). `generation_config="vllm"`: sampling defaults
    come from the request, never from the model's `generation_config.json` (verl overrides them the same way).
    """

    name = "vllm"

    def __init__(self, engine: Any, settings: EvalSettings, max_model_len: int):
        self.engine, self.settings, self.max_model_len = engine, settings, max_model_len

    @classmethod
    async def start(
        cls,
        model_dir: str | Path,
        tokenizer: Any,
        settings: EvalSettings,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        tensor_parallel_size: int = 1,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> VLLMEngine:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        max_model_len = settings.prompt_length + settings.response_length
        args = {
            "model": str(model_dir),
            "dtype": dtype,
            "max_model_len": max_model_len,
            "seed": settings.seed,
            "enable_prefix_caching": True,  # every turn of a trajectory re-sends its prefix
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "max_num_seqs": min(settings.concurrency, 1024),
            "logprobs_mode": "processed_logprobs",  # verl's rollout default
            "generation_config": "vllm",
            "worker_extension_cls": "verl.workers.rollout.vllm_rollout.utils.vLLMColocateWorkerExtension",
            **(engine_kwargs or {}),
        }
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        try:
            await engine.collective_rpc(
                method="monkey_patch_model", kwargs={"vocab_size": len(tokenizer), "banned_token_ids": []}
            )
        except BaseException:
            engine.shutdown()
            raise
        return cls(engine, settings, max_model_len)

    def request(self, prompt_ids: list[int], sampling_params: dict[str, Any]) -> tuple[Any, Any]:
        """The vLLM prompt and `SamplingParams` of one request (verl's `vLLMHttpServer.generate` mapping)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = dict(sampling_params)
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in max_model_len={self.max_model_len}")
        max_tokens = params.pop("max_tokens", None)
        max_tokens = params.pop("max_new_tokens", None) if max_tokens is None else max_tokens
        if max_tokens is None:
            s = self.settings
            max_tokens = min(s.response_length, s.prompt_length + s.response_length - len(prompt_ids))
        params["logprobs"] = 0 if params.pop("logprobs", False) else None
        params.setdefault("repetition_penalty", 1.0)
        params.setdefault("ignore_eos", False)
        sampling = SamplingParams(max_tokens=max(1, min(int(max_tokens), room)), **params)
        return TokensPrompt(prompt_token_ids=list(prompt_ids)), sampling

    async def generate(self, *, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any]) -> Any:
        from verl.workers.rollout.replica import TokenOutput

        prompt, sampling = self.request(prompt_ids, sampling_params)
        final = None
        # One vLLM request per turn: ids must be unique among running requests (verl's client adds a suffix too).
        async for output in self.engine.generate(prompt, sampling, f"{request_id}-{uuid.uuid4().hex[:12]}"):
            final = output
        if final is None or not final.outputs:
            return TokenOutput(token_ids=[], log_probs=None, stop_reason="aborted")
        out = final.outputs[0]
        token_ids = list(out.token_ids)
        log_probs = None
        if sampling.logprobs is not None:
            log_probs = [entry[token_ids[i]].logprob for i, entry in enumerate(out.logprobs)]
        stop = "aborted" if out.finish_reason == "abort" else "completed"
        return TokenOutput(token_ids=token_ids, log_probs=log_probs, stop_reason=stop, extra_fields={})

    async def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_engine(requested: str) -> str:
    """`auto`: vLLM where a GPU and vLLM are there (as training uses them), else the CPU backend.

    Raises:
        EvalError: `vllm` asked for where it is not installed.
    """
    if requested == "vllm":
        if not vllm_installed():
            raise EvalError(
                f"--engine vllm: vLLM is not installed in {sys.executable}. On a GPU node: pip install -e '.[gpu]' "
                "(verl's vllm extra); on a CPU: bash scripts/install_cpu.sh --vllm and run with .venv-vllm/bin/python; "
                "or use --engine hf (the CPU backend)."
            )
        return "vllm"
    if requested == "hf":
        return "hf"
    if requested != "auto":
        raise EvalError(f"--engine {requested}: use auto, vllm or hf.")
    import torch

    from recipe.carl.cpu.platform import is_requested

    gpu = torch.cuda.is_available() and not is_requested()
    if gpu and not vllm_installed():
        logger.warning("a GPU is there but vLLM is not installed: evaluating with the hf engine (slower)")
    return "vllm" if gpu and vllm_installed() else "hf"


# -------------------------------------------------------------------------------------------------------- models
def has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)


def _shard_stamp(actor: Path) -> dict[str, list[int]]:
    return {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(actor.glob("model_world_size_*_rank_*.pt"))
    }


def resolve_model(
    path: str | Path, merge_dir: str | Path | None = None, flag: str = "--model", fetch: bool = True
) -> Path:
    """The Hugging Face folder to load for `path` (a model folder, or a verl checkpoint, merged if needed).

    With `fetch=False` only the checks run: a hub id is not downloaded and a checkpoint not merged (the path it would
    be merged to is returned), so that every cheap check can come before the slow steps.

    Raises:
        EvalError: naming the input and what to give instead.
    """
    given = Path(path)
    what = (
        "give a Hugging Face model folder (config.json + weights) or a verl checkpoint folder "
        "(<trainer.default_local_dir>/global_step_N/actor)"
    )
    if not given.exists() and HUB_ID.fullmatch(str(path)):
        return hub_model(str(path), flag) if fetch else given
    if not given.exists():
        raise EvalError(f"{flag} {given}: no such folder; {what}.")
    if not given.is_dir():
        raise EvalError(f"{flag} {given}: is a file, not a folder; {what}.")
    folder = given / "actor" if (given / "actor").is_dir() and not (given / "config.json").exists() else given
    if (folder / "config.json").exists():
        if not has_weights(folder):
            raise EvalError(f"{flag} {folder}: has config.json but no weights (*.safetensors, *.bin); {what}.")
        return folder
    if (folder / "model" / "dist_ckpt").is_dir():
        raise EvalError(
            f"{flag} {folder}: a Megatron checkpoint; merge it first with python -m verl.model_merger merge "
            f"--backend megatron --local_dir {folder} --target_dir <folder>, then pass that folder."
        )
    if not (folder / "fsdp_config.json").exists():
        raise EvalError(
            f"{flag} {folder}: neither a model folder nor a verl FSDP checkpoint (no fsdp_config.json); {what}."
        )
    if has_weights(folder / "huggingface"):
        return folder / "huggingface"
    target = Path(merge_dir) if merge_dir else folder / "merged_hf"
    stamp = _shard_stamp(folder)
    if not stamp:
        raise EvalError(f"{flag} {folder}: a verl checkpoint without model shards (model_world_size_*_rank_*.pt).")
    marker = target / "merged_from.json"
    if marker.exists() and has_weights(target) and json.loads(marker.read_text()).get("shards") == stamp:
        return target
    if target.exists() and any(target.iterdir()) and not marker.exists():
        raise EvalError(
            f"{flag} {folder}: the merge folder {target} exists and holds something else (no merged_from.json); "
            "pass --merge-dir with a new or empty folder."
        )
    if not fetch:
        return target
    print(f"merging the FSDP checkpoint {folder} into {target} (verl.model_merger)", file=sys.stderr, flush=True)
    try:
        with atomic_dir(target) as tmp:
            cmd = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp"]
            cmd += ["--local_dir", str(folder), "--target_dir", str(tmp)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise EvalError(
                    f"{flag} {folder}: verl's model merger failed (exit {done.returncode}): "
                    f"{(done.stderr or done.stdout).strip()[-1500:]}\ncommand: {shlex.join(cmd)}"
                )
            write_json(tmp / "merged_from.json", {"checkpoint": str(folder.resolve()), "shards": stamp})
    except PermissionError as error:
        raise EvalError(
            f"{flag} {folder}: cannot write the merged model to {target} ({error}); pass --merge-dir."
        ) from error
    return target


def hub_model(repo_id: str, flag: str) -> Path:
    """A Hugging Face hub id (`Qwen/Qwen2.5-7B-Instruct`): its local snapshot, downloaded once (as verl's trainer does).

    Raises:
        EvalError: when it is neither cached nor downloadable (offline, no such model), naming the id.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as error:
        raise EvalError(
            f"{flag} {repo_id}: not a local folder, and the Hugging Face hub could not give it "
            f"({type(error).__name__}: {str(error)[:200]}); download it first (huggingface-cli download {repo_id}) "
            "or pass a local folder."
        ) from None


def model_label(path: str | Path) -> str:
    """A short name: the folder's, or `<experiment>/global_step_N` for a checkpoint."""
    p = Path(path).resolve()
    if p.name in ("huggingface", "merged_hf") and p.parent.name == "actor":
        p = p.parent
    if p.name == "actor":
        p = p.parent
    if re.fullmatch(r"global_step_\d+", p.name):
        return f"{p.parent.name}/{p.name}"
    return p.name or str(path)


# ---------------------------------------------------------------------------------------------------------- data
def load_datasets(files: Sequence[str | Path], limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Rows of the test files grouped by `data_source` (file order kept; `limit`: first N of each data set).

    Raises:
        EvalError: a missing or unreadable file, or rows without verl's RLHFDataset columns.
    """
    import pandas as pd

    fix = "write it with python -m data_preprocess.qa_file (or another data_preprocess script)"
    if not files:
        raise EvalError(f"--data: no test file given; {fix}.")
    datasets: dict[str, list[dict[str, Any]]] = {}
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise EvalError(f"--data {path}: no such file; {fix}.")
        try:
            frame = pd.read_parquet(path)
        except Exception as error:
            raise EvalError(
                f"--data {path}: not a readable parquet file ({type(error).__name__}: {error}); {fix}."
            ) from None
        missing = [c for c in ("data_source", "prompt", "reward_model") if c not in frame.columns]
        if missing:
            raise EvalError(
                f"--data {path}: missing columns {missing} (verl's RLHFDataset schema: data_source, prompt, "
                f"reward_model.ground_truth, extra_info); {fix}."
            )
        if frame.empty:
            raise EvalError(f"--data {path}: holds no rows.")
        for position, row in enumerate(frame.to_dict("records")):
            if not isinstance(row["reward_model"], dict) or "ground_truth" not in row["reward_model"]:
                raise EvalError(f"--data {path} row {position}: reward_model has no ground_truth; {fix}.")
            rows = datasets.setdefault(str(row["data_source"]), [])
            if limit is None or len(rows) < limit:
                rows.append({**row, "_file": str(path), "_row": position})
    return datasets


def question_text(row: dict[str, Any]) -> str:
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    if extra.get("question"):
        return str(extra["question"])
    users = [m.get("content", "") for m in row["prompt"] if m.get("role") == "user"]
    return str(users[-1]) if users else ""


def gold_answers(row: dict[str, Any]) -> list[str] | None:
    from recipe.carl.search.reward import parse_ground_truth

    try:
        return parse_ground_truth(row["reward_model"]["ground_truth"])[0]
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ the evaluator
class Evaluator:
    """Rolls questions out through the agent loop's `SearchEnvironment` on an engine and scores them.

    Args:
        server: an object with `generate(request_id=, prompt_ids=, sampling_params=)` (read at each rollout).
        tokenizer: the model's tokenizer (chat template included).
        search: `search(query, tree_id)` (may be async; raises on failure; an optional `.release(tree_id)`).
        reward_fn: the training reward (`reward_fn(data_source=, solution_str=, ground_truth=, extra_info=)`).
        settings: budgets and sampling.
        request_seed: seed of the per-request seeds (None: the engine's own generator, as in verl without full
            determinism).
    """

    def __init__(
        self,
        server: Any,
        tokenizer: Any,
        search: Callable[[str, str], Any],
        reward_fn: Callable[..., Any],
        settings: EvalSettings,
        request_seed: int | None = None,
    ):
        self.server, self.tokenizer, self.search, self.reward_fn = server, tokenizer, search, reward_fn
        self.settings, self.request_seed = settings, request_seed

    def prompt_ids(self, row: dict[str, Any]) -> list[int]:
        """The row's chat prompt tokenised as verl's agent loop does (chat template, generation prompt)."""
        from verl.utils import normalize_token_ids
        from verl.utils.tokenizer.chat_template import apply_chat_template

        messages = [dict(m) for m in row["prompt"]]
        ids = apply_chat_template(
            self.tokenizer, messages, tokenize=True, add_generation_prompt=True, **self.settings.chat_template_kwargs
        )
        return list(normalize_token_ids(ids))

    def new_tree(self, row: dict[str, Any], uid: str) -> RolloutTree:
        return RolloutTree(self.prompt_ids(row), self.settings.max_actions, uid=uid)

    def env(self, row: dict[str, Any], temperature: float, uid: str):
        """The agent loop's `SearchEnvironment` for this row, sampling at `temperature` (0 = greedy)."""
        from recipe.carl.agent_loop import SearchEnvironment

        s = self.settings
        params = dataclasses.replace(s, temperature=temperature, samples=1).sampling_params()
        return SearchEnvironment(
            generate=self.server.generate,
            tokenizer=self.tokenizer,
            search=self.search,
            reward_fn=self.reward_fn,
            sampling_params=params,
            request_id=uid,
            data_source=row["data_source"],
            ground_truth=row["reward_model"]["ground_truth"],
            extra_info=row.get("extra_info"),
            max_action_tokens=s.max_action_tokens,
            response_length=s.response_length,
            invalid_action=s.invalid_action,
            thinking=s.thinking,
            seed=self.request_seed if temperature > 0 else None,
        )

    async def rollout(self, row: dict[str, Any], temperature: float, uid: str) -> tuple[RolloutTree, int | None, dict]:
        """One trajectory; returns the tree, its leaf and the leaf's reward breakdown (`score`, `em`, `f1`, ...)."""
        tree, env = self.new_tree(row, uid), self.env(row, temperature, uid)
        try:
            if len(tree.prompt_ids) > self.settings.prompt_length:  # as the agent loop: no left-truncated prompt
                tree.terminate(tree.root.id, "prompt_too_long")
                tree.set_reward(tree.root.id, await env.score(tree, tree.root.id))
                leaf = tree.root.id
            else:
                leaf = await rollout_from(tree, 0, env)
        finally:
            release = getattr(self.search, "release", None)
            if callable(release):
                release(uid)
        return tree, leaf, env.leaf_info.get(leaf, {}) if leaf is not None else {}

    def trajectory_record(self, tree: RolloutTree, leaf: int, breakdown: dict, gold: list[str] | None) -> dict:
        """What one trajectory did: its actions (text, query, observation), prediction, finish reason, scores."""
        from recipe.carl.search.reward import exact_match, extract_answer, f1_score, format_score

        actions = []
        for v in tree.path(leaf)[1:]:
            action = tree.nodes[v].action
            obs = self.tokenizer.decode(action.observation_ids) if action.observation_ids else None
            entry = {"kind": action.info.get("kind"), "text": action.info.get("text"), "tokens": len(action.token_ids)}
            entry.update({k: action.info[k] for k in ("query", "reason", "error") if k in action.info})
            entry["observation"] = obs
            actions.append(entry)
        solution = self.tokenizer.decode(tree.prefix_ids(leaf)[len(tree.prompt_ids) :], skip_special_tokens=True)
        prediction = extract_answer(solution)
        em = f1 = float("nan")
        if gold is not None:
            em = exact_match(prediction, gold) if prediction is not None else 0.0
            f1 = f1_score(prediction, gold) if prediction is not None else 0.0
        return {
            "prediction": prediction,
            "finish_reason": tree.nodes[leaf].finish_reason,
            "reward": tree.nodes[leaf].reward,
            "em": em,
            "f1": f1,
            "format": format_score(solution),
            "num_actions": len(actions),
            "searches": int(breakdown.get("search_calls", 0)),
            "search_errors": int(breakdown.get("search_errors", 0)),
            "generated_tokens": sum(a["tokens"] for a in actions),
            "actions": actions,
            "reward_info": breakdown,
        }

    async def evaluate_rows(self, rows: list[dict[str, Any]], progress: Any = None) -> list[dict[str, Any]]:
        """One record per row: the question, its gold answers, and `settings.samples` trajectories."""
        s = self.settings
        limit = asyncio.Semaphore(s.concurrency)

        async def one(i: int, j: int) -> dict:
            async with limit:
                uid = f"eval{i}" if s.samples == 1 else f"eval{i}.{j}"
                tree, leaf, breakdown = await self.rollout(rows[i], s.temperature, uid)
            if progress is not None:
                progress.update(1)
            record = self.trajectory_record(tree, leaf, breakdown, gold_answers(rows[i]))
            return {"sample": j, **record}

        jobs = [one(i, j) for i in range(len(rows)) for j in range(s.samples)]
        done = await asyncio.gather(*jobs)
        records = []
        for i, row in enumerate(rows):
            samples = done[i * s.samples : (i + 1) * s.samples]
            extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
            records.append(
                {
                    "data_source": row["data_source"],
                    "file": row.get("_file"),
                    "row": row.get("_row", i),
                    "index": extra.get("index"),
                    "question": question_text(row),
                    "gold": gold_answers(row),
                    **{k: _mean([t[k] for t in samples]) for k in COMPARED},
                    "samples": samples,
                }
            )
        return records


def _mean(values: Sequence[float | None]) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else float("nan")


# ---------------------------------------------------------------------------------------------------- the table
def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One data set's row of the table: per-question means (each question's samples averaged first)."""
    trajectories = [t for r in records for t in r["samples"]]
    n_traj = max(len(trajectories), 1)
    samples = len(records[0]["samples"]) if records else 0
    reasons = Counter(t["finish_reason"] or "none" for t in trajectories)
    searches = sum(t["searches"] for t in trajectories)
    errors = sum(t["search_errors"] for t in trajectories)
    table = {
        "questions": len(records),
        "samples": samples,
        **{k: _mean([r[k] for r in records]) for k in COMPARED},
        "actions_per_question": sum(t["num_actions"] for t in trajectories) / n_traj,
        "searches_per_question": searches / n_traj,
        "generated_tokens_per_question": sum(t["generated_tokens"] for t in trajectories) / n_traj,
        "finish_reasons": {k: v / n_traj for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))},
        "search_errors": errors,
        "search_error_rate": errors / searches if searches else 0.0,
    }
    if samples > 1:
        table["em_pass_at_k"] = _mean([max(t["em"] for t in r["samples"]) for r in records])
    return table


def diagnose(table: dict[str, Any]) -> list[str]:
    """Plain-language hints for a table whose numbers have an obvious cause."""
    notes = []
    reasons = table["finish_reasons"]
    invalid = {k: v for k, v in reasons.items() if k.startswith("invalid")}
    if sum(invalid.values()) > 0.5:
        top = max(invalid, key=invalid.get)
        notes.append(
            f"{sum(invalid.values()):.0%} of trajectories ended on a malformed turn (most: {top}): the model does not "
            "follow the tag protocol of the prompt (<search> query </search>, <answer> answer </answer>); look at the "
            "actions in the JSON lines, or try --invalid-action feedback."
        )
    if reasons.get("action_too_long", 0) > 0.2:
        notes.append(f"{reasons['action_too_long']:.0%} of trajectories hit --max-action-tokens in one turn.")
    if reasons.get("context_overflow", 0) > 0.2:
        notes.append(f"{reasons['context_overflow']:.0%} ran out of --response-length.")
    if reasons.get("prompt_too_long", 0) > 0:
        notes.append(f"{reasons['prompt_too_long']:.0%} of prompts are longer than --prompt-length.")
    if table["search_errors"]:
        notes.append(f"{table['search_errors']} searches failed (ended as tool_error): check the retriever's log.")
    if table["format"] == 0 and not notes:
        notes.append("no trajectory gave a well-formed final answer; see finish_reason and actions in the JSON lines.")
    return notes


def paired_difference(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """Mean of a - b over paired questions with a percentile paired-bootstrap interval (scipy.stats.bootstrap).

    Resampling questions with replacement and taking mean(a) - mean(b) on the same draw is the bootstrap of the mean
    of the per-question differences, which is what is computed. Questions where either value is NaN are dropped.
    """
    from scipy.stats import bootstrap

    pairs = [(x, y) for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    d = np.array([x - y for x, y in pairs], dtype=float)
    if len(d) == 0:
        return {"diff": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    mean = float(d.mean())
    if len(d) < 2 or np.all(d == d[0]):  # no spread: every resample has the same mean
        return {"diff": mean, "low": mean, "high": mean, "n": len(d)}
    result = bootstrap(
        (d,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return {"diff": mean, "low": float(low), "high": float(high), "n": len(d)}


def compare(model: dict[str, list[dict]], baseline: dict[str, list[dict]], seed: int = 0) -> dict[str, Any]:
    """Per data set and metric: both means, the difference and its paired interval."""
    out: dict[str, Any] = {}
    for source, records in model.items():
        base = {(r["file"], r["row"]): r for r in baseline.get(source, [])}
        paired = [(r, base[(r["file"], r["row"])]) for r in records if (r["file"], r["row"]) in base]
        out[source] = {
            metric: {
                "model": _mean([r[metric] for r, _ in paired]),
                "baseline": _mean([b[metric] for _, b in paired]),
                **paired_difference([r[metric] for r, _ in paired], [b[metric] for _, b in paired], seed=seed),
            }
            for metric in COMPARED
        }
    return out


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def markdown(results: dict[str, Any]) -> str:
    """The tables of `results.json` as markdown."""
    lines = [f"# Evaluation ({results['settings_summary']})", ""]
    for label, info in results["models"].items():
        lines += [f"## {label}", "", f"`{info['path']}` ({info['engine']} engine)", ""]
        k = results["settings"]["samples"]
        head = "| data set | questions | EM % | F1 % | format % | reward | actions/q | searches/q | tokens/q |"
        head += " search errors | finish reasons |"
        if k > 1:
            head = head.replace("| EM % |", f"| EM % (mean@{k}) | EM pass@{k} % |")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for source, t in info["tables"].items():
            reasons = ", ".join(f"{r} {100 * v:.0f}%" for r, v in t["finish_reasons"].items())
            em = f"{_pct(t['em'])} | {_pct(t['em_pass_at_k'])}" if k > 1 else _pct(t["em"])
            errors = f"{t['search_errors']} ({100 * t['search_error_rate']:.1f}%)"
            lines.append(
                f"| {source} | {t['questions']} | {em} | {_pct(t['f1'])} | {_pct(t['format'])} | {t['reward']:.3f} | "
                f"{t['actions_per_question']:.2f} | {t['searches_per_question']:.2f} | "
                f"{t['generated_tokens_per_question']:.0f} | {errors} | {reasons} |"
            )
        for source, notes in info["notes"].items():
            lines += [f"- {source}: {note}" for note in notes]
        lines.append("")
    if results.get("comparison"):
        a, b = list(results["models"])
        lines += [
            f"## {a} vs {b}",
            "",
            "Difference model − baseline over the same questions, with a 95 % paired bootstrap interval "
            "(10,000 resamples of the questions; percentages for EM, F1 and format).",
            "",
            f"| data set | metric | {a} | {b} | difference | 95 % interval |",
            "|---|---|---|---|---|---|",
        ]
        for source, metrics in results["comparison"].items():
            for metric, c in metrics.items():
                f = (lambda x: f"{x:+.3f}") if metric == "reward" else (lambda x: f"{100 * x:+.1f}")
                g = (lambda x: f"{x:.3f}") if metric == "reward" else _pct
                lines.append(
                    f"| {source} | {metric} | {g(c['model'])} | {g(c['baseline'])} | {f(c['diff'])} | "
                    f"[{f(c['low'])}, {f(c['high'])}] |"
                )
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- search and reward
def check_retriever(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """`GET /health` of the retriever behind `url`.

    Raises:
        EvalError: naming the URL and how to start or point at a retriever.
    """
    import httpx

    health = str(httpx.URL(url).copy_with(path="/health", query=None))
    fix = (
        "start one with CORPUS=<corpus.jsonl> bash scripts/launch_retriever.sh, or point at yours with "
        "--retriever-url / RETRIEVER_URL"
    )
    from recipe.carl.search.client import RETRIEVER_WAIT_ENV, retriever_wait_s, until_it_answers

    try:
        wait_s = retriever_wait_s()
    except ValueError as error:
        raise EvalError(str(error)) from None

    def get() -> dict[str, Any]:
        response = httpx.get(health, timeout=timeout)
        response.raise_for_status()
        return response.json()

    try:
        return until_it_answers(get, url, wait_s, lambda message: print(message, file=sys.stderr, flush=True))
    except (httpx.HTTPError, ValueError) as error:
        fix += f"; {RETRIEVER_WAIT_ENV}=600 waits up to 600 s for one that is still loading its index"
        raise EvalError(f"retriever {url}: GET {health} failed ({type(error).__name__}: {error}); {fix}.") from None


def make_search(url: str, topk: int, timeout: float = 30.0, max_retries: int = 2):
    """The recipe's search tool on `url`, as the agent loop calls it (`search(query, tree_id)`, `.release`)."""
    from recipe.carl.agent_loop import ToolSearcher
    from recipe.carl.search.search_tool import CarlSearchTool

    tool = CarlSearchTool(
        {"type": "native", "retrieval_service_url": url, "topk": topk, "timeout": timeout, "max_retries": max_retries}
    )
    return ToolSearcher(tool)


def load_reward(path: str | None, name: str | None, kwargs: dict[str, Any] | None) -> Callable[..., Any]:
    """The reward: the recipe's `compute_score`, or a custom one loaded as verl loads it.

    Raises:
        EvalError: a missing file or function, naming it.
    """
    if not path:
        from functools import partial

        from recipe.carl.search.reward import compute_score

        return partial(compute_score, **(kwargs or {}))
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    if not Path(path).is_file():
        raise EvalError(f"--reward-path {path}: no such file (verl's reward.custom_reward_function.path).")
    config = OmegaConf.create(
        {"reward": {"custom_reward_function": {"path": path, "name": name or "compute_score", "reward_kwargs": kwargs}}}
    )
    try:
        return get_custom_reward_fn(config)
    except (AttributeError, ImportError, RuntimeError, FileNotFoundError) as error:
        raise EvalError(f"--reward-path {path} --reward-name {name or 'compute_score'}: {error}") from error


# ----------------------------------------------------------------------------------------------------- the run
async def evaluate_model(
    model_dir: Path,
    datasets: dict[str, list[dict[str, Any]]],
    settings: EvalSettings,
    engine: str,
    search: Any,
    reward_fn: Callable[..., Any],
    engine_options: dict[str, Any] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every data set's question records for one model (the engine is started here and shut down after)."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    options = dict(engine_options or {})
    if engine == "vllm":
        server = await VLLMEngine.start(model_dir, tokenizer, settings, **options)
    else:
        server = HFEngine(model_dir, tokenizer, settings, dtype=options.get("dtype", "auto"))
    evaluator = Evaluator(server, tokenizer, search, reward_fn, settings, request_seed=settings.seed)
    out = {}
    try:
        for source, rows in datasets.items():
            with tqdm(total=len(rows) * settings.samples, desc=source, unit="traj", file=sys.stderr) as bar:
                out[source] = await evaluator.evaluate_rows(rows, progress=bar)
    finally:
        await server.close()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole evaluation (see `main`); returns `results.json`'s content."""
    settings = EvalSettings(
        max_actions=args.max_actions,
        max_action_tokens=args.max_action_tokens,
        prompt_length=args.prompt_length,
        response_length=args.response_length,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        samples=args.samples,
        seed=args.seed,
        invalid_action=args.invalid_action,
        thinking=args.thinking,
        chat_template_kwargs=_json_arg(args.chat_template_kwargs, "--chat-template-kwargs"),
        concurrency=args.concurrency,
    )
    out = Path(args.out)
    if (out / "results.json").exists() and not args.overwrite:
        raise EvalError(f"--out {out}: already holds results.json; pass --overwrite, or choose another --out.")
    # The cheap checks first (inputs, engine, data, retriever, reward), then the slow steps (download, merge).
    given = {"model": (args.model, args.merge_dir), "baseline": (args.baseline, args.baseline_merge_dir)}
    given = {role: spec for role, spec in given.items() if spec[0]}
    for role, (path, merge_dir) in given.items():
        resolve_model(path, merge_dir, f"--{role}", fetch=False)
    engine = choose_engine(args.engine)
    datasets = load_datasets(args.data, args.limit)
    health = check_retriever(args.retriever_url)
    print(f"retriever {args.retriever_url}: {json.dumps(health)}", file=sys.stderr)
    reward_fn = load_reward(args.reward_path, args.reward_name, _json_arg(args.reward_kwargs, "--reward-kwargs"))
    models = {role: resolve_model(path, merge_dir, f"--{role}") for role, (path, merge_dir) in given.items()}
    options: dict[str, Any] = {"dtype": args.dtype}
    if engine == "vllm":
        options.update(
            gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=args.tensor_parallel_size,
            engine_kwargs=_json_arg(args.vllm_kwargs, "--vllm-kwargs"),
        )

    labels = {"model": args.label or model_label(args.model)}
    if args.baseline:
        labels["baseline"] = args.baseline_label or model_label(args.baseline)
        if labels["baseline"] == labels["model"]:
            labels["baseline"] += " (baseline)"
    records: dict[str, dict[str, list[dict]]] = {}
    results: dict[str, Any] = {"models": {}, "settings": dataclasses.asdict(settings)}
    results["settings"].update(
        engine=engine, retriever_url=args.retriever_url, topk=args.topk, data=[str(f) for f in args.data]
    )
    results["settings_summary"] = (
        f"{'greedy' if settings.temperature == 0 else f'T={settings.temperature}, {settings.samples} sample(s)'}, "
        f"T_max {settings.max_actions}, {settings.max_action_tokens} tokens/turn, top-{args.topk}, {engine} engine"
    )
    for role, folder in models.items():
        started = time.perf_counter()
        search = make_search(args.retriever_url, args.topk)
        records[role] = asyncio.run(
            evaluate_model(folder, datasets, settings, engine, search, reward_fn, engine_options=options)
        )
        label = labels[role]
        tables = {source: summarize(recs) for source, recs in records[role].items()}
        results["models"][label] = {
            "role": role,
            "path": str(getattr(args, role)),
            "weights": str(folder),
            "engine": engine,
            "wall_s": time.perf_counter() - started,
            "tables": tables,
            "notes": {source: diagnose(t) for source, t in tables.items() if diagnose(t)},
        }
        for source, recs in records[role].items():
            write_jsonl(out / _safe(label) / f"{_safe(source)}.jsonl", recs)
    if args.baseline:
        results["comparison"] = compare(records["model"], records["baseline"], seed=args.seed)
    results["command"] = shlex.join([sys.executable, "-m", "recipe.carl.evaluate", *args.argv])
    write_json(out / "results.json", results)
    text = markdown(results)
    write_text(out / "results.md", text + "\n")
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and the per-question JSON lines under {out}")
    return results


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def _json_arg(text: str | None, flag: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise EvalError(f"{flag} {text!r}: not JSON ({error.msg}); e.g. {flag} '{{\"key\": 1}}'.") from error
    if not isinstance(value, dict):
        raise EvalError(f"{flag} {text!r}: must be a JSON object.")
    return value


def parser() -> argparse.ArgumentParser:
    s = EvalSettings()
    p = argparse.ArgumentParser(
        prog="python -m recipe.carl.evaluate",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="Hugging Face model folder, or a verl checkpoint (global_step_N/actor)"
    )
    p.add_argument("--baseline", help="a second model (same forms), compared with --model question by question")
    p.add_argument("--label", help="name of --model in the tables (default: its folder)")
    p.add_argument("--baseline-label", help="name of --baseline in the tables")
    p.add_argument("--data", nargs="+", required=True, help="test parquet file(s) in verl's RLHFDataset schema")
    p.add_argument("--out", required=True, help="output folder (results.md, results.json, per-question JSON lines)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each data set (default: all)")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"], help="auto: vLLM on a GPU, else hf")
    p.add_argument(
        "--retriever-url",
        default=os.environ.get("RETRIEVER_URL") or DEFAULT_RETRIEVER_URL,
        help=f"the retriever's /retrieve endpoint (default: $RETRIEVER_URL, else {DEFAULT_RETRIEVER_URL})",
    )
    p.add_argument("--topk", type=int, default=3, help="documents per search (default 3; the demo uses 2)")
    p.add_argument("--max-actions", type=int, default=s.max_actions, help=f"T_max (default {s.max_actions})")
    p.add_argument(
        "--max-action-tokens", type=int, default=s.max_action_tokens, help="tokens per turn (default %(default)s)"
    )
    p.add_argument("--prompt-length", type=int, default=s.prompt_length, help="prompt budget (default %(default)s)")
    p.add_argument(
        "--response-length", type=int, default=s.response_length, help="trajectory budget (default %(default)s)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--samples", type=int, default=1, help="trajectories per question (needs --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled requests and of the bootstrap")
    p.add_argument("--invalid-action", default="end", choices=["end", "feedback"], help="as algorithm.carl")
    p.add_argument("--thinking", action="store_true", help="as algorithm.carl.thinking (Qwen3)")
    p.add_argument("--chat-template-kwargs", help="JSON, e.g. '{\"enable_thinking\": false}'")
    p.add_argument(
        "--concurrency", type=int, default=s.concurrency, help="trajectories in flight (default %(default)s)"
    )
    p.add_argument("--reward-path", help="a custom reward file (verl's reward.custom_reward_function.path)")
    p.add_argument("--reward-name", help="its function (default compute_score)")
    p.add_argument("--reward-kwargs", help="JSON keyword arguments of the reward (reward_kwargs)")
    p.add_argument("--merge-dir", help="where to merge an FSDP --model checkpoint (default <actor>/merged_hf)")
    p.add_argument("--baseline-merge-dir", help="the same for --baseline")
    p.add_argument("--dtype", default="auto", help="model dtype (auto: bf16 on GPU; always fp32 with hf on CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM (default %(default)s)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM (default %(default)s)")
    p.add_argument("--vllm-kwargs", help="JSON of extra vLLM engine arguments, e.g. '{\"enforce_eager\": true}'")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"error: --limit {args.limit}: must be >= 1 (omit it for all questions).")
    if args.topk < 1:
        raise SystemExit(f"error: --topk {args.topk}: must be >= 1.")
    try:
        return run(args)
    except EvalError as error:
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: no results written") from None


if __name__ == "__main__":
    main()
