"""CARL's tree rollout (Alg. 1) as a verl agent loop: one `run()` grows, scores and flattens one prompt's tree.

Registered as `carl_agent` (training rows: a tree under `algorithm.adv_estimator=carl`, one trajectory per session
under GRPO or any other estimator, so one parquet serves every method), `carl_tree_agent` (always a tree) and
`carl_chain_agent` (one trajectory: validation rows) through `recipe/carl/config/carl_agent_loop.yaml` and, by the
plugin, through verl's `register`.

One `run()`::

    prompt ──> RolloutTree ──grow_tree (N0 root rollouts, then N forks in waves of k)──> scored tree
           ──flatten_trees──> rows ──> list[AgentLoopOutput]   (verl stores them as `{uid}_{session}_{i}`)

`SearchEnvironment.step` is one agent turn: generate from the state's prefix through `LLMServerClient.generate`
(one request id per tree, so a server's prefix cache sees every fork of the tree), stop at `</search>`,
`</answer>` or EOS, parse the turn, run the search and append the `<information>...</information>` observation.
A leaf ends on an answer, at T_max, or with a recorded reason: `prompt_too_long`, `context_overflow` (no room left
in `rollout.response_length`), `action_too_long` (the turn used its whole token budget without an action),
`invalid:<reason>` (a malformed action, see `recipe.carl.search.actions`), `tool_error`, `empty_generation`.

What each row carries (`extra_fields`):

- `carl_advantages`: per response token, A(e) of the action it belongs to if the row trains it, else 0;
- `carl_leaf_reward`: the reward of the leaf whose path the row follows (verl overwrites `reward_score` of every
  output but the last with the last one's, so the CARL trainer restores `rm_scores` from this);
- `carl_tree`: the whole tree (`RolloutTree.to_dict`) on the tree's first row only, `None` elsewhere;
- `reward_extra_info`: the leaf's reward breakdown (verl requires it on the last output once a score is set).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput, register
from verl.trainer.ppo.reward import get_custom_reward_fn

from carl_core import CARLConfig, ForkPlanner, RolloutTree, Step, flatten_trees, grow_tree, score_trees
from recipe.carl.search.actions import STOP_STRINGS, parse_action, render_observation
from recipe.carl.search.reward import compute_score as default_compute_score
from recipe.carl.settings import AUTO_AGENT, CHAIN_AGENT, ESTIMATOR, TREE_AGENT, read_settings

logger = logging.getLogger(__name__)

Searcher = Callable[[str, str], Any]
"""`(query, tree_id) -> observation content` (a rendered string or a list of documents); may be async. `tree_id`
lets a backend cache per tree (forks of one tree repeat its queries)."""


def _tool_searcher(tool: Any) -> Searcher:
    """Adapts a verl tool named `search` (a `BaseTool`, or a `FunctionTool` with `.call`) to a `Searcher`."""
    schema = getattr(tool, "tool_schema", None)
    props = getattr(getattr(getattr(schema, "function", None), "parameters", None), "properties", None) or {}
    arg = "query_list" if "query_list" in props else "query"

    async def search(query: str, tree_id: str) -> Any:
        params = {arg: [query] if arg == "query_list" else query}
        if hasattr(tool, "call"):  # FunctionTool
            result = tool.call(params)
            result = await result if inspect.isawaitable(result) else result
            return getattr(result, "text", result)
        instance_id, _ = await tool.create(create_kwargs={"tree_id": tree_id})
        try:
            response, _, _ = await tool.execute(instance_id, params)
        finally:
            await tool.release(instance_id)
        return response.text or ""

    return search


def resolve_searcher(search: Any, tools: Any) -> Searcher:
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
            return _tool_searcher(tool)
    raise ValueError(
        "the CARL agent loop has no search backend: set actor_rollout_ref.rollout.multi_turn.tool_config_path to "
        "a tool yaml with a tool named `search`, or give the agent-loop yaml entry a `search:` object."
    )


class SearchEnvironment:
    """carl_core's `Environment` for a Search-R1-style agent served by verl's LLM servers."""

    def __init__(
        self,
        loop: CarlTreeAgentLoop,
        sampling_params: dict[str, Any],
        request_id: str,
        data_source: str,
        ground_truth: Any,
        extra_info: Any,
    ) -> None:
        self.loop = loop
        self.request_id = request_id
        self.data_source, self.ground_truth, self.extra_info = data_source, ground_truth, extra_info
        # One turn ends right after its action; the closing tag must stay in the tokens the policy is trained on.
        self.sampling_params = {
            **sampling_params,
            "stop": list(STOP_STRINGS),
            "include_stop_str_in_output": True,
            "logprobs": True,  # the sampled tokens' log-probs: h(a) (Eq. 8) and rollout_log_probs
        }
        self.leaf_info: dict[int, dict[str, float]] = {}
        self.global_steps: list[int] = []
        self.timing = {"generate": 0.0, "tool": 0.0, "score": 0.0}

    async def step(self, tree: RolloutTree, node_id: int) -> Step:
        prefix = tree.prefix_ids(node_id)
        used = len(prefix) - len(tree.prompt_ids)
        max_tokens = min(self.loop.max_action_tokens, self.loop.response_length - used)
        if max_tokens < 1:
            return Step((), (), finish_reason="context_overflow")
        start = time.perf_counter()
        output = await self.loop.server_manager.generate(
            request_id=self.request_id,
            prompt_ids=prefix,
            sampling_params={**self.sampling_params, "max_tokens": max_tokens},
        )
        self.timing["generate"] += time.perf_counter() - start
        steps = [output.extra_fields.get(k) for k in ("min_global_steps", "max_global_steps")]
        self.global_steps += [s for s in steps if s is not None]
        tokens = list(output.token_ids)
        if not tokens:
            return Step((), (), finish_reason="empty_generation")
        if output.log_probs is None or len(output.log_probs) != len(tokens):
            raise ValueError(
                "the LLM server returned no per-token log-probs; CARL needs them for the state entropy "
                "(keep actor_rollout_ref.rollout.calculate_log_probs=true and a server that honours logprobs)."
            )
        log_probs = [min(float(lp), 0.0) for lp in output.log_probs]
        text = self.loop.tokenizer.decode(tokens, skip_special_tokens=True)
        action = parse_action(text)
        info: dict[str, Any] = {"kind": action.kind}
        if action.kind == "answer":
            return Step(tokens, log_probs, done=True, finish_reason="answer", info={**info, "answer": action.answer})
        if action.kind == "invalid":
            reason = "action_too_long" if len(tokens) >= max_tokens else f"invalid:{action.reason}"
            return Step(tokens, log_probs, done=True, finish_reason=reason, info={**info, "reason": action.reason})
        info["query"] = action.query
        if tree.nodes[node_id].depth + 1 >= tree.max_actions:
            return Step(tokens, log_probs, info=info)  # the T_max-th action ends the trajectory: no search needed
        start = time.perf_counter()
        try:
            result = self.loop.searcher(action.query, self.request_id)
            content = await result if inspect.isawaitable(result) else result
            observation = render_observation(content)
        except Exception as error:  # a failing tool ends this leaf only; the step goes on
            logger.warning("search failed for %r: %s", action.query, error)
            info["error"] = f"{type(error).__name__}: {error}"
            return Step(tokens, log_probs, done=True, finish_reason="tool_error", info=info)
        finally:
            self.timing["tool"] += time.perf_counter() - start
        obs_ids = self.loop.tokenizer.encode(observation, add_special_tokens=False)
        return Step(tokens, log_probs, observation_ids=obs_ids, info=info)

    async def score(self, tree: RolloutTree, leaf_id: int) -> float:
        start = time.perf_counter()
        response = tree.prefix_ids(leaf_id)[len(tree.prompt_ids) :]
        solution = self.loop.tokenizer.decode(response, skip_special_tokens=True)
        result = self.loop.reward_fn(
            data_source=self.data_source,
            solution_str=solution,
            ground_truth=self.ground_truth,
            extra_info=self.extra_info,
        )
        result = await result if inspect.isawaitable(result) else result
        info = dict(result) if isinstance(result, dict) else {"score": result}
        self.leaf_info[leaf_id] = {k: float(v) for k, v in info.items() if isinstance(v, (int, float))}
        self.timing["score"] += time.perf_counter() - start
        return float(info["score"])


class CarlTreeAgentLoop(AgentLoopBase):
    """Grows one CARL tree per prompt and returns one `AgentLoopOutput` per training row.

    Args (besides verl's `AgentLoopBase` ones; set them in the agent-loop yaml):
        mode: "auto" (`carl_agent`, what training rows name: "tree" under `algorithm.adv_estimator=carl`, "chain"
            under any other estimator), "tree" (CARL: `algorithm.carl` as given; refused under another estimator,
            which would get `rollout.n` whole trees per prompt) or "chain" (one trajectory, every action trained:
            the GRPO baseline with `rollout.n` sessions, and validation).
        max_action_tokens: token budget of one agent turn (also capped by what is left of `rollout.response_length`).
        search: the search backend (`Searcher` or object with `.search`); default: the verl tool named `search`.
        tools: verl's loaded tools (passed by the agent-loop worker).
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
        mode: str = "tree",
        max_action_tokens: int = 512,
        search: Any = None,
        tools: Any = None,
        **kwargs,
    ):
        super().__init__(
            trainer_config, server_manager, tokenizer, processor, dataset_cls, data_config, hf_model_type, **kwargs
        )
        mode = resolve_mode(mode, self.config.algorithm.adv_estimator)
        carl = read_settings(self.config).carl
        # A chain is a tree with one rollout and no fork; "all" trains each of its actions (mask 1).
        self.carl: CARLConfig = carl if mode == "tree" else dataclasses.replace(carl, n0=1, n_forks=0, update_set="all")
        self.mode = mode
        self.max_action_tokens = int(max_action_tokens)
        self.prompt_length = int(self.rollout_config.prompt_length)
        self.response_length = int(self.rollout_config.response_length)
        self.searcher = resolve_searcher(search, tools)
        self.reward_fn = get_custom_reward_fn(self.config) or default_compute_score

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> list[AgentLoopOutput]:
        messages = list(kwargs["raw_prompt"])
        prompt_ids = await self.loop.run_in_executor(
            None, lambda: self.continuous_token_builder.build_initial_tokens(messages)
        )
        reward_model = kwargs.get("reward_model") or {}
        env = SearchEnvironment(
            self,
            sampling_params,
            request_id=uuid.uuid4().hex,
            data_source=kwargs.get("data_source", ""),
            ground_truth=reward_model.get("ground_truth"),
            extra_info=kwargs.get("extra_info"),
        )
        uid = f"{kwargs.get('uid', '')}_{kwargs.get('session_id', 0)}"
        tree = RolloutTree(prompt_ids, self.carl.max_actions, uid=uid)
        if len(prompt_ids) > self.prompt_length:
            # verl would left-truncate the prompt (losing the instructions); CARL ends the tree at its root instead.
            logger.warning("prompt of %d tokens > rollout.prompt_length=%d", len(prompt_ids), self.prompt_length)
            tree.terminate(tree.root.id, "prompt_too_long")
            tree.set_reward(tree.root.id, await env.score(tree, tree.root.id))
        else:
            # One generator per tree: with `selection: random` the trees of a batch must not draw the same forks.
            await grow_tree(tree, ForkPlanner(self.carl, random.Random(f"{self.carl.seed}:{uid}")), env)
        return self._outputs(tree, env, kwargs)

    def _outputs(self, tree: RolloutTree, env: SearchEnvironment, kwargs: dict[str, Any]) -> list[AgentLoopOutput]:
        """One `AgentLoopOutput` per `flatten_trees` row; a tree without any action gives one all-masked row."""
        scored = score_trees([tree], self.carl)
        rows = flatten_trees([tree], scored)
        steps = env.global_steps or [int(kwargs.get("global_steps", 0) or 0)]
        metrics = AgentLoopMetrics(
            generate_sequences=env.timing["generate"], tool_calls=env.timing["tool"], compute_score=env.timing["score"]
        )
        common = {"min_global_steps": min(steps), "max_global_steps": max(steps), "carl_mode": self.mode}
        outputs = []
        for i, row in enumerate(rows):
            reward = tree.nodes[row.leaf].reward
            num_actions = len(tree.path(row.leaf)) - 1
            outputs.append(
                AgentLoopOutput(
                    prompt_ids=row.prompt_ids,
                    response_ids=row.response_ids,
                    response_mask=row.response_mask,
                    response_logprobs=row.rollout_log_probs,
                    reward_score=reward,
                    num_turns=2 * num_actions + 1,
                    metrics=metrics,
                    extra_fields={
                        **common,
                        "carl_advantages": row.advantages,
                        "carl_leaf": row.leaf,
                        "carl_leaf_reward": reward,
                        "carl_tree": tree.to_dict() if i == 0 else None,
                        "reward_extra_info": env.leaf_info.get(row.leaf, {}),
                    },
                )
            )
        if not outputs:  # no action was generated (e.g. prompt_too_long): one row that trains nothing
            leaf = tree.leaves()[0]
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            outputs.append(
                AgentLoopOutput(
                    prompt_ids=tree.prompt_ids[-self.prompt_length :],
                    response_ids=[pad],
                    response_mask=[0],
                    response_logprobs=[0.0],
                    reward_score=tree.nodes[leaf].reward,
                    num_turns=1,
                    metrics=metrics,
                    extra_fields={
                        **common,
                        "carl_advantages": [0.0],
                        "carl_leaf": leaf,
                        "carl_leaf_reward": tree.nodes[leaf].reward,
                        "carl_tree": tree.to_dict(),
                        "reward_extra_info": env.leaf_info.get(leaf, {}),
                    },
                )
            )
        return outputs


