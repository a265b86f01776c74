"""Start-up checks of a run, in the driver, before Ray or any worker starts (`main_carl` calls `run(config)`).

A GPU cluster run must fail in its first seconds, with a message naming the input and the fix, instead of hours later
inside a worker, or never. `run` does, in this order:

0. **GPU stack** (`check_gpu_stack`): on a machine with an NVIDIA driver, unless `trainer.device=cpu`, the driver must
   be new enough for torch's CUDA build (R580 for PyPI's CUDA 13.0 torch 2.11.0), torch must see the GPUs, and
   flash-attn must import (`recipe.carl.gpu_stack`): verl's default attention `flash_attention_2` needs it, and
   without it verl's log-prob code loops in Python over every token whatever the attention
   (`CARL_ALLOW_NO_FLASH_ATTN=1` accepts that for another attention); otherwise every worker fails on its own, or
   crawls. `CARL_SKIP_GPU_CHECK=1` skips the whole check.
1. **Paths** (`resolve_paths`): every local path a Ray worker opens becomes absolute. verl resolves a relative
   agent-loop or tool yaml against the *worker's* working directory (`verl.utils.import_utils.resolve_config_path`),
   which on another node (or a pre-started Ray cluster) is not the launching directory: `FileNotFoundError` in
   `AgentLoopWorker.__init__`. A required file that exists nowhere stops the run here, naming the key and the path.
2. **Batch** (`check_batch`): under the CARL trainer (`trainer.v1.trainer_mode=carl`, CARL and its baselines),
   `ppo_mini_batch_size` counts questions per optimizer update in every row layout (`recipe.carl.schedule`) and
   must divide `data.train_batch_size`; an old setting in rows (e.g. 256 with 128 questions a step) is refused with
   the sizes that fit. Under verl's own trainer modes, rows per update must divide among the data-parallel ranks, or
   verl stops at its `mini_batch_size % dp == 0` assert on the first update (e.g. 256 rows on 3 nodes x 6 GPUs).
3. **Data** (`check_data`): every row of the local parquet files is validated (unknown `agent_name`, empty question,
   missing ground truth, empty or non-string answers), and validation rows must not grow CARL trees. Bad rows
   stop the run, named by file and row; with `algorithm.carl.bad_rows=skip` the run trains on filtered copies.
4. **Worker environment** (`forward_environment`): verl forwards only a fixed list of environment variables to Ray
   workers (`verl.trainer.constants_ppo`); on another node the tool yaml's `${oc.env:RETRIEVER_URL,...}` would fall
   back to its default, verl's file logger would write somewhere else, wandb would find no API key (the TaskRunner
   starts the loggers) and the Hugging Face hub no token or cache. The driver's values (`FORWARDED_ENV`: the
   retriever, every logger verl's `Tracking` can start, the model hubs) go into
   `ray_kwargs.ray_init.runtime_env.env_vars`; the secret ones (`take_secrets`, last of all) leave the config again,
   `***` in their place, and `main_carl` gives them to `ray.init` alone (`recipe.carl.ray_start`), since verl prints
   its Ray init arguments and the whole config at start-up. The CARL trainer hides any left in its copy of the
   config before verl hands it to the loggers (`hide_secrets`). A
   loopback retriever URL is refused when `trainer.nnodes > 1`; `recipe.carl.cluster` refuses it again inside the
   cluster when its nodes are on several hosts, whatever `trainer.nnodes` says. What the driver sees of the files
   the workers open (`record_driver_view`: sizes, and a probe file in the checkpoint folder) goes along, for
   `recipe.carl.cluster` to compare every node against.
5. **Retriever** (`check_retriever`): every tool with a `retrieval_service_url` must answer `GET /health` (a server
   without `/health`, such as Search-R1's own, must answer a one-query `/retrieve`). The URL is resolved as the
   workers will resolve it: the tool yaml with the forwarded environment. Runs without such a tool skip the check;
   `CARL_SKIP_RETRIEVER_CHECK=1` skips it on purpose (e.g. a driver outside the cluster's network);
   `CARL_RETRIEVER_WAIT_S=600` retries for up to 600 s a retriever that does not answer yet (still loading its index).
6. **Loggers** (`recipe.carl.loggers.check_wandb`): `trainer.logger` with wandb needs credentials (`WANDB_API_KEY`,
   `wandb login`) or `WANDB_MODE=offline`; verl would otherwise fail in the TaskRunner once the models are loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from carl_core import CARLConfigError
from recipe.carl import gpu_stack
from recipe.carl.io import atomic_path, write_jsonl
from recipe.carl.loggers import check_wandb
from recipe.carl.search.client import RETRIEVER_WAIT_ENV, RetrievalClient, retriever_wait_s, until_it_answers
from recipe.carl.settings import AUTO_AGENT, CHAIN_AGENT, ESTIMATOR, TRAINER_MODE, read_settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""Where `recipe/` lives: relative recipe paths (the yaml defaults) are also looked up here."""

