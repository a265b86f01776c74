"""``CarlSearchTool``: the search environment as a verl 0.9.1 ``BaseTool``.

verl's ``ToolAgentLoop`` calls, for every tool call, ``create(create_kwargs=...)`` then
``execute(instance_id, arguments, agent_data=...)`` then ``release(instance_id)``. ``execute`` never raises: a
retriever that is down, slow or answers garbage gives an error observation for that call, and the returned metrics
count it (``search/error_<kind>``), so one bad call cannot kill a rollout.

Tool yaml (``actor_rollout_ref.rollout.multi_turn.tool_config_path``)::

    tools:
      - class_name: recipe.carl.search.search_tool.CarlSearchTool
        config:
          type: native
          retrieval_service_url: http://127.0.0.1:8000/retrieve
          topk: 3
          timeout: 30
          max_retries: 2
          max_obs_chars: 4000
          max_connections: 256

The schema defaults to a ``search`` function taking ``{"query": str}``; verl v0.7.1's ``{"query_list": [str]}`` is
also accepted. The observation is the plain ``Doc 1 (Title: T) text`` listing; the CARL agent loop wraps it in
``<information>`` with ``actions.render_observation``, and ``ToolAgentLoop`` puts it in a ``tool`` message. For the
paper's action space (``pages_tool.yaml``) ``show_ids: true`` shows each result's id (``Doc 1 (id: 17, Title: T)
text``) and ``snippet_words`` cuts each result's text to a snippet.

``CarlAccessTool`` is the ``access`` tool of the paper's action space: ``{"id": str}`` -> the whole page holding
that passage (``POST /access`` of the same server, ``recipe.carl.search.server``), as ``Title\ntext``; an unknown id
gives an empty text and ``search/page_found`` = 0, a failure ``search/ok`` = 0 and ``search/error_<kind>`` = 1.

Per-tree cache: the cache key is ``create_kwargs["tree_id"]`` (or ``"cache_key"``), else
``agent_data.extra_fields["tree_id"]``; without one, the call is not cached. ``drop_tree(tree_id)`` frees a finished
tree. The cache lives on the tool object, not the instance, because verl creates a new instance for every call.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from uuid import uuid4

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from recipe.carl.search.actions import render_documents
from recipe.carl.search.client import RetrievalClient, RetrievalError, SearchCache

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ACCESS_CONFIG", "DEFAULT_TOOL_CONFIG", "CarlAccessTool", "CarlSearchTool", "default_tool_schema"]

#: Config keys and defaults (verl passes the yaml ``config`` block, which also holds ``type: native``).
DEFAULT_TOOL_CONFIG: dict[str, Any] = {
    "retrieval_service_url": "http://127.0.0.1:8000/retrieve",
    "topk": 3,
    "timeout": 30.0,
    "max_retries": 2,
    "backoff": 0.5,
    "max_obs_chars": 4000,
    "cache": True,
    "cache_max_trees": 4096,
    "max_connections": 256,
    "show_ids": False,
    "snippet_words": None,
}

#: Config keys and defaults of ``CarlAccessTool`` (the URL is the search tool's: ``/access`` of the same server). No
#: cache by default: the CARL agent loop keeps the pages of a tree itself (one environment per tree), so a tool-level
#: cache would only hold pages of finished trees (up to ``cache_max_trees`` of them).
DEFAULT_ACCESS_CONFIG: dict[str, Any] = {
    "retrieval_service_url": "http://127.0.0.1:8000/retrieve",
    "timeout": 30.0,
    "max_retries": 2,
    "backoff": 0.5,
    "cache": False,
    "cache_max_trees": 4096,
}

_ERROR_KINDS = ("connect", "timeout", "http", "bad_response", "invalid_args")


def default_tool_schema() -> OpenAIFunctionToolSchema:
    return OpenAIFunctionToolSchema.model_validate(
        {
            "type": "function",
            "function": {
                "name": "search",
                "description": "Searches a Wikipedia corpus and returns the top passages for the query.",
                "parameters": {
                    "type": "object",
                    "properties": {"query": {"type": "string", "description": "The search query."}},
                    "required": ["query"],
                },
            },
        }
    )


def _queries_from_arguments(parameters: Any) -> list[str]:
    """Accepts ``{"query": str}`` or ``{"query_list": [str, ...]}``; raises ValueError naming the problem."""
    if not isinstance(parameters, dict):
        raise ValueError(f"arguments must be an object, got {type(parameters).__name__}")
    if "query" in parameters:
        raw = [parameters["query"]]
    elif "query_list" in parameters:
        raw = parameters["query_list"]
        if not isinstance(raw, list):
            raise ValueError("'query_list' must be a list of strings")
    else:
        raise ValueError(f"expected a 'query' argument, got {sorted(parameters)}")
    if not raw or not all(isinstance(q, str) and q.strip() for q in raw):
        raise ValueError("every query must be a non-empty string")
    return [" ".join(q.split()) for q in raw]


class CarlSearchTool(BaseTool):
    """Search tool over a Search-R1-protocol retriever (see the module docstring for config and behaviour)."""

    def __init__(self, config: dict, tool_schema: OpenAIFunctionToolSchema | None = None):
        unknown = set(config) - set(DEFAULT_TOOL_CONFIG) - {"type"}
        if unknown:
            raise ValueError(
                f"unknown CarlSearchTool config keys {sorted(unknown)}; known: {sorted(DEFAULT_TOOL_CONFIG)}"
            )
        self.settings = {**DEFAULT_TOOL_CONFIG, **config}
        super().__init__(config, tool_schema or default_tool_schema())
        self.cache = SearchCache(self.settings["cache_max_trees"]) if self.settings["cache"] else None
        self.client = RetrievalClient(
            self.settings["retrieval_service_url"],
            topk=int(self.settings["topk"]),
            timeout=float(self.settings["timeout"]),
            max_retries=int(self.settings["max_retries"]),
            backoff=float(self.settings["backoff"]),
            cache=self.cache,
            max_connections=int(self.settings["max_connections"]),
        )
        self.max_obs_chars = int(self.settings["max_obs_chars"])
        snippet = self.settings["snippet_words"]
        if snippet is not None and (not isinstance(snippet, int) or snippet < 1):
            raise ValueError(f"CarlSearchTool config snippet_words={snippet!r}: give an integer >= 1, or null")
        self.render = {"show_ids": bool(self.settings["show_ids"]), "snippet_words": snippet}
        self._instances: dict[str, Any] = {}

    def get_openai_tool_schema(self) -> OpenAIFunctionToolSchema:
        return self.tool_schema

    async def create(self, instance_id: str | None = None, **kwargs: Any) -> tuple[str, ToolResponse]:
        """Registers one call; ``create_kwargs`` (verl) or plain kwargs may carry ``tree_id``/``cache_key``."""
        instance_id = instance_id or str(uuid4())
        create_kwargs = kwargs.get("create_kwargs") or kwargs
        self._instances[instance_id] = create_kwargs.get("tree_id", create_kwargs.get("cache_key"))
        return instance_id, ToolResponse()

    def _cache_key(self, instance_id: str, agent_data: Any) -> Any:
        key = self._instances.get(instance_id)
        if key is None and agent_data is not None:
            key = (getattr(agent_data, "extra_fields", None) or {}).get("tree_id")
        return key

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[ToolResponse, float, dict[str, Any]]:
        """Runs the search and renders the documents; errors become an observation, never an exception.

        Returns:
            (observation, 0.0 step reward, metrics). Metrics always hold the same keys: ``search/ok``,
            ``search/error_<kind>`` for each kind, ``search/num_queries``, ``search/num_docs``,
            ``search/cache_hits``, ``search/truncated`` and ``search/latency_s``.
        """
        metrics: dict[str, Any] = {"search/ok": 0.0, **{f"search/error_{k}": 0.0 for k in _ERROR_KINDS}}
        metrics.update({"search/num_queries": 0, "search/num_docs": 0, "search/cache_hits": 0, "search/truncated": 0.0})
        started = time.perf_counter()
        stats: dict[str, int] = {}
        try:
            queries = _queries_from_arguments(parameters)
            metrics["search/num_queries"] = len(queries)
            cache_key = self._cache_key(instance_id, kwargs.get("agent_data"))
            results = await self.client.search(queries, cache_key=cache_key, stats=stats)
        except ValueError as e:
            metrics["search/error_invalid_args"] = 1.0
            text = f"Search failed: invalid arguments ({e})."
        except RetrievalError as e:
            metrics[f"search/error_{e.kind}"] = 1.0
            logger.warning("search failed after %d attempt(s): %s", e.attempts, e)
            text = f"Search failed: the retrieval service is unavailable ({e.kind}). No documents were retrieved."
        except Exception as e:  # anything unexpected still must not end the rollout
            metrics["search/error_bad_response"] = 1.0
            logger.exception("unexpected search failure")
            text = f"Search failed: {type(e).__name__}."
        else:
            metrics["search/ok"] = 1.0
            metrics["search/num_docs"] = sum(len(docs) for docs in results)
            if len(queries) == 1:
                text = render_documents(results[0], **self.render)
            else:
                text = "\n\n".join(
                    f'Results for "{q}":\n{render_documents(d, **self.render)}'
                    for q, d in zip(queries, results, strict=True)
                )
        if len(text) > self.max_obs_chars:
            text = text[: max(0, self.max_obs_chars - 3)].rstrip() + "..."
            metrics["search/truncated"] = 1.0
        metrics["search/cache_hits"] = stats.get("cache_hits", 0)
        metrics["search/latency_s"] = time.perf_counter() - started
        return ToolResponse(text=text), 0.0, metrics

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        self._instances.pop(instance_id, None)

    def drop_tree(self, tree_id: Any) -> None:
        """Frees the cached results of a finished tree."""
        if self.cache is not None:
            self.cache.drop(tree_id)


def default_access_schema() -> OpenAIFunctionToolSchema:
    return OpenAIFunctionToolSchema.model_validate(
        {
            "type": "function",
            "function": {
                "name": "access",
                "description": "Opens the whole page holding a search result, by the id the result shows.",
                "parameters": {
                    "type": "object",
                    "properties": {"id": {"type": "string", "description": "The id of a search result."}},
                    "required": ["id"],
                },
            },
        }
    )


class CarlAccessTool(BaseTool):
    """The paper's ``access`` tool: a page by the id of a search result (module docstring)."""

    def __init__(self, config: dict, tool_schema: OpenAIFunctionToolSchema | None = None):
        unknown = set(config) - set(DEFAULT_ACCESS_CONFIG) - {"type"}
        if unknown:
            raise ValueError(
                f"unknown CarlAccessTool config keys {sorted(unknown)}; known: {sorted(DEFAULT_ACCESS_CONFIG)}"
            )
        self.settings = {**DEFAULT_ACCESS_CONFIG, **config}
        super().__init__(config, tool_schema or default_access_schema())
        self.cache = SearchCache(self.settings["cache_max_trees"]) if self.settings["cache"] else None
        self.client = RetrievalClient(
            self.settings["retrieval_service_url"],
            timeout=float(self.settings["timeout"]),
            max_retries=int(self.settings["max_retries"]),
            backoff=float(self.settings["backoff"]),
            cache=self.cache,
        )
        self._instances: dict[str, Any] = {}

    def get_openai_tool_schema(self) -> OpenAIFunctionToolSchema:
        return self.tool_schema

    async def create(self, instance_id: str | None = None, **kwargs: Any) -> tuple[str, ToolResponse]:
        instance_id = instance_id or str(uuid4())
        create_kwargs = kwargs.get("create_kwargs") or kwargs
        self._instances[instance_id] = create_kwargs.get("tree_id", create_kwargs.get("cache_key"))
        return instance_id, ToolResponse()

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[ToolResponse, float, dict[str, Any]]:
        """Fetches the page; errors become metrics, never an exception.

        Returns:
            (``Title\\ntext`` of the page, "" when unknown or failed; 0.0; metrics ``search/ok``,
            ``search/page_found``, ``search/error_<kind>``, ``search/page_chars``, ``search/latency_s``).
        """
        metrics: dict[str, Any] = {"search/ok": 0.0, "search/page_found": 0.0, "search/page_chars": 0}
        metrics.update({f"search/error_{k}": 0.0 for k in _ERROR_KINDS})
        started, text = time.perf_counter(), ""
        try:
            page_id = parameters.get("id") if isinstance(parameters, dict) else None
            if not isinstance(page_id, str) or not page_id.strip():
                raise ValueError(f"expected an 'id' string argument, got {parameters!r:.80}")
            (page,) = await self.client.access([page_id.strip()], cache_key=self._instances.get(instance_id))
        except ValueError as e:
            metrics["search/error_invalid_args"] = 1.0
            text = f"Access failed: invalid arguments ({e})."
        except RetrievalError as e:
            metrics[f"search/error_{e.kind}"] = 1.0
            logger.warning("access failed after %d attempt(s): %s", e.attempts, e)
            text = f"Access failed: {e}"
        else:
            metrics["search/ok"] = 1.0
            if page is not None:
                metrics["search/page_found"], metrics["search/page_chars"] = 1.0, len(page.contents)
                text = page.contents
        metrics["search/latency_s"] = time.perf_counter() - started
        return ToolResponse(text=text), 0.0, metrics

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        self._instances.pop(instance_id, None)

    def drop_tree(self, tree_id: Any) -> None:
        """Frees the cached pages of a finished tree."""
        if self.cache is not None:
            self.cache.drop(tree_id)