def resolve_mode(mode: str, adv_estimator: str) -> str:
    """The agent loop's mode under `algorithm.adv_estimator`: "auto" follows the estimator.

    Raises:
        ValueError: for an unknown mode, or a tree under a non-CARL estimator (it would train on rollout.n trees).
    """
    if mode not in ("auto", "tree", "chain"):
        raise ValueError(
            f"mode={mode!r} is unknown: use 'auto' (follows algorithm.adv_estimator), 'tree' (CARL) or 'chain' "
            "(GRPO baseline, validation)."
        )
    if mode == "auto":
        return "tree" if adv_estimator == ESTIMATOR else "chain"
    if mode == "tree" and adv_estimator != ESTIMATOR:
        raise ValueError(
            f"agent loop {TREE_AGENT} grows CARL trees, but algorithm.adv_estimator={adv_estimator}: the data rows' "
            f"agent_name column selects it. Name {AUTO_AGENT} in the training rows (the preprocessing default: a tree "
            f"under carl, one trajectory under any other estimator) or {CHAIN_AGENT}."
        )
    return mode


@register(AUTO_AGENT)
class CarlAgentLoop(CarlTreeAgentLoop):
    """`carl_agent`: a CARL tree under `algorithm.adv_estimator=carl`, one trajectory under any other estimator."""

    def __init__(self, *args, mode: str = "auto", **kwargs):
        super().__init__(*args, mode=mode, **kwargs)


@register(TREE_AGENT)
class _RegisteredTreeLoop(CarlTreeAgentLoop):
    """`carl_tree_agent` with default arguments (the agent-loop yaml registers the same name with its own)."""


@register(CHAIN_AGENT)
class CarlChainAgentLoop(CarlTreeAgentLoop):
    """`carl_chain_agent`: one trajectory per session, every action trained (GRPO baseline, validation)."""

    def __init__(self, *args, mode: str = "chain", **kwargs):
        super().__init__(*args, mode=mode, **kwargs)


__all__ = ["CarlAgentLoop", "CarlChainAgentLoop", "CarlTreeAgentLoop", "SearchEnvironment", "resolve_searcher"]