AGENT_LOOP_KEY = "actor_rollout_ref.rollout.agent.agent_loop_config_path"
TOOL_KEY = "actor_rollout_ref.rollout.multi_turn.tool_config_path"

#: Files a worker opens: they must exist. verl resolves a relative one against the worker's own working directory.
REQUIRED_FILES = {
    AGENT_LOOP_KEY: "agent-loop yaml",
    TOOL_KEY: "tool yaml",
    "actor_rollout_ref.rollout.multi_turn.function_tool_path": "function-tool file",
    "reward.custom_reward_function.path": "reward function file",
}
#: Keys that may also name something that is not a local file (a hub model id, an hdfs:// path): made absolute only
#: when they exist from the launching directory.
LOCAL_IF_PRESENT = (
    "actor_rollout_ref.model.path",
    "actor_rollout_ref.model.tokenizer_path",
    "data.train_files",
    "data.val_files",
)
#: Output paths: absolute against the launching directory, where a one-node run writes them.
OUTPUT_PATHS = (
    "trainer.default_local_dir",
    "trainer.resume_from_path",
    "trainer.rollout_data_dir",
    "trainer.validation_data_dir",
)

#: Environment variables of the driver that workers read (besides those the tool yaml reads through `oc.env`); a name
#: ending in `_` stands for every variable it begins. The retriever; the loggers verl's `Tracking` can start
#: (`trainer.logger`: file, wandb, vemlp_wandb, mlflow, swanlab, clearml, trackio, tensorboard); the model hubs
#: (Hugging Face, ModelScope); NCCL's settings (`NCCL_SOCKET_IFNAME`, `NCCL_IB_HCA`, ...: on a cluster started with
#: `ray start`, workers would otherwise use each node's own, or none).
FORWARDED_ENV = (
    "RETRIEVER_URL",
    "VERL_FILE_LOGGER_PATH",
    "VERL_FILE_LOGGER_ROOT",
    "WANDB_",
    "VOLC_ACCESS_KEY_ID",
    "VOLC_SECRET_ACCESS_KEY",
    "MLP_TRACKING_REGION",
    "MLFLOW_",
    "SWANLAB_",
    "CLEARML_",
    "TRACKIO_",
    "TENSORBOARD_DIR",
    "HF_",
    "HUGGING_FACE_HUB_TOKEN",
    "TRANSFORMERS_",
    "MODELSCOPE_",
    "VERL_USE_MODELSCOPE",
    "NCCL_",
)
#: Of those, the ones holding a path (made absolute against the launching directory).
PATH_ENV = (
    "VERL_FILE_LOGGER_PATH",
    "VERL_FILE_LOGGER_ROOT",
    "WANDB_DIR",
    "TENSORBOARD_DIR",
    "SWANLAB_LOG_DIR",
    "TRACKIO_DIR",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_DATASETS_CACHE",
    "TRANSFORMERS_CACHE",
    "MODELSCOPE_CACHE",
)
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
"""A forwarded variable whose name holds one of these is a secret: never printed (`take_secrets`), never logged."""
VIEW_ENV = "CARL_DRIVER_VIEW"
"""Worker environment variable with what the driver saw of the files workers open (`record_driver_view`)."""
PROBE_NAME = ".carl_shared_fs_probe"
"""File the driver writes into `trainer.default_local_dir`, for every node to find (`recipe.carl.cluster`)."""
_OC_ENV = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)")

SKIP_RETRIEVER_ENV = "CARL_SKIP_RETRIEVER_CHECK"
SKIP_GPU_ENV = "CARL_SKIP_GPU_CHECK"
HEALTH_TIMEOUT_S = 10.0
MAX_LISTED = 10
"""Bad rows quoted in an error message (the count is always complete)."""


def log(message: str) -> None:
    print(f"[carl preflight] {message}", flush=True)


def run(config: DictConfig) -> dict[str, str]:
    """All start-up checks, in the order of the module docstring; fixes paths and the worker environment in place.

    Returns:
        The secrets for the workers' environment, taken out of the config (`take_secrets`): `main_carl` hands them
        to `ray.init` itself (`recipe.carl.ray_start`), so that verl prints neither.

    Raises:
        CARLConfigError: a path, the batch, the data or the retriever URL, with the fix.
        RetrieverUnavailableError: the retriever does not answer.
    """
    check_gpu_stack(config)
    resolve_paths(config)
    check_batch(config)
    check_data(config)
    forward_environment(config)
    record_driver_view(config)
    check_retriever(config)
    check_wandb(config)
    return take_secrets(config)


