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
  every action's text and observation, the finish reason and the reward. Each line is appended as soon as its
  question is done, so a crash loses only the questions in flight: the same command again (same `--out`, same
  settings, recorded in `evaluation.json`) evaluates only the questions still missing; `--overwrite` starts over.
  The tables give each data set and the macro average over the data sets (the number papers report);
  `python -m recipe.carl.evaluate.study` compares saved per-question files of several models and RL seeds.

A verl checkpoint is rolled out as its training run rolled out: the CARL trainer records the run's agent settings
beside every checkpoint (`global_step_N/carl_run_config.json`, `recipe.carl.run_record`): T_max, the turn and
trajectory budgets, prompt length, thinking, the invalid-action rule, the search tool's top-k and the chat-template
arguments. Each is taken from there unless its flag is given; a flag that differs from the record is printed (one
line each). With `--baseline`, both models use the settings of `--model`'s run (else `--baseline`'s). A model
folder or hub id, and a checkpoint whose run recorded nothing, get the defaults, which suit real models (Qwen2.5-7B
as `scripts/run_carl_qwen7b.sh` trains it): per-turn budget 512 tokens, T_max 32, top-3 documents, prompt 2048 and
trajectory 12288 tokens, no thinking (Qwen3 as `scripts/run_carl_qwen3_4b.sh` trains it: `PROFILE=qwen3 bash
scripts/eval.sh`). The SynthHop demo passes its own (`recipe.carl.tiny.local_agent`: 32-token turns, top-2, T_max 6,
its corpus in process).

Why a paired bootstrap: the two models answer the same questions, so the per-question differences carry the
comparison and the questions' difficulty cancels; EM differences take only the values -1, 0, 1 (mostly 0), which a
bootstrap over questions handles without assuming normality, for any metric (with `--samples k` a question's value is
its mean over the k samples, so questions stay the resampled unit).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from omegaconf import OmegaConf

from recipe.carl.evaluate.data import load_datasets
from recipe.carl.evaluate.engines import choose_engine
from recipe.carl.evaluate.judge import Judge, JudgeError, add_lasj
from recipe.carl.evaluate.models import is_unrecorded_checkpoint, model_label, recorded_run, resolve_model
from recipe.carl.evaluate.report import compare, compare_macro, diagnose, macro_average, markdown, summarize
from recipe.carl.evaluate.runner import evaluate_model
from recipe.carl.evaluate.settings import RECORDED_FLAGS, EvalError, EvalSettings, Override, with_recorded
from recipe.carl.io import write_json, write_jsonl, write_text
from recipe.carl.run_record import RUN_RECORD
from recipe.carl.search.client import RETRIEVER_WAIT_ENV, retriever_wait_s, until_it_answers
from recipe.carl.search.reward import compute_score

DEFAULT_RETRIEVER_URL = "http://127.0.0.1:8000/retrieve"


