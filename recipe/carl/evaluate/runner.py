"""Rolls questions out through the agent loop's own `SearchEnvironment` and records what each trajectory did.

The same prompt tokenisation (the row's chat `prompt` through the model's chat template), stop strings, action
parsing, `<information>` observations, T_max and finish reasons as training (`recipe/carl/agent_loop.py`), on one of
the `engines`; each trajectory is scored by the training reward.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from carl_core import RolloutTree, rollout_from
from recipe.carl.evaluate.data import gold_answers, question_text
from recipe.carl.evaluate.engines import HFEngine, VLLMEngine
from recipe.carl.evaluate.settings import EvalSettings
from recipe.carl.search.action_space import make_action_space
from recipe.carl.search.reward import exact_match, extract_answer, f1_score, format_score

#: The metrics compared between two models (per question: the mean over its samples).
COMPARED = ("em", "f1", "format", "reward")


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
        access: the paper's action space: `access(page_id, tree_id)` -> the page's `Title\ntext`, or None for an
            unknown id (may be async; raises on failure).
    """

    def __init__(
        self,
        server: Any,
        tokenizer: Any,
        search: Callable[[str, str], Any],
        reward_fn: Callable[..., Any],
        settings: EvalSettings,
        request_seed: int | None = None,
        access: Callable[[str, str], Any] | None = None,
    ):
        self.server, self.tokenizer, self.search, self.reward_fn = server, tokenizer, search, reward_fn
        self.settings, self.request_seed, self.access = settings, request_seed, access
        self.actions = make_action_space(settings.action_space, settings.page_chunk_chars)

    def prompt_ids(self, row: dict[str, Any]) -> list[int]:
        """The row's chat prompt tokenised as verl's agent loop does (chat template, generation prompt)."""
        # deferred (here and below): verl is heavy, and `-h` and the input checks do without it
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
        from recipe.carl.agent_loop import SearchEnvironment  # here, not at the top: it imports verl

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
            actions=self.actions,
            access=self.access,
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
                leaf = await rollout_from(tree, tree.start_rollout(tree.root.id), env)
                leaf = tree.canonicalize()[leaf]  # a stop (no action) is shown as the state it ended at
        finally:
            release = getattr(self.search, "release", None)
            if callable(release):
                release(uid)
        return tree, leaf, env.breakdown(tree, leaf) or {}

    def trajectory_record(self, tree: RolloutTree, leaf: int, breakdown: dict, gold: list[str] | None) -> dict:
        """What one trajectory did: its actions (text, query, observation), prediction, finish reason, scores."""
        actions = []
        for v in tree.path(leaf)[1:]:
            action = tree.nodes[v].action
            obs = self.tokenizer.decode(action.observation_ids) if action.observation_ids else None
            entry = {"kind": action.info.get("kind"), "text": action.info.get("text"), "tokens": len(action.token_ids)}
            keys = ("query", "page_id", "part", "reason", "error")
            entry.update({k: action.info[k] for k in keys if k in action.info})
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

    async def evaluate_rows(
        self, rows: list[dict[str, Any]], progress: Any = None, on_record: Callable[[dict], None] | None = None
    ) -> list[dict[str, Any]]:
        """One record per row: the question, its gold answers, and `settings.samples` trajectories.

        Args:
            rows: the questions.
            progress: a tqdm bar, advanced once per trajectory.
            on_record: called with each question's record as soon as all its trajectories are done (in completion
                order), e.g. to write it to disk, so that a crash loses only the questions in flight.

        Returns:
            The records, in the order of `rows`.
        """
        s = self.settings
        limit = asyncio.Semaphore(s.concurrency)

        async def trajectory(i: int, j: int) -> dict:
            async with limit:
                uid = f"eval{i}" if s.samples == 1 else f"eval{i}.{j}"
                tree, leaf, breakdown = await self.rollout(rows[i], s.temperature, uid)
            if progress is not None:
                progress.update(1)
            record = self.trajectory_record(tree, leaf, breakdown, gold_answers(rows[i]))
            return {"sample": j, **record}

        async def question(i: int) -> dict:
            samples = await asyncio.gather(*(trajectory(i, j) for j in range(s.samples)))
            record = question_record(rows[i], i, list(samples))
            if on_record is not None:
                on_record(record)
            return record

        return list(await asyncio.gather(*(question(i) for i in range(len(rows)))))


def row_key(row_or_record: dict[str, Any]) -> tuple[str | None, int]:
    """Which question a data row (`_file`, `_row`) or a question record (`file`, `row`) is: its file and position."""
    if "_row" in row_or_record:
        return row_or_record.get("_file"), int(row_or_record["_row"])
    return row_or_record.get("file"), int(row_or_record["row"])


def question_record(row: dict[str, Any], i: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A question's record: where it is from, the question and gold answers, its means over the samples, the samples."""
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    return {
        "data_source": row["data_source"],
        "file": row.get("_file"),
        "row": row.get("_row", i),
        "index": extra.get("index"),
        "question": question_text(row),
        "gold": gold_answers(row),
        **{k: finite_mean([t[k] for t in samples]) for k in COMPARED},
        "samples": samples,
    }


def finite_mean(values: Sequence[float | None]) -> float:
    """The mean of the values that are numbers (None and NaN dropped); NaN when none is."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else float("nan")


async def evaluate_model(
    model_dir: Path,
    datasets: dict[str, list[dict[str, Any]]],
    settings: EvalSettings,
    engine: str,
    search: Any,
    reward_fn: Callable[..., Any],
    engine_options: dict[str, Any] | None = None,
    done: dict[str, list[dict[str, Any]]] | None = None,
    on_record: Callable[[str, dict], None] | None = None,
    access: Any = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every data set's question records for one model (the engine is started here and shut down after).

    Args:
        done: records of questions already evaluated (a resumed run), by data set: those rows are not rolled out
            again, and their records take their place in the result.
        on_record: `on_record(data_source, record)` for each newly evaluated question, as soon as it is done.

    Returns:
        Per data set, one record per row, in the rows' order.
    """
    from transformers import AutoTokenizer  # deferred: transformers is heavy, and the input checks come first

    known = {source: {row_key(r): r for r in records} for source, records in (done or {}).items()}
    todo = {source: [r for r in rows if row_key(r) not in known.get(source, {})] for source, rows in datasets.items()}
    new: dict[str, dict] = {source: {} for source in datasets}
    if any(todo.values()):
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        options = dict(engine_options or {})
        if engine == "vllm":
            server = await VLLMEngine.start(model_dir, tokenizer, settings, **options)
        else:
            server = HFEngine(model_dir, tokenizer, settings, dtype=options.get("dtype", "auto"))
        evaluator = Evaluator(server, tokenizer, search, reward_fn, settings, request_seed=settings.seed, access=access)
        try:
            for source, rows in todo.items():
                if not rows:
                    continue
                sink = (lambda record, source=source: on_record(source, record)) if on_record else None
                with tqdm(total=len(rows) * settings.samples, desc=source, unit="traj", file=sys.stderr) as bar:
                    records = await evaluator.evaluate_rows(rows, progress=bar, on_record=sink)
                new[source] = {row_key(r): r for r in records}
        finally:
            await server.close()
    return {
        source: [new[source].get(row_key(r)) or known[source][row_key(r)] for r in rows]
        for source, rows in datasets.items()
    }