# ---- 0. GPU stack -----------------------------------------------------------------------------------------------


def check_gpu_stack(config: DictConfig, stack: gpu_stack.GpuStack | None = None) -> None:
    """Stops the run when this machine's driver, torch or flash-attn cannot run it (module docstring, step 0).

    Args:
        config: the trainer config (`trainer.device`, the model's `attn_implementation`).
        stack: the machine's facts; None probes this machine (tests pass their own).

    Raises:
        CARLConfigError: every problem, each with its fix.
    """
    if str(config.trainer.get("device", "cuda")) == "cpu":
        return
    if os.environ.get(SKIP_GPU_ENV, "") not in ("", "0"):
        log(f"{SKIP_GPU_ENV} is set: the GPU stack is not checked")
        return
    attn = (config.actor_rollout_ref.model.get("override_config") or {}).get(
        "attn_implementation", gpu_stack.FLASH_ATTENTION
    )
    stack = gpu_stack.probe() if stack is None else stack  # imports flash-attn: verl's log-prob kernel needs it too
    found = gpu_stack.problems(stack, attn)
    if found:
        raise CARLConfigError(
            f"this machine cannot start the GPU run ({SKIP_GPU_ENV}=1 skips this check):\n  - " + "\n  - ".join(found)
        )
    if stack.driver is None:
        log("no NVIDIA driver on this machine: the GPU stack is not checked here")
    else:
        log(
            f"GPU stack: driver {stack.driver}, torch {stack.torch} (CUDA {stack.torch_cuda}), {len(stack.gpus)} "
            f"GPU(s), flash-attn {stack.packages.get('flash-attn') or 'not installed'}, attention {attn}"
        )


# ---- 1. paths ---------------------------------------------------------------------------------------------------


def locate(path: str, key: str, what: str, cwd: str | None = None) -> str:
    """The absolute path of a file a worker opens: as given if absolute, else from `cwd`, else from the project root.

    Raises:
        CARLConfigError: naming the key, the path and the folders searched.
    """
    cwd = cwd or os.getcwd()
    candidates = [path] if os.path.isabs(path) else [os.path.join(cwd, path), str(PROJECT_ROOT / path)]
    for candidate in candidates:
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    where = "" if os.path.isabs(path) else f" (looked in {cwd} and {PROJECT_ROOT})"
    raise CARLConfigError(
        f"{key}={path}: the {what} does not exist{where}. Give an existing absolute path, or one relative to the "
        "directory you launch from."
    )


def _set(config: DictConfig, key: str, value: Any) -> None:
    with open_dict(config):
        OmegaConf.update(config, key, value, merge=False)


def _is_local(path: Any) -> bool:
    return isinstance(path, str) and bool(path) and "://" not in path


def resolve_paths(config: DictConfig, cwd: str | None = None) -> None:
    """Makes every worker-read local path of `config` absolute (see the module docstring, step 1).

    Raises:
        CARLConfigError: for a required file (agent-loop or tool yaml, reward file) that exists nowhere.
    """
    cwd = cwd or os.getcwd()
    for key, what in REQUIRED_FILES.items():
        path = OmegaConf.select(config, key, default=None)
        if path:
            _set(config, key, locate(str(path), key, what, cwd))
    for key in LOCAL_IF_PRESENT:
        value = OmegaConf.select(config, key, default=None)
        paths = list(value) if isinstance(value, (list, ListConfig)) else [value]
        fixed = [
            os.path.abspath(os.path.join(cwd, p)) if _is_local(p) and os.path.exists(os.path.join(cwd, p)) else p
            for p in paths
        ]
        if fixed != paths:
            _set(config, key, fixed if isinstance(value, (list, ListConfig)) else fixed[0])
    for key in OUTPUT_PATHS:
        path = OmegaConf.select(config, key, default=None)
        if _is_local(path) and not os.path.isabs(path):
            _set(config, key, os.path.abspath(os.path.join(cwd, path)))


# ---- 2. batch ---------------------------------------------------------------------------------------------------


def data_parallel_size(config: DictConfig) -> int | None:
    """The actor's data-parallel ranks (`world / ulysses` for FSDP, `world / (tp * pp * cp)` for Megatron)."""
    actor = config.actor_rollout_ref.actor
    world = int(config.trainer.nnodes) * int(config.trainer.n_gpus_per_node)
    if actor.strategy in ("fsdp", "fsdp2"):
        return world // int(actor.get("ulysses_sequence_parallel_size", 1) or 1)
    if actor.strategy == "megatron":
        mp = actor.megatron
        return world // (
            int(mp.tensor_model_parallel_size) * int(mp.pipeline_model_parallel_size) * int(mp.context_parallel_size)
        )
    return None


