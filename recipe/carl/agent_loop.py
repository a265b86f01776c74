"""CARL's tree rollout (Alg. 1) as a verl agent loop: one `run()` grows one prompt's tree and lays out its rows.

Registered as `carl_agent` (training rows: a tree under `algorithm.adv_estimator=carl`, one trajectory per session
under GRPO or any other estimator, so one parquet serves every method) and `carl_chain_agent` (one trajectory:
validation rows and evaluation), through `recipe/carl/config/carl_agent_loop.yaml` and, by the plugin, `register`.

One `run()`::

    prompt ──> RolloutTree ──grow_tree (N0 root rollouts, then N forks, K at a time)──> finished tree
           ──compute_trained_mask (structural, Eq. 13) + layout_rows──> rows ──> list[AgentLoopOutput]

No values or advantages are computed here: the registered `carl` estimator scores every tree of the batch at once
(`recipe/carl/estimator.py`). What each row carries in `extra_fields`:

- `carl_token_nodes`: runs `[[node, count], ...]` over the response: the node whose action each token belongs to
  (-1 on observations); the estimator puts that action's advantage on its tokens;
- `carl_leaf`: the leaf whose path the row follows (its reward and reward breakdown are in the description);
- `carl_tree`: on the tree's first row only, `carl_core.describe_tree` (per node: parent, leaf reward, action
  entropy, tokens, finish reason, action kind) plus the per-leaf reward breakdown and the tree's search counts; on
  steps whose trees are dumped (`algorithm.carl.dump_every`), also the question and each action's text;
- `reward_extra_info`: the leaf's reward breakdown, finish-reason flags and search counts (verl requires it on the
  last output once a score is set, and aggregates it into `val-aux/*` metrics during validation).

`SearchEnvironment.step` is one agent turn: generate from the state's prefix (one request id per tree, so a server's
prefix cache sees every fork of the tree), stop at `</search>`, `</answer>` or EOS, parse the turn, run the search
and append the `<information>...</information>` observation. Under `algorithm.carl.action_space: paper` a turn may
also open a page (`<access> id </access>`, the verl tool named `access`) or read on in it (`<read> </read>`), whose
part is the observation (`recipe.carl.search.action_space`). A leaf ends on an answer, at T_max, or with a recorded
reason: `prompt_too_long`, `context_overflow` (no room left in `rollout.response_length`), `action_too_long` (the turn
used its whole budget without an action), `invalid:<reason>` (a malformed action, see `recipe.carl.search.actions`),
`tool_error` (the search failed after the tool's retries: the failure never becomes an observation that is
trained on), `empty_generation`.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import random
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput, register
from verl.trainer.ppo.reward import get_custom_reward_fn

from carl_core import (
    CARLConfig,
    Draw,
    ForkPlanner,
    RolloutTree,
    Step,
    TrainingRow,
    compute_has_value,
    compute_trained_mask,
    describe_tree,
    grow_tree,
    layout_rows,
    pack_trees,
)
from recipe.carl.in_flight import IN_FLIGHT, TAILS, TailBoost
from recipe.carl.packing import RUNS_KEY, packing_budget
from recipe.carl.packing.layout import PackedRow, pack_tree
from recipe.carl.pool import POOLS, ForkPool, grow_pooled
from recipe.carl.search.action_space import (
    ActionSpace,
    SearchR1Actions,
    make_action_space,
    open_page,
    read_part,
    reading_on_path,
    render_part,
)
from recipe.carl.search.actions import render_observation
from recipe.carl.search.reward import compute_score as default_compute_score
from recipe.carl.settings import AUTO_AGENT, CHAIN_AGENT, ESTIMATOR, read_settings

logger = logging.getLogger(__name__)

#: Finish reasons reported as `finish_<category>` flags in every leaf's reward breakdown (`invalid:*` -> invalid).
FINISH_CATEGORIES = (
    "answer",
    "max_actions",
    "invalid",
    "action_too_long",
    "context_overflow",
    "tool_error",
    "prompt_too_long",
    "empty_generation",
)

Generate = Callable[..., Awaitable[Any]]
"""`generate(request_id=, prompt_ids=, sampling_params=) -> TokenOutput` (verl's `LLMServerClient.generate`, or the
CPU server's): `token_ids`, `log_probs` of the sampled tokens, `extra_fields`."""


class SearchError(RuntimeError):
    """A search that failed after the tool's own retries; its leaf ends as `tool_error`."""


class ToolSearcher:
    """A verl tool named `search` (a `BaseTool`, or a `FunctionTool` with `.call`) as `search(query, tree_id)`.

    A `BaseTool` reports failures in its metrics (`search/ok` = 0, as `CarlSearchTool` does) rather than raising;
    they are raised here as `SearchError`, so a failed search ends its leaf instead of being trained on.
    """

    def __init__(self, tool: Any) -> None:
        self.tool = tool
        schema = getattr(tool, "tool_schema", None)
        props = getattr(getattr(getattr(schema, "function", None), "parameters", None), "properties", None) or {}
        self.arg = "query_list" if "query_list" in props else "query"

    async def __call__(self, query: str, tree_id: str) -> Any:
        params = {self.arg: [query] if self.arg == "query_list" else query}
        if hasattr(self.tool, "call"):  # FunctionTool
            result = self.tool.call(params)
            result = await result if inspect.isawaitable(result) else result
            return getattr(result, "text", result)
        instance_id, _ = await self.tool.create(create_kwargs={"tree_id": tree_id})
        try:
            response, _, metrics = await self.tool.execute(instance_id, params)
        finally:
            await self.tool.release(instance_id)
        if isinstance(metrics, dict) and metrics.get("search/ok", 1.0) == 0:
            raise SearchError(response.text or "the search tool reported a failure")
        return response.text or ""

    def release(self, tree_id: str) -> None:
        """Frees the tool's per-tree search cache once the tree is finished."""
        drop = getattr(self.tool, "drop_tree", None)
        if callable(drop):
            drop(tree_id)


def resolve_searcher(search: Any, tools: Any) -> Callable[[str, str], Any]:
    """The search backend: the `search` constructor argument, else the verl tool named `search`.

    Raises:
        ValueError: when neither exists, saying how to configure one.
    """
    if search is not None:
        if callable(search):
            return search
        if hasattr(search, "search"):
            return search.search
        raise ValueError(f"search={search!r} is neither callable nor has a .search(query) method.")
    for tool in getattr(tools, "tools", tools) or []:
        if getattr(tool, "name", None) == "search":
            return ToolSearcher(tool)
    raise ValueError(
        "the CARL agent loop has no search backend: set actor_rollout_ref.rollout.multi_turn.tool_config_path to "
        "a tool yaml with a tool named `search`, or give the agent-loop yaml entry a `search:` object."
    )


class ToolAccessor:
    """The verl tool named `access` (`CarlAccessTool`) as `access(page_id, tree_id)`: the page's `Title\ntext`, or
    None when the retriever knows no such id; a failure (`search/ok` = 0) is raised as `SearchError`. A tree's pages
    are kept by its `SearchEnvironment` (one per tree), so the tool needs no per-tree cache to release."""

    def __init__(self, tool: Any) -> None:
        self.tool = tool

    async def __call__(self, page_id: str, tree_id: str) -> str | None:
        instance_id, _ = await self.tool.create(create_kwargs={"tree_id": tree_id})
        try:
            response, _, metrics = await self.tool.execute(instance_id, {"id": page_id})
        finally:
            await self.tool.release(instance_id)
        if metrics.get("search/ok", 1.0) == 0:
            raise SearchError(response.text or "the access tool reported a failure")
        return response.text if metrics.get("search/page_found", 1.0) else None


def resolve_accessor(tools: Any) -> ToolAccessor:
    """The verl tool named `access`, for the paper's action space; its `search` tool must show result ids.

    Raises:
        ValueError: when the tool yaml lacks `access` or hides the ids, naming the yaml to use.
    """
    fix = "set actor_rollout_ref.rollout.multi_turn.tool_config_path to recipe/carl/search/pages_tool.yaml"
    named = {getattr(tool, "name", None): tool for tool in getattr(tools, "tools", tools) or []}
    if "access" not in named:
        raise ValueError(f"algorithm.carl.action_space=paper needs a verl tool named `access`: {fix}.")
    settings = getattr(named.get("search"), "settings", None)
    if isinstance(settings, dict) and not settings.get("show_ids", False):
        raise ValueError(
            "algorithm.carl.action_space=paper: the `search` tool hides the result ids an <access> names; set its "
            f"config show_ids: true, or {fix}."
        )
    return ToolAccessor(named["access"])


@dataclasses.dataclass
class SearchStats:
    """Tool calls of one tree (searches, and accesses under the paper's action space): how many ran, how many failed,
    and their summed latency; `accesses` counts the accesses among them."""

    calls: int = 0
    errors: int = 0
    latency_s: float = 0.0
    last_error: str = ""
    accesses: int = 0


class SearchEnvironment:
    """carl_core's `Environment` for a Search-R1-style agent: one agent turn per `step`, the reward per leaf.

    Args:
        generate: the inference engine (see `Generate`).
        tokenizer: decodes turns and encodes observations.
        search: `search(query, tree_id) -> observation text or documents` (may be async; raises on failure).
        reward_fn: `reward_fn(data_source=, solution_str=, ground_truth=, extra_info=)` -> float or dict with a
            "score" (may be async).
        sampling_params: the engine's sampling parameters (temperature, top_p, ...).
        request_id: one id for all turns of a tree (prefix caching; the search cache key).
        data_source, ground_truth, extra_info: the row's, for the reward.
        max_action_tokens: token budget of one agent turn.
        response_length: token budget of a whole trajectory after the prompt (actions and observations).
        invalid_action: "end" (the leaf ends as `invalid:<reason>`) or "feedback" (Search-R1's behaviour: an
            observation that says how to act, and the episode goes on).
        thinking: a stop string inside an unclosed `<think>` block does not end the turn: generation continues
            (for thinking models such as Qwen3, which may mention tags while reasoning).
        seed: when given, every request gets its own seed derived from it and the state (verl's full determinism
            otherwise gives every request of a replica the same seed, so all rollouts of a tree would coincide).
        actions: the action space (default: Search-R1's search and answer).
        access: the paper's action space: `access(page_id, tree_id) -> "Title\ntext"`, or None for an unknown id
            (may be async; raises on failure).
    """

    def __init__(
        self,
        *,
        generate: Generate,
        tokenizer: Any,
        search: Callable[[str, str], Any],
        reward_fn: Callable[..., Any],
        sampling_params: dict[str, Any],
        request_id: str,
        data_source: str,
        ground_truth: Any,
        extra_info: Any,
        max_action_tokens: int,
        response_length: int,
        invalid_action: str = "end",
        thinking: bool = False,
        seed: int | None = None,
        step: int = 0,
        actions: ActionSpace | None = None,
        access: Callable[[str, str], Any] | None = None,
    ) -> None:
        if invalid_action not in ("end", "feedback"):
            raise ValueError(f"invalid_action={invalid_action!r} is unknown: use 'end' or 'feedback'.")
        self.generate, self.tokenizer, self.search, self.reward_fn = generate, tokenizer, search, reward_fn
        self.request_id = request_id
        self.data_source, self.ground_truth, self.extra_info = data_source, ground_truth, extra_info
        self.max_action_tokens, self.response_length = int(max_action_tokens), int(response_length)
        self.invalid_action, self.thinking, self.seed, self.global_step = invalid_action, thinking, seed, step
        self.actions = actions or SearchR1Actions()
        if "access" in self.actions.kinds and access is None:
            raise ValueError(f"the {self.actions.name} action space opens pages: give SearchEnvironment an access=.")
        self.access = access
        self.chunk_chars = int(getattr(self.actions, "chunk_chars", 0))
        self.pages: dict[str, str | None] = {}  # page id -> "Title\ntext" (None: unknown), fetched once per tree
        # One turn ends right after its action; the closing tag must stay in the tokens the policy is trained on.
        self.sampling_params = {
            **sampling_params,
            "stop": list(self.actions.stop_strings),
            "include_stop_str_in_output": True,
            "logprobs": True,  # the sampled tokens' log-probs: h(a) (Eq. 8) and rollout_log_probs
        }
        self.leaf_info: dict[tuple[int, ...], dict[str, float]] = {}  # by the leaf's prefix: ids change on renumbering
        self.global_steps: list[int] = []
        self.timing = {"generate": 0.0, "tool": 0.0, "score": 0.0}
        self.searches = SearchStats()

    def breakdown(self, tree: RolloutTree, leaf_id: int) -> dict[str, float] | None:
        """The reward breakdown `score` recorded for a leaf (None for an inner node)."""
        return self.leaf_info.get(tuple(tree.prefix_ids(leaf_id))) if tree.nodes[leaf_id].terminal else None

    async def _sample(self, prefix: list[int], budget: int, draw: Draw) -> tuple[list, list]:
        """One turn's tokens and log-probs; with `thinking`, continues past stop strings inside `<think>`."""
        tokens: list[int] = []
        log_probs: list[float] = []
        while budget - len(tokens) >= 1:
            params = {**self.sampling_params, "max_tokens": budget - len(tokens)}
            if self.seed is not None:
                # Keyed on the draw (rollout, turn), which does not depend on which concurrent rollout ran first. For
                # a single chain (rollout 0) the key is the one node id and visit gave before forks ran concurrently.
                key = f"{self.seed}:{self.request_id}:{draw.turn}:{draw.rollout + 1}:{len(tokens)}"
                params["seed"] = zlib.crc32(key.encode())
            start = time.perf_counter()
            IN_FLIGHT.change(self.global_step, +1)
            try:
                output = await self.generate(
                    request_id=self.request_id, prompt_ids=prefix + tokens, sampling_params=params
                )
            finally:
                IN_FLIGHT.change(self.global_step, -1)
            self.timing["generate"] += time.perf_counter() - start
            steps = [(output.extra_fields or {}).get(k) for k in ("min_global_steps", "max_global_steps")]
            self.global_steps += [s for s in steps if s is not None]
            new = list(output.token_ids)
            if new and (output.log_probs is None or len(output.log_probs) != len(new)):
                raise ValueError(
                    "the LLM server returned no per-token log-probs; CARL needs them for the state entropy "
                    "(keep actor_rollout_ref.rollout.calculate_log_probs=true and a server that honours logprobs)."
                )
            tokens += new
            log_probs += [min(float(lp), 0.0) for lp in output.log_probs or []]
            if not (new and self.thinking and self._inside_think(tokens)):
                break
        return tokens, log_probs

    def _inside_think(self, tokens: list[int]) -> bool:
        """The turn stopped at an action tag that sits inside a `<think>` block not closed yet."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        stops = self.actions.stop_strings
        return any(text.rstrip().endswith(s) for s in stops) and text.rfind("<think>") > text.rfind("</think>")

    async def step(self, tree: RolloutTree, node_id: int, draw: Draw) -> Step:
        prefix = tree.prefix_ids(node_id)
        max_tokens = min(self.max_action_tokens, self.response_length - (len(prefix) - len(tree.prompt_ids)))
        if max_tokens < 1:
            return Step((), (), finish_reason="context_overflow")
        tokens, log_probs = await self._sample(prefix, max_tokens, draw)
        if not tokens:
            return Step((), (), finish_reason="empty_generation")
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        action = self.actions.parse(text)
        info: dict[str, Any] = {"kind": action.kind, "text": text}
        last = tree.nodes[node_id].depth + 1 >= tree.max_actions  # the T_max-th action ends the trajectory
        if action.kind == "answer":
            return Step(tokens, log_probs, done=True, finish_reason="answer", info={**info, "answer": action.answer})
        if action.kind == "invalid":
            if len(tokens) >= max_tokens:
                info["reason"] = action.reason
                return Step(tokens, log_probs, done=True, finish_reason="action_too_long", info=info)
            return self._invalid(tokens, log_probs, info, str(action.reason), last)
        if action.kind in ("access", "read"):
            return await self._page_step(tree, node_id, tokens, log_probs, action, info, last)
        info["query"] = action.query
        if last:
            return Step(tokens, log_probs, info=info)  # no observation follows the last action: no search needed
        ok, observation = await self._tool(self.search, action.query, info, finish=render_observation)
        if not ok:
            return Step(tokens, log_probs, done=True, finish_reason="tool_error", info=info)
        info["searched"] = True
        obs_ids = self.tokenizer.encode(observation, add_special_tokens=False)
        return Step(tokens, log_probs, observation_ids=obs_ids, info=info)

    def _invalid(self, tokens: list, log_probs: list, info: dict, reason: str, last: bool, **detail: Any) -> Step:
        """A turn without a usable action: its leaf ends as `invalid:<reason>`, or it gets the action space's feedback
        for `reason` and the episode goes on (`invalid_action: feedback`)."""
        info["reason"] = reason
        if self.invalid_action == "end" or last:
            return Step(tokens, log_probs, done=True, finish_reason=f"invalid:{reason}", info=info)
        feedback = self.tokenizer.encode(
            render_observation(self.actions.feedback(reason, **detail)), add_special_tokens=False
        )
        return Step(tokens, log_probs, observation_ids=feedback, info=info)

    async def _tool(
        self, call: Callable[[str, str], Any], argument: Any, info: dict, finish: Callable[[Any], Any] = lambda x: x
    ) -> tuple[bool, Any]:
        """One call of the search or access backend, counted in `searches`: `(True, finish(result))`, or
        `(False, None)` with the error in `info` when it (or `finish`, e.g. rendering what came back) raised; the
        caller then ends the leaf as `tool_error`, so a failure never becomes an observation that is trained on."""
        start = time.perf_counter()
        self.searches.calls += 1
        self.searches.accesses += int(info["kind"] != "search")
        try:
            result = call(argument, self.request_id)
            return True, finish(await result if inspect.isawaitable(result) else result)
        except Exception as error:  # a failing tool call ends this leaf only; the step goes on
            logger.warning("%s failed for %r: %s", info["kind"], argument, error)
            self.searches.errors += 1
            info["error"] = self.searches.last_error = f"{type(error).__name__}: {error}"[:300]
            return False, None
        finally:
            self.searches.latency_s += time.perf_counter() - start
            self.timing["tool"] += time.perf_counter() - start

    async def _page_step(
        self, tree: RolloutTree, node_id: int, tokens: list, log_probs: list, action: Any, info: dict, last: bool
    ) -> Step:
        """An `<access>` (a page opens at its first part) or a `<read>` (another part of the page open on this path);
        an unknown id or a part the page lacks is an invalid turn, a failed access a `tool_error` leaf."""
        if action.kind == "access":
            info["page_id"] = action.page
        if last:  # no observation follows the last action: nothing to fetch
            return Step(tokens, log_probs, info=info)
        if action.kind == "access":
            contents = await self._page(action.page, info)
            if "error" in info:
                return Step(tokens, log_probs, done=True, finish_reason="tool_error", info=info)
            if contents is None:
                return self._invalid(tokens, log_probs, info, "unknown_page", last, page=action.page)
            reading = open_page(action.page, contents, self.chunk_chars)
        else:
            open_at = reading_on_path([tree.nodes[v].action.info for v in tree.path(node_id)[1:]])
            current = None
            if open_at is not None:
                contents = await self._page(open_at[0], info)
                if "error" in info:
                    return Step(tokens, log_probs, done=True, finish_reason="tool_error", info=info)
                current = dataclasses.replace(open_page(open_at[0], contents, self.chunk_chars), part=open_at[1])
            result = read_part(current, action.part)
            if isinstance(result, tuple):
                return self._invalid(tokens, log_probs, info, result[0], last, **result[1])
            reading = result
        info.update(page=reading.page, part=reading.part + 1, parts=len(reading.parts))
        observation = self.tokenizer.encode(render_observation(render_part(reading)), add_special_tokens=False)
        return Step(tokens, log_probs, observation_ids=observation, info=info)

    async def _page(self, page_id: str, info: dict) -> str | None:
        """A page's `Title\ntext` (None: unknown id), fetched once per environment: reads reuse the access's."""
        if page_id not in self.pages:
            ok, contents = await self._tool(self.access, page_id, info)  # type: ignore[arg-type]
            if not ok:
                return None
            self.pages[page_id] = contents
        info["accessed"] = True
        return self.pages[page_id]

    async def score(self, tree: RolloutTree, leaf_id: int) -> float:
        start = time.perf_counter()
        response = tree.prefix_ids(leaf_id)[len(tree.prompt_ids) :]
        solution = self.tokenizer.decode(response, skip_special_tokens=True)
        result = self.reward_fn(
            data_source=self.data_source,
            solution_str=solution,
            ground_truth=self.ground_truth,
            extra_info=self.extra_info,
        )
        result = await result if inspect.isawaitable(result) else result
        info = dict(result) if isinstance(result, dict) else {"score": result}
        breakdown = {k: float(v) for k, v in info.items() if isinstance(v, (int, float))}
        reason = (tree.nodes[leaf_id].finish_reason or "").split(":")[0]
        breakdown.update({f"finish_{c}": float(reason == c) for c in FINISH_CATEGORIES})
        path = [tree.nodes[v].action.info for v in tree.path(leaf_id)[1:]]
        breakdown["search_calls"] = float(
            sum(a.get("kind") == "search" and ("searched" in a or "error" in a) for a in path)
        )
        breakdown["search_errors"] = float(sum("error" in a for a in path))
        if "access" in self.actions.kinds:  # the paper's action space (the default's breakdown keeps its keys)
            breakdown["access_actions"] = float(sum(a.get("kind") == "access" for a in path))
            breakdown["read_actions"] = float(sum(a.get("kind") == "read" for a in path))
        self.leaf_info[tuple(tree.prefix_ids(leaf_id))] = breakdown
        self.timing["score"] += time.perf_counter() - start
        return float(info["score"])


class CarlAgentLoop(AgentLoopBase):
    """Grows one CARL tree per prompt (or one trajectory) and returns one `AgentLoopOutput` per training row.

    Args (besides verl's `AgentLoopBase` ones; set them in the agent-loop yaml):
        mode: "auto" (`carl_agent`: a tree under `algorithm.adv_estimator=carl`, one trajectory under any other
            estimator) or "chain" (`carl_chain_agent`: one trajectory, every action trained: validation).
        search: the search backend (`search(query, tree_id)` or an object with `.search`); default: the verl tool
            named `search`.
        tools: verl's loaded tools (passed by the agent-loop worker).
    Per-turn token budget, invalid-action behaviour, thinking and the action space (with the verl tool named `access`
    under `paper`) come from `algorithm.carl` (`recipe.carl.settings`).
    """

    def __init__(
        self,
        trainer_config,
        server_manager,
        tokenizer,
        processor,
        dataset_cls,
        data_config,
        hf_model_type: str | None = None,
        *,
        mode: str = "auto",
        search: Any = None,
        tools: Any = None,
        **kwargs,
    ):
        super().__init__(
            trainer_config, server_manager, tokenizer, processor, dataset_cls, data_config, hf_model_type, **kwargs
        )
        if mode not in ("auto", "chain"):
            raise ValueError(f"mode={mode!r} is unknown: use 'auto' (follows algorithm.adv_estimator) or 'chain'.")
        self.mode = "tree" if mode == "auto" and self.config.algorithm.adv_estimator == ESTIMATOR else "chain"
        self.settings = read_settings(self.config)
        carl = self.settings.carl
        # A chain is a tree with one rollout and no fork; "all" trains each of its actions.
        self.carl: CARLConfig = carl if self.mode == "tree" else dataclasses.replace(carl, n0=1, n_forks=0)
        self.update_set = self.carl.update_set if self.mode == "tree" else "all"
        self.pooled = mode == "auto"  # training rows may share a fork pool; validation's chains never do
        self.pool_record: dict[str, int] | None = None
        self.prompt_length = int(self.rollout_config.prompt_length)
        self.response_length = int(self.rollout_config.response_length)
        self.searcher = resolve_searcher(search, tools)
        self.actions = make_action_space(self.settings.action_space, self.settings.page_chunk_chars)
        self.accessor = resolve_accessor(tools) if "access" in self.actions.kinds else None
        self.reward_fn = get_custom_reward_fn(self.config) or default_compute_score

    def environment(
        self, sampling_params: dict[str, Any], request_id: str, kwargs: dict[str, Any]
    ) -> SearchEnvironment:
        reward_model = kwargs.get("reward_model") or {}
        deterministic = bool(getattr(self.rollout_config, "full_determinism", False))
        return SearchEnvironment(
            generate=self.server_manager.generate,
            tokenizer=self.tokenizer,
            search=self.searcher,
            reward_fn=self.reward_fn,
            sampling_params=sampling_params,
            request_id=request_id,
            data_source=kwargs.get("data_source", ""),
            ground_truth=reward_model.get("ground_truth"),
            extra_info=kwargs.get("extra_info"),
            max_action_tokens=self.settings.max_action_tokens,
            response_length=self.response_length,
            invalid_action=self.settings.invalid_action,
            thinking=self.settings.thinking,
            seed=int(getattr(self.rollout_config, "seed", 0) or 0) if deterministic else None,
            step=int(kwargs.get("global_steps", 0) or 0),
            actions=self.actions,
            access=self.accessor,
        )

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> list[AgentLoopOutput]:
        # Deterministic per row (not the random uid), so full determinism reproduces across runs.
        key = f"{kwargs.get('index', '')}:{kwargs.get('session_id', 0)}:{kwargs.get('global_steps', 0)}"
        pool = self.join_pool(key, kwargs)  # before the first await: every tree of the worker joins first
        boost = self.join_tail(kwargs)  # ... as into the straggler boost
        tail = boost.tail if boost else None
        messages = list(kwargs["raw_prompt"])
        prompt_ids = await self.loop.run_in_executor(
            None, lambda: self.continuous_token_builder.build_initial_tokens(messages)
        )
        uid = f"{kwargs.get('uid', '')}_{kwargs.get('session_id', 0)}"
        request_id = uuid.uuid4().hex if not getattr(self.rollout_config, "full_determinism", False) else key
        env = self.environment(sampling_params, request_id, kwargs)
        tree = RolloutTree(prompt_ids, self.carl.max_actions, uid=uid, merge=self.mode == "tree" and self.carl.merge)
        reported = False
        try:
            if len(prompt_ids) > self.prompt_length:
                # verl would left-truncate the prompt (losing the instructions); CARL ends the tree at its root.
                logger.warning("prompt of %d tokens > rollout.prompt_length=%d", len(prompt_ids), self.prompt_length)
                tree.terminate(tree.root.id, "prompt_too_long")
                tree.set_reward(tree.root.id, await env.score(tree, tree.root.id))
            elif pool is None:
                # One generator per tree: with `selection: random` the trees of a batch must not draw the same forks.
                planner = ForkPlanner(self.carl, random.Random(f"{self.carl.seed}:{uid}"))
                await grow_tree(tree, planner, env, tail=tail)
            else:
                rng = random.Random(f"{self.carl.seed}:{uid}")
                grpo = self.mode == "chain"
                self.pool_record = await grow_pooled(tree, env, pool, key, self.carl, rng, grpo=grpo, tail=tail)
                reported = True
        finally:
            if boost is not None:
                boost.end()
            if pool is not None and not reported and not pool.members[key].left:
                pool.leave(key)  # nothing to grow (a prompt too long): its share goes to the other trees
            release = getattr(self.searcher, "release", None)
            if callable(release):
                release(request_id)
        return self.outputs(tree, env, kwargs)

    def join_pool(self, key: str, kwargs: dict[str, Any]) -> ForkPool | None:
        """The step's fork pool of this worker (`algorithm.carl.fork_pool`; training rows only), joined under `key`."""
        settings = self.settings.fork_pool
        if settings is None or not self.pooled:
            return None
        share = self.carl.n_forks if self.mode == "tree" else settings.group
        pool = POOLS.get(int(kwargs.get("global_steps", 0) or 0), settings, share)
        pool.join(key)
        return pool

    def join_tail(self, kwargs: dict[str, Any]) -> TailBoost | None:
        """The step's straggler boost of this worker (`algorithm.carl.tail_forks_in_flight`; training trees only)."""
        if not self.settings.tail_forks_in_flight or self.mode != "tree" or not self.pooled:
            return None
        step = int(kwargs.get("global_steps", 0) or 0)
        boost = TAILS.get(step, self.settings.tail_forks_in_flight, self.settings.tail_share)
        boost.join()
        return boost

    def outputs(self, tree: RolloutTree, env: SearchEnvironment, kwargs: dict[str, Any]) -> list[AgentLoopOutput]:
        """One `AgentLoopOutput` per `layout_rows` row; a tree without any action gives one all-masked row."""
        a = pack_trees([tree])
        # A tree trains no action for a leaf without outcome (tool_error), nor a sample of a rollout that ended without
        # one (weight count - lost); a chain (GRPO, validation) keeps verl's rows. A stop has no tokens to train.
        counted = compute_has_value(a.parent, a.has_outcome, a.weight) & (a.weight > 0) if self.mode == "tree" else None
        trained = compute_trained_mask(a.parent, self.update_set, counted, a.num_tokens > 0).tolist()
        if self.mode == "tree" and self.settings.packing == "tree":  # one row per tree (recipe.carl.packing)
            rows = pack_tree(tree, trained, packing_budget(self.config, len(tree.prompt_ids)))
        else:
            rows = layout_rows(tree, trained)
        if not rows:  # e.g. prompt_too_long: one row of one masked token, so verl still sees the tree
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            prompt = tree.prompt_ids[-self.prompt_length :]
            rows = [TrainingRow(tree.leaves()[0], prompt, [pad], [0], [0.0], [[-1, 1]])]
        step = int(kwargs.get("global_steps", 0) or 0)
        dumped = self.mode == "tree" and self.settings.dump_every > 0 and step % self.settings.dump_every == 0
        # Every node's action kind (search, answer, ...: per-kind metrics), and on dumped steps its text.
        description = describe_tree(tree, info_keys=("kind", "text") if dumped else ("kind",))
        description["reward_info"] = [env.breakdown(tree, i) for i in range(len(tree.nodes))]
        description["search"] = dataclasses.asdict(env.searches)
        description["in_flight"] = IN_FLIGHT.snapshot(env.global_step)
        description["pool"] = self.pool_record
        if dumped:
            description["question"] = (kwargs.get("extra_info") or {}).get("question") or tree_question(kwargs)
        steps = env.global_steps or [step]
        common = {"min_global_steps": min(steps), "max_global_steps": max(steps), "carl_mode": self.mode}
        metrics = AgentLoopMetrics(
            generate_sequences=env.timing["generate"], tool_calls=env.timing["tool"], compute_score=env.timing["score"]
        )
        outputs = []
        for i, row in enumerate(rows):
            outputs.append(
                AgentLoopOutput(
                    prompt_ids=row.prompt_ids,
                    response_ids=row.response_ids,
                    response_mask=row.response_mask,
                    response_logprobs=row.rollout_log_probs,
                    reward_score=tree.nodes[row.leaf].reward,
                    num_turns=2 * tree.nodes[row.leaf].depth + 1,
                    metrics=metrics,
                    extra_fields={
                        **common,
                        "carl_tree_id": tree.uid,
                        "carl_token_nodes": row.token_nodes,
                        "carl_leaf": row.leaf,
                        "carl_tree": description if i == 0 else None,
                        "reward_extra_info": env.breakdown(tree, row.leaf) or {},
                        **({RUNS_KEY: row.tree_runs} if isinstance(row, PackedRow) else {}),
                    },
                )
            )
        return outputs


def tree_question(kwargs: dict[str, Any]) -> str:
    """The last user message of the row's prompt (for dumps when `extra_info.question` is missing)."""
    users = [m.get("content", "") for m in kwargs.get("raw_prompt") or [] if m.get("role") == "user"]
    return str(users[-1]) if users else ""


@register(AUTO_AGENT)
class _AutoAgentLoop(CarlAgentLoop):
    """`carl_agent` with default arguments (the agent-loop yaml registers the same name with its own)."""


@register(CHAIN_AGENT)
class CarlChainAgentLoop(CarlAgentLoop):
    """`carl_chain_agent`: one trajectory per session, every action trained (validation, evaluation)."""

    def __init__(self, *args, mode: str = "chain", **kwargs):
        super().__init__(*args, mode=mode, **kwargs)


__all__ = [
    "CarlAgentLoop",
    "CarlChainAgentLoop",
    "SearchEnvironment",
    "SearchError",
    "ToolAccessor",
    "ToolSearcher",
    "resolve_accessor",
    "resolve_searcher",
]