# --------------------------------------------------------------------------------------------- search and reward
def check_retriever(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """`GET /health` of the retriever behind `url`.

    Raises:
        EvalError: naming the URL and how to start or point at a retriever.
    """
    health = str(httpx.URL(url).copy_with(path="/health", query=None))
    fix = (
        "start one with CORPUS=<corpus.jsonl> bash scripts/launch_retriever.sh, or point at yours with "
        "--retriever-url / RETRIEVER_URL"
    )
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


def make_search(
    url: str,
    topk: int,
    timeout: float = 30.0,
    max_retries: int = 2,
    show_ids: bool = False,
    snippet_words: int | None = None,
):
    """The recipe's search tool on `url`, as the agent loop calls it (`search(query, tree_id)`, `.release`); the
    paper's action space shows each result's id (`show_ids`)."""
    # deferred: both import verl, which `-h` and the input checks do without
    from recipe.carl.agent_loop import ToolSearcher
    from recipe.carl.search.search_tool import CarlSearchTool

    config = {"type": "native", "retrieval_service_url": url, "topk": topk, "timeout": timeout}
    config.update(max_retries=max_retries, show_ids=show_ids, snippet_words=snippet_words)
    return ToolSearcher(CarlSearchTool(config))


def make_access(url: str, timeout: float = 30.0, max_retries: int = 2):
    """The recipe's access tool on the same server (`/access`), as the agent loop calls it (`access(id, tree_id)`)."""
    # deferred: both import verl, which `-h` and the input checks do without
    from recipe.carl.agent_loop import ToolAccessor
    from recipe.carl.search.search_tool import CarlAccessTool

    config = {"type": "native", "retrieval_service_url": url, "timeout": timeout, "max_retries": max_retries}
    return ToolAccessor(CarlAccessTool(config))


def load_reward(path: str | None, name: str | None, kwargs: dict[str, Any] | None) -> Callable[..., Any]:
    """The reward: the recipe's `compute_score`, or a custom one loaded as verl loads it.

    Raises:
        EvalError: a missing file or function, naming it.
    """
    if not path:
        return partial(compute_score, **(kwargs or {}))
    from verl.trainer.ppo.reward import get_custom_reward_fn  # deferred: verl is heavy

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
def training_settings(args: argparse.Namespace) -> tuple[dict[str, Any], list[Override], Path | None]:
    """The settings the training run fixes (`RECORDED_FLAGS`): a given flag wins, else the value recorded by the run
    that wrote `--model` (else `--baseline`), else the default. Prints what it took from where, one line per flag
    that overrides the record, and a note for a checkpoint whose run recorded nothing.

    Returns:
        The values, the overrides, and the record they came from (None: no record).
    """
    given = {key: getattr(args, key) for key in RECORDED_FLAGS}
    given["chat_template_kwargs"] = (
        None if args.chat_template_kwargs is None else _json_arg(args.chat_template_kwargs, "--chat-template-kwargs")
    )
    runs = {role: recorded_run(getattr(args, role), f"--{role}") for role in ("model", "baseline")}
    role = next((r for r, (path, _) in runs.items() if path is not None), None)
    path, recorded = runs[role] if role else (None, {})
    values, overrides = with_recorded(given, recorded)
    say = partial(print, file=sys.stderr, flush=True)
    if path is not None:
        listed = ", ".join(f"{key}={value!r}" for key, value in recorded.items())
        say(f"settings of the training run of --{role} (recorded in {path}): {listed}")
    for override in overrides:
        say(override.line())
    if role == "model" and runs["baseline"][0] is not None:
        for key, value in runs["baseline"][1].items():
            if key in values and values[key] != value:
                say(f"note: --baseline's training run recorded {key}={value!r}; both models use {values[key]!r}")
    unrecorded = [name for name in ("model", "baseline") if is_unrecorded_checkpoint(getattr(args, name))]
    for name in unrecorded if path is None else []:
        say(
            f"note: --{name} {getattr(args, name)} is a verl checkpoint whose run recorded no {RUN_RECORD}: "
            f"unless flags say otherwise, it is evaluated with the defaults ({', '.join(RECORDED_FLAGS.values())}"
            " as scripts/run_carl_qwen7b.sh trains); give the training run's values if they differ."
        )
    return values, overrides, path


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole evaluation (see `main`); returns `results.json`'s content."""
    fixed, overrides, record_path = training_settings(args)
    settings = EvalSettings(
        **fixed,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        samples=args.samples,
        seed=args.seed,
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
    if settings.action_space == "paper" and not health.get("pages"):
        raise EvalError(
            f"--action-space paper opens pages, but the retriever at {args.retriever_url} serves none: restart it "
            "with --pages (python -m recipe.carl.search.server --corpus ... --pages)."
        )
    reward_fn = load_reward(args.reward_path, args.reward_name, _json_arg(args.reward_kwargs, "--reward-kwargs"))
    models = {role: resolve_model(path, merge_dir, f"--{role}") for role, (path, merge_dir) in given.items()}
    options: dict[str, Any] = {"dtype": args.dtype}
    if engine == "vllm":
        options.update(
            gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=args.tensor_parallel_size,
            engine_kwargs=_json_arg(args.vllm_kwargs, "--vllm-kwargs"),
        )

    judge = Judge(args.judge_url, args.judge_model or "", key_env=args.judge_key_env) if args.judge_url else None
    labels = {"model": args.label or model_label(args.model)}
    if args.baseline:
        labels["baseline"] = args.baseline_label or model_label(args.baseline)
        if labels["baseline"] == labels["model"]:
            labels["baseline"] += " (baseline)"
    records: dict[str, dict[str, list[dict]]] = {}
    results: dict[str, Any] = {"models": {}, "settings": dataclasses.asdict(settings)}
    results["settings"].update(
        engine=engine,
        retriever_url=args.retriever_url,
        data=[str(f) for f in args.data],
        recorded_run=str(record_path) if record_path else None,
        overrides={o.key: {"recorded": o.recorded, "used": o.used} for o in overrides},
    )
    done = start_or_resume(out, results["settings"], labels, given, args)
    results["settings_summary"] = (
        f"{'greedy' if settings.temperature == 0 else f'T={settings.temperature}, {settings.samples} sample(s)'}, "
        f"T_max {settings.max_actions}, {settings.max_action_tokens} tokens/turn, top-{settings.topk}, "
        f"{'search/access/read/answer, ' if settings.action_space == 'paper' else ''}"
        f"{'thinking, ' if settings.thinking else ''}{engine} engine"
    )
    for role, folder in models.items():
        started = time.perf_counter()
        paper = settings.action_space == "paper"
        search = make_search(args.retriever_url, settings.topk, show_ids=paper, snippet_words=settings.snippet_words)
        access = make_access(args.retriever_url) if paper else None
        label = labels[role]
        with QuestionFiles(out / safe_name(label)) as sink:
            records[role] = asyncio.run(
                evaluate_model(
                    folder,
                    datasets,
                    settings,
                    engine,
                    search,
                    reward_fn,
                    options,
                    done.get(label),
                    sink.append,
                    access=access,
                )  # fmt: skip
            )
        if judge is not None:  # LasJ beside EM and F1 (recipe.carl.evaluate.judge)
            for recs in records[role].values():
                try:
                    asyncio.run(add_lasj(judge, recs))
                except JudgeError as error:
                    raise EvalError(str(error)) from None
        tables = {source: summarize(recs) for source, recs in records[role].items()}
        results["models"][label] = {
            "role": role,
            "path": str(getattr(args, role)),
            "weights": str(folder),
            "engine": engine,
            "wall_s": time.perf_counter() - started,
            "tables": tables,
            "macro": macro_average(tables),
            "notes": {source: diagnose(t) for source, t in tables.items() if diagnose(t)},
        }
        for source, recs in records[role].items():  # in the data's order (they were appended as they finished)
            write_jsonl(out / safe_name(label) / f"{safe_name(source)}.jsonl", recs)
    if args.baseline:
        results["comparison"] = compare(records["model"], records["baseline"], seed=args.seed)
        if len(datasets) > 1:
            results["comparison_macro"] = compare_macro(records["model"], records["baseline"], seed=args.seed)
    results["command"] = shlex.join([sys.executable, "-m", "recipe.carl.evaluate", *args.argv])
    write_json(out / "results.json", results)
    text = markdown(results)
    write_text(out / "results.md", text + "\n")
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and the per-question JSON lines under {out}")
    return results


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


PROGRESS = "evaluation.json"
"""What an evaluation in `--out` was started with; a run with the same content resumes it."""


class QuestionFiles:
    """Appends each finished question's record to `<folder>/<data_source>.jsonl` at once (one line, flushed)."""

    def __init__(self, folder: Path):
        self.folder, self.files = folder, {}

    def append(self, source: str, record: dict[str, Any]) -> None:
        if source not in self.files:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.files[source] = open(self.folder / f"{safe_name(source)}.jsonl", "a", encoding="utf-8")
        self.files[source].write(json.dumps(record) + "\n")
        self.files[source].flush()

    def __enter__(self) -> QuestionFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.files.values():
            f.close()


def read_question_file(path: Path) -> list[dict[str, Any]]:
    """The records of a per-question file; a last line cut off by a crash is dropped (that question runs again)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def start_or_resume(
    out: Path, settings: dict[str, Any], labels: dict[str, str], given: dict[str, Any], args: argparse.Namespace
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Records what this evaluation runs (`evaluation.json`) and returns the questions a crashed run with the same
    content already wrote, by label and data set. `--overwrite` deletes the earlier per-question files.

    Raises:
        EvalError: `--out` holds a partial evaluation of something else, naming what differs.
    """
    job = {
        "settings": settings,
        "limit": args.limit,
        "models": {role: {"path": str(spec[0]), "label": labels[role]} for role, spec in given.items()},
    }
    progress = out / PROGRESS
    folders = [out / safe_name(label) for label in labels.values()]
    if args.overwrite:
        for path in [out / "results.json", progress, *(f for folder in folders for f in folder.glob("*.jsonl"))]:
            path.unlink(missing_ok=True)
    elif progress.exists():
        before = json.loads(progress.read_text())
        if before != job:
            differ = sorted({*_differences(before, job)})
            raise EvalError(
                f"--out {out} holds a partial evaluation of something else (it differs in: {', '.join(differ)}); "
                "pass --overwrite to start it again, or choose another --out."
            )
    elif any(any(folder.glob("*.jsonl")) for folder in folders):
        raise EvalError(f"--out {out} holds per-question files but no {PROGRESS}; pass --overwrite, or another --out.")
    write_json(progress, job)
    done: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for label, folder in zip(labels.values(), folders, strict=True):
        for path in sorted(folder.glob("*.jsonl")):
            kept = read_question_file(path)
            write_jsonl(path, kept)  # without a cut-off last line, which the next append would extend
            if kept:
                done.setdefault(label, {})[kept[0]["data_source"]] = kept
    count = sum(len(r) for sources in done.values() for r in sources.values())
    if count:
        print(f"resuming {out}: {count} questions already evaluated are kept", file=sys.stderr, flush=True)
    return done


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in {*a, *b} for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".") or "(all)"]


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
    # The settings a training run fixes: None = not given (a checkpoint's recorded value, else the default).
    recorded = "default: the training run's, recorded beside a checkpoint; else"
    p.add_argument("--topk", type=int, help=f"documents per search ({recorded} {s.topk}; the demo uses 2)")
    p.add_argument("--max-actions", type=int, help=f"T_max ({recorded} {s.max_actions})")
    p.add_argument("--max-action-tokens", type=int, help=f"tokens per turn ({recorded} {s.max_action_tokens})")
    p.add_argument("--prompt-length", type=int, help=f"prompt budget ({recorded} {s.prompt_length})")
    p.add_argument("--response-length", type=int, help=f"trajectory budget ({recorded} {s.response_length})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--samples", type=int, default=1, help="trajectories per question (needs --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled requests and of the bootstrap")
    p.add_argument(
        "--invalid-action", choices=["end", "feedback"], help=f"as algorithm.carl ({recorded} {s.invalid_action})"
    )
    p.add_argument(
        "--thinking",
        action=argparse.BooleanOptionalAction,
        help=f"as algorithm.carl.thinking, for Qwen3 ({recorded} off)",
    )
    p.add_argument(
        "--action-space",
        choices=["search_r1", "paper"],
        help=f"search_r1 (search, answer) or paper (search, access, read, answer) ({recorded} {s.action_space})",
    )
    p.add_argument(
        "--page-chunk-chars", type=int, help=f"paper: characters per part of a page ({recorded} {s.page_chunk_chars})"
    )
    p.add_argument("--snippet-words", type=int, help=f"words of each search result shown ({recorded} all)")
    p.add_argument(
        "--chat-template-kwargs",
        help=f"JSON, e.g. '{{\"enable_thinking\": false}}' (data.apply_chat_template_kwargs; {recorded} none)",
    )
    p.add_argument(
        "--concurrency", type=int, default=s.concurrency, help="trajectories in flight (default %(default)s)"
    )
    p.add_argument(
        "--judge-url",
        help="LasJ: an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8001/v1, a local vllm serve) that judges each "
        "prediction correct or incorrect, reported beside EM and F1 (recipe.carl.evaluate.judge)",
    )
    p.add_argument("--judge-model", help="the model the judge endpoint serves (needed with --judge-url)")
    p.add_argument(
        "--judge-key-env",
        default="OPENAI_API_KEY",
        help="the environment variable holding the judge's API key, if it needs one (default %(default)s)",
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
    if args.judge_url and not args.judge_model:
        raise SystemExit("error: --judge-url needs --judge-model: the model the judge endpoint serves.")
    try:
        return run(args)
    except EvalError as error:
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: no results written") from None