def updates_message(questions_per_update: int, train_batch_size: int) -> str | None:
    """Why `questions_per_update` (`ppo_mini_batch_size` under the CARL trainer) does not split a step of
    `train_batch_size` questions into whole updates, and the nearest sizes that do; None if it does. The run scripts
    (`scripts/check_batch.sh`) print the same advice."""
    q, b = questions_per_update, train_batch_size
    if 0 < q <= b and b % q == 0:
        return None
    divisors = [d for d in range(1, b + 1) if b % d == 0]
    nearest = [max((d for d in divisors if d <= q), default=0), min((d for d in divisors if d >= q), default=0)]
    sizes = " or ".join(f"{d} ({b // d} update{'s' * (b // d > 1)} a step)" for d in dict.fromkeys(nearest) if d)
    return (
        f"actor_rollout_ref.actor.ppo_mini_batch_size={q} counts questions per optimizer update (the CARL trainer's "
        f"meaning under both algorithm.carl.packing layouts, as verl's prompts for GRPO), and "
        f"{'is more than' if q > b else 'does not divide'} data.train_batch_size={b} questions a step. Set "
        f"actor_rollout_ref.actor.ppo_mini_batch_size={sizes}: the scripts' PPO_MINI_BATCH_QUESTIONS."
    )


def batch_message(mini_batch: int, n: int, dp: int, nnodes: int, gpus: int) -> str | None:
    """Under verl's own trainer modes: why `mini_batch` x `n` rows per update cannot be split over `dp` ranks, and the
    nearest sizes that can; None if they can."""
    rows = mini_batch * n
    if rows % dp == 0:
        return None
    step = dp // math.gcd(dp, n)  # ppo_mini_batch_size values whose rows divide by dp are the multiples of `step`
    lower, upper = (mini_batch // step) * step, (mini_batch // step + 1) * step
    sizes = " or ".join(str(s) for s in (lower, upper) if s > 0)
    return (
        f"actor_rollout_ref.actor.ppo_mini_batch_size={mini_batch} x rollout.n={n} = {rows} rows per update do not "
        f"divide among {dp} data-parallel ranks (trainer.nnodes={nnodes} x trainer.n_gpus_per_node={gpus}); verl "
        f"would stop at its `mini_batch_size % dp == 0` assert on the first update. Set "
        f"actor_rollout_ref.actor.ppo_mini_batch_size={sizes}, use a GPU count whose data-parallel size divides "
        f"{rows}, or trainer.v1.trainer_mode={TRAINER_MODE} (which pads each step to whole updates)."
    )


def check_batch(config: DictConfig) -> None:
    """Raises CARLConfigError, with the sizes that work, if the update size does not fit (module docstring, step 2)."""
    if config.trainer.v1.trainer_mode == TRAINER_MODE:
        message = updates_message(
            int(config.actor_rollout_ref.actor.ppo_mini_batch_size), int(config.data.train_batch_size)
        )
        if message:
            raise CARLConfigError(message)
    else:
        check_batch_divisibility(config)


def check_batch_divisibility(config: DictConfig) -> None:
    """Raises CARLConfigError (with the nearest working sizes) if an update's rows do not divide among the ranks."""
    dp = data_parallel_size(config)
    if not dp:
        return
    message = batch_message(
        int(config.actor_rollout_ref.actor.ppo_mini_batch_size),
        int(config.actor_rollout_ref.rollout.n),
        dp,
        int(config.trainer.nnodes),
        int(config.trainer.n_gpus_per_node),
    )
    if message:
        raise CARLConfigError(message)


# ---- 3. data ----------------------------------------------------------------------------------------------------


def known_agents(config: DictConfig) -> set[str]:
    """Agent-loop names a row may name: verl's registry in this process plus the agent-loop yaml's entries."""
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

    names = set(_agent_loop_registry)
    path = OmegaConf.select(config, AGENT_LOOP_KEY, default=None)
    if path and os.path.exists(path):
        names |= {str(entry["name"]) for entry in OmegaConf.load(path) if "name" in entry}
    return names


def answer_problem(ground_truth: Any) -> str | None:
    """What is wrong with a row's `reward_model.ground_truth` (Search-R1 `{"target": [...]}`, a list or a string)."""
    if ground_truth is None:
        return "missing reward_model.ground_truth"
    answers = ground_truth
    if isinstance(ground_truth, Mapping):
        if "target" not in ground_truth:
            return f"reward_model.ground_truth has no 'target' (keys {sorted(ground_truth)})"
        answers = ground_truth["target"]
    answers = [answers] if isinstance(answers, str) else answers
    if answers is None:  # parquet fills a key other rows have with null
        return "no ground-truth answer (reward_model.ground_truth.target is null)"
    if not isinstance(answers, (list, tuple)):
        return f"ground-truth answers must be strings, got {type(answers).__name__} {answers!r:.60}"
    if not answers:
        return "no ground-truth answer"
    for answer in answers:
        if not isinstance(answer, str):
            return f"non-string ground-truth answer {answer!r:.60} ({type(answer).__name__})"
        if not answer.strip():
            return "empty ground-truth answer"
    return None


def row_problems(row: Mapping[str, Any], agent: str | None, known: set[str], prompt_key: str = "prompt") -> list[str]:
    """Everything that keeps `row` from being trained on; `agent` is its agent loop (column or default)."""
    problems = []
    if not agent:
        problems.append("empty agent_name (or no column and no actor_rollout_ref.rollout.agent.default_agent_loop)")
    elif agent not in known:
        problems.append(f"unknown agent_name {agent!r} (known: {', '.join(sorted(known))})")
    messages = row.get(prompt_key)
    users = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "user"] if messages else []
    if not isinstance(messages, list) or not messages:
        problems.append(f"{prompt_key} is not a non-empty chat list")
    elif not users:
        problems.append(f"{prompt_key} has no user message")
    else:
        content = users[-1].get("content")
        if not (isinstance(content, str) and content.strip()) and not (isinstance(content, list) and content):
            problems.append("empty question (the last user message has no content)")
    extra = row.get("extra_info")
    if isinstance(extra, Mapping) and "question" in extra:
        question = extra["question"]
        if not isinstance(question, str) or not question.strip():
            problems.append(f"empty question (extra_info.question={question!r:.40})")
    reward_model = row.get("reward_model")
    problem = answer_problem(reward_model.get("ground_truth") if isinstance(reward_model, Mapping) else None)
    if problem:
        problems.append(problem)
    return problems


@dataclass
class FileReport:
    """One data file's check: its rows' agent loops and the rows that cannot be trained on."""

    key: str
    path: str
    rows: int = 0
    agents: set[str] = field(default_factory=set)
    bad: list[tuple[int, str]] = field(default_factory=list)
    """(0-based row, problems) for every bad row."""


def _row_label(row: Mapping[str, Any], index: int) -> str:
    extra = row.get("extra_info")
    original = extra.get("index") if isinstance(extra, Mapping) else None
    return f"row {index}" + (f" (extra_info.index={original})" if original is not None else "")


def scan_file(key: str, path: str, default: str | None, known: set[str], prompt_key: str = "prompt") -> FileReport:
    """Validates every row of one parquet file, one record batch at a time."""
    import pyarrow.parquet as pq

    report = FileReport(key, path)
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    columns = [c for c in (prompt_key, "reward_model", "extra_info", "agent_name") if c in names]
    for batch in parquet.iter_batches(batch_size=2048, columns=columns):
        for row in batch.to_pylist():
            # verl takes the column as it is (a null fails in the worker); only a file without it gets the default.
            agent = row.get("agent_name") if "agent_name" in names else default
            agent = str(agent) if agent else None
            report.agents.add(agent or "")
            problems = row_problems(row, agent, known, prompt_key)
            if problems:
                report.bad.append((report.rows, f"{_row_label(row, report.rows)}: {'; '.join(problems)}"))
            report.rows += 1
    return report


def data_files(config: DictConfig) -> list[tuple[str, str]]:
    """(config key, path) of the local parquet files the run reads: training always, validation when it validates."""
    validates = bool(config.trainer.get("val_before_train", True)) or (config.trainer.get("test_freq", -1) or -1) > 0
    keys = ("train_files", "val_files") if validates else ("train_files",)
    found = []
    for key in keys:
        files = config.data.get(key)
        files = [files] if isinstance(files, str) else list(files or [])
        found += [
            (f"data.{key}", f) for f in files if isinstance(f, str) and f.endswith(".parquet") and os.path.isfile(f)
        ]
    return found


def check_agents_fit_estimator(config: DictConfig, report: FileReport) -> None:
    """Refuses validation rows that would grow CARL trees (a config mismatch: never skipped).

    The agent loop cannot see verl's validate flag, so the check is on the data: under `adv_estimator=carl`, rows of
    `data.val_files` must not name `carl_agent` (a tree under carl); validation scores one trajectory per question.
    """
    if config.algorithm.adv_estimator == ESTIMATOR and report.key == "data.val_files" and AUTO_AGENT in report.agents:
        raise CARLConfigError(
            f"data.val_files {report.path}: rows name agent loop {AUTO_AGENT}, which grows a CARL tree under "
            f"algorithm.adv_estimator=carl, but validation scores one trajectory per question. Set the file's "
            f"agent_name column to {CHAIN_AGENT} (the preprocessing scripts do so for any --split but train)."
        )


def check_data(config: DictConfig) -> list[FileReport]:
    """Validates every row of the run's local parquet files before any worker starts (module docstring, step 3).

    Files that are not local parquet files are left to verl's loader. With `algorithm.carl.bad_rows=skip`, bad rows
    are dropped: each affected file is replaced in the config by a filtered copy in
    `${trainer.default_local_dir}/carl_data/`, beside `skipped_rows.jsonl` (file, row, problems of each).

    Returns:
        One report per checked file.

    Raises:
        CARLConfigError: naming file, row and problem of the bad rows (up to `MAX_LISTED`, with the total), or a file
            whose agent loops do not fit the estimator.
    """
    default = config.actor_rollout_ref.rollout.agent.get("default_agent_loop")
    known = known_agents(config)
    prompt_key = config.data.get("prompt_key", "prompt") or "prompt"
    reports = [scan_file(key, path, default, known, prompt_key) for key, path in data_files(config)]
    for report in reports:
        check_agents_fit_estimator(config, report)
    bad = [r for r in reports if r.bad]
    if not bad:
        return reports
    total = sum(len(r.bad) for r in bad)
    if read_settings(config).bad_rows != "skip":
        lines = [f"  {r.key} {r.path} {problem}" for r in bad for _, problem in r.bad][:MAX_LISTED]
        more = f"\n  ... and {total - len(lines)} more" if total > len(lines) else ""
        raise CARLConfigError(
            f"{total} data rows cannot be trained on (rows count from 0):\n" + "\n".join(lines) + more + "\nFix "
            "the rows (the data_preprocess scripts validate the rows they write), or set algorithm.carl.bad_rows=skip "
            "to train on the others."
        )
    skip_bad_rows(config, bad)
    return reports


def skip_bad_rows(config: DictConfig, reports: list[FileReport]) -> None:
    """Writes filtered copies of the files with bad rows and points the config at them (`bad_rows=skip`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(config.trainer.default_local_dir) / "carl_data"
    skipped = []
    for number, report in enumerate(reports):
        if len(report.bad) == report.rows:
            raise CARLConfigError(
                f"{report.key} {report.path}: none of its {report.rows} rows can be trained on (first: "
                f"{report.bad[0][1]}); algorithm.carl.bad_rows=skip would leave nothing. Fix the file."
            )
        drop = {index for index, _ in report.bad}
        table = pq.read_table(report.path)
        keep = pa.array([i not in drop for i in range(table.num_rows)])
        copy = out / f"{number}_{report.key.split('.')[-1]}_{Path(report.path).name}"
        with atomic_path(copy) as tmp:
            pq.write_table(table.filter(keep), tmp)
        files = config.data.get(report.key.split(".")[-1])
        if isinstance(files, str):
            _set(config, report.key, str(copy))
        else:
            _set(config, report.key, [str(copy) if f == report.path else f for f in files])
        skipped += [{"file": report.path, "key": report.key, "row": i, "problems": p} for i, p in report.bad]
        log(f"{report.key} {report.path}: skipped {len(report.bad)} of {report.rows} rows -> {copy}")
    write_jsonl(out / "skipped_rows.jsonl", skipped)
    log(f"algorithm.carl.bad_rows=skip: {len(skipped)} rows skipped in all, listed in {out / 'skipped_rows.jsonl'}")


# ---- 4. worker environment --------------------------------------------------------------------------------------


def tool_env_names(tool_path: str | None) -> list[str]:
    """Environment variables the tool yaml reads through `${oc.env:NAME,...}`."""
    if not tool_path or not os.path.exists(tool_path):
        return []
    return sorted(set(_OC_ENV.findall(Path(tool_path).read_text())))


def runtime_env_vars(config: DictConfig) -> dict[str, str]:
    """`ray_kwargs.ray_init.runtime_env.env_vars` as a plain dict (empty if unset)."""
    env = OmegaConf.select(config, "ray_kwargs.ray_init.runtime_env.env_vars", default=None)
    return {str(k): str(v) for k, v in (OmegaConf.to_container(env) if env is not None else {}).items()}


def is_secret(name: str) -> bool:
    return any(word in name.upper() for word in SECRET_WORDS)


def forwarded_names(environ: Mapping[str, str], tool_path: str | None = None) -> list[str]:
    """The names in `environ` that workers read: `FORWARDED_ENV` (names and prefixes) and the tool yaml's `oc.env`."""
    names = {*tool_env_names(tool_path), *(w for w in FORWARDED_ENV if not w.endswith("_"))}
    prefixes = tuple(w for w in FORWARDED_ENV if w.endswith("_"))
    return sorted(n for n in environ if n in names or (n.startswith(prefixes) and n not in prefixes))


def forward_environment(config: DictConfig, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Puts the driver's values of the variables workers read into the Ray job's `runtime_env.env_vars`.

    A value already set there wins (it is what the workers will see: set one there to keep a node's own). Secret
    values are not printed. Then refuses a loopback retriever URL when `trainer.nnodes > 1`: workers on the other
    nodes would search their own machine.

    Returns:
        The variables added.

    Raises:
        CARLConfigError: for a loopback retriever URL on several nodes.
    """
    environ = os.environ if environ is None else environ
    present = runtime_env_vars(config)
    added = {}
    for name in forwarded_names(environ, OmegaConf.select(config, TOOL_KEY, default=None)):
        if name not in present:
            value = environ[name]
            added[name] = os.path.abspath(value) if name in PATH_ENV and value else value
    if added:
        _set(config, "ray_kwargs.ray_init.runtime_env.env_vars", {**present, **added})
        shown = ", ".join(f"{k}={'***' if is_secret(k) else v}" for k, v in added.items())
        log(f"forwarded to every Ray worker: {shown}")
    if int(config.trainer.nnodes) > 1:
        for url in retriever_urls(config, environ):
            if is_loopback(url):
                raise CARLConfigError(
                    f"the retriever URL {url} is a loopback address, but trainer.nnodes={config.trainer.nnodes}: "
                    "agent-loop workers on the other nodes would search their own machine. Serve the retriever on an "
                    "address every node reaches (scripts/launch_retriever.sh --host 0.0.0.0) and export "
                    "RETRIEVER_URL=http://<that host>:<port>/retrieve before launching."
                )
    return added


def hide_secrets(config: DictConfig) -> list[str]:
    """Replaces the secret values of `ray_kwargs.ray_init.runtime_env.env_vars` by `***` in `config`.

    For the TaskRunner's copy of the config (`CARLTrainer.__init__`): verl hands the whole config to its loggers
    (wandb stores it with the run), and the workers already have the values (the Ray job's environment).

    Returns:
        The names hidden.
    """
    env = runtime_env_vars(config)
    hidden = [name for name in env if is_secret(name) and env[name] != "***"]
    if hidden:
        _set(config, "ray_kwargs.ray_init.runtime_env.env_vars", {**env, **{name: "***" for name in hidden}})
    return hidden


def take_secrets(config: DictConfig) -> dict[str, str]:
    """Takes the secret values out of `ray_kwargs.ray_init.runtime_env.env_vars`, leaving `***` in their place.

    verl prints the Ray init arguments in the driver and the whole config in the TaskRunner (verl/trainer/main_ppo.py)
    before any CARL code could hide them; `recipe.carl.ray_start` passes the values to `ray.init` alone.

    Returns:
        The secret variables and their values (those already `***` are left out).
    """
    env = runtime_env_vars(config)
    secrets = {name: value for name, value in env.items() if is_secret(name) and value != "***"}
    hide_secrets(config)
    return secrets


def shared_paths(config: DictConfig) -> list[tuple[str, str]]:
    """(config key, path) of the local files and folders workers open on whichever node they run: the data files the
    run reads (`bad_rows=skip` copies included), the worker-read yamls and files, a local model and tokenizer."""
    found = list(data_files(config))
    keys = [*REQUIRED_FILES, "actor_rollout_ref.model.path", "actor_rollout_ref.model.tokenizer_path"]
    for key in keys:
        path = OmegaConf.select(config, key, default=None)
        if _is_local(path) and os.path.isabs(path) and os.path.exists(path):
            found.append((key, str(path)))
    return list(dict.fromkeys(found))


def record_driver_view(config: DictConfig) -> dict[str, Any]:
    """What the driver sees of `shared_paths` (a file's size, -1 for a folder) and a probe file it writes into
    `trainer.default_local_dir`, put into the workers' environment (`VIEW_ENV`) for `recipe.carl.cluster`.

    Returns:
        The view: `{"paths": [{"key", "path", "size"}], "probe": {"key", "path", "token"}}` (no probe for a
        checkpoint folder that is not a local path).
    """
    view: dict[str, Any] = {
        "paths": [
            {"key": key, "path": path, "size": os.path.getsize(path) if os.path.isfile(path) else -1}
            for key, path in shared_paths(config)
        ]
    }
    folder = OmegaConf.select(config, "trainer.default_local_dir", default=None)
    if _is_local(folder):
        probe = Path(folder) / PROBE_NAME
        probe.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        probe.write_text(token)
        view["probe"] = {"key": "trainer.default_local_dir", "path": str(probe), "token": token}
    _set(config, "ray_kwargs.ray_init.runtime_env.env_vars", {**runtime_env_vars(config), VIEW_ENV: json.dumps(view)})
    return view


def is_loopback(url: str) -> bool:
    """True for localhost, 127.0.0.0/8, ::1 and the unspecified 0.0.0.0 / ::."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


# ---- 5. retriever -----------------------------------------------------------------------------------------------


class RetrieverUnavailableError(RuntimeError):
    """The retriever a search tool points at does not answer; the message names the URL and the fix."""


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """`os.environ` with `values` on top, for the duration (OmegaConf's `oc.env` reads `os.environ`)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def retriever_urls(config: DictConfig, environ: Mapping[str, str] | None = None) -> list[str]:
    """The `/retrieve` URL of each tool with a `retrieval_service_url`, as the workers will resolve it.

    The workers load the tool yaml and resolve it with their environment, which is the node's environment with the
    job's `runtime_env.env_vars` on top; here that is `environ` (default: the driver's) with those on top.
    """
    path = OmegaConf.select(config, TOOL_KEY, default=None)
    if not path or not os.path.exists(path):
        return []
    tools = OmegaConf.load(path).get("tools") or []
    environ = dict(os.environ if environ is None else environ)
    urls = []
    with _environment({**environ, **runtime_env_vars(config)}):
        for tool in tools:
            settings = OmegaConf.to_container(tool.get("config") or {}, resolve=True)
            if isinstance(settings, dict) and settings.get("retrieval_service_url"):
                urls.append(RetrievalClient(str(settings["retrieval_service_url"])).url)
    return urls


async def probe(url: str, timeout: float = HEALTH_TIMEOUT_S) -> dict[str, Any]:
    """`GET /health` of the server behind `url`; a 404 there falls back to a one-query `POST /retrieve`."""
    import httpx

    client = RetrievalClient(url, timeout=timeout, max_retries=0)
    try:
        try:
            return await client.health()
        except httpx.HTTPStatusError as error:
            if error.response.status_code != 404:
                raise
        await client.search(["health check"], topk=1)  # e.g. Search-R1's retrieval_server.py has no /health
        return {"status": "ok", "health": "no /health; /retrieve answered"}
    finally:
        await client.aclose()


def check_retriever(config: DictConfig, timeout: float = HEALTH_TIMEOUT_S) -> list[str]:
    """Stops the run unless every retriever of the tool yaml answers (module docstring, step 5).

    Returns:
        The URLs checked (empty when the run has no retriever tool or the check is skipped).

    Raises:
        RetrieverUnavailableError: naming the URL, where it came from, the error and the fix.
    """
    if os.environ.get(SKIP_RETRIEVER_ENV, "") not in ("", "0"):
        log(f"{SKIP_RETRIEVER_ENV} is set: the retriever is not checked")
        return []
    try:
        wait_s = retriever_wait_s()
    except ValueError as error:
        raise CARLConfigError(str(error)) from None
    urls = retriever_urls(config)
    for url in urls:
        try:  # any failure to answer: connection, timeout, HTTP status, malformed reply
            health = until_it_answers(lambda: asyncio.run(probe(url, timeout)), url, wait_s, log)  # noqa: B023
        except Exception as error:
            tool = OmegaConf.select(config, TOOL_KEY)
            waited = f" after waiting {wait_s:g} s" if wait_s else ""
            raise RetrieverUnavailableError(
                f"the retriever at {url} does not answer{waited} ({type(error).__name__}: {error}). The URL is the "
                f"retrieval_service_url of {tool} with the environment the workers get (RETRIEVER_URL="
                f"{os.environ.get('RETRIEVER_URL', '<unset>')}). Start the retriever (scripts/launch_retriever.sh) "
                f"or export RETRIEVER_URL=http://<host>:<port>/retrieve; {RETRIEVER_WAIT_ENV}=600 waits up to 600 s "
                f"for one that is still loading its index; {SKIP_RETRIEVER_ENV}=1 skips this check."
            ) from error
        log(f"retriever {url} answers: {json.dumps(health, default=str)}")
    return urls
