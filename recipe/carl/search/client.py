"""Async client for a Search-R1-protocol retriever, with bounded retries and an optional per-tree cache.

This module has no verl dependency: the CARL agent loop calls ``RetrievalClient.search`` directly, and
``search_tool.CarlSearchTool`` wraps the same client for verl's tool machinery.

Retry policy: a request is tried at most ``1 + max_retries`` times, each with ``timeout`` seconds; between tries the
client sleeps ``backoff * 2**attempt`` seconds (capped at ``max_backoff``). Connection errors, timeouts, HTTP 429 and
5xx are retried; other 4xx and malformed responses are not (retrying cannot fix them). The worst-case latency of one
call is therefore bounded by ``(1 + max_retries) * timeout`` plus the backoff sleeps.

Connections: one client keeps up to ``max_connections`` connections open, all of them kept alive between bursts.
httpx's defaults (100 connections, 20 kept alive) fit CARL badly: an agent-loop worker's N0 phase sends
N0 x trees-per-worker searches at once (8 x 16 = 128 with the 7B script and verl's 8 agent-loop workers), so 28 of
them would wait for a connection inside their own timeout, and 108 connections would close after each burst and
reconnect for the next. The default, 256, holds a burst of twice that.

Per-tree cache: CARL forks a trajectory into sibling branches that share a prefix. When two branches send the same
query, they should read the same documents, and the retriever should not be asked twice. ``SearchCache`` keys results
by (tree id, query, topk); the agent loop passes its tree id as ``cache_key`` and calls ``SearchCache.drop`` when the
tree is done (older trees are evicted beyond ``max_trees`` anyway). Failed searches are not cached, so a transient
failure does not poison a whole tree.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx

from recipe.carl.search.actions import split_contents

logger = logging.getLogger(__name__)

__all__ = [
    "Document",
    "Page",
    "RetrievalClient",
    "RetrievalError",
    "SearchCache",
    "parse_access_response",
    "parse_retrieve_response",
]

ErrorKind = Literal["connect", "timeout", "http", "bad_response"]


@dataclass(frozen=True)
class Document:
    """One retrieved passage."""

    contents: str
    """"Title\\ntext", as stored in the corpus."""
    id: str | None = None
    score: float | None = None

    @property
    def title(self) -> str:
        return split_contents(self.contents)[0]

    @property
    def text(self) -> str:
        return split_contents(self.contents)[1]


@dataclass(frozen=True)
class Page:
    """A whole page as ``POST /access`` returns it (``recipe.carl.search.pages``)."""

    id: str
    """The page's canonical id (its first passage's)."""
    contents: str
    """"Title\\ntext": every passage of the page, in order."""

    @property
    def title(self) -> str:
        return split_contents(self.contents)[0]

    @property
    def text(self) -> str:
        return self.contents.partition("\n")[2].strip()


class RetrievalError(RuntimeError):
    """A search that failed after all retries; ``kind`` says how (connect, timeout, http, bad_response)."""

    def __init__(self, kind: ErrorKind, message: str, attempts: int = 1):
        super().__init__(message)
        self.kind = kind
        self.attempts = attempts


def _parse_document(item: Any, where: str) -> Document:
    score = None
    if isinstance(item, Mapping) and "document" in item:  # {"document": {...}, "score": s}
        score = item.get("score")
        if score is not None and not isinstance(score, int | float):
            raise RetrievalError("bad_response", f"{where}: score must be a number, got {score!r:.60}")
        item = item["document"]
    if not isinstance(item, Mapping):
        raise RetrievalError("bad_response", f"{where}: expected a document object, got {item!r:.80}")
    contents = item.get("contents")
    if contents is None and ("title" in item or "text" in item):
        contents = f"{item.get('title', '')}\n{item.get('text', '')}"
    if not isinstance(contents, str):
        raise RetrievalError("bad_response", f"{where}: document has no 'contents' string: {dict(item)!r:.120}")
    doc_id = item.get("id")
    return Document(contents=contents, id=None if doc_id is None else str(doc_id), score=score)


def parse_retrieve_response(payload: Any, num_queries: int) -> list[list[Document]]:
    """Validates a ``/retrieve`` response body (with or without scores) and converts it to ``Document`` lists.

    Raises:
        RetrievalError: kind "bad_response", naming what is wrong.
    """
    if not isinstance(payload, Mapping) or not isinstance(payload.get("result"), list):
        raise RetrievalError("bad_response", f"response has no 'result' list: {payload!r:.120}")
    rows = payload["result"]
    if len(rows) != num_queries:
        raise RetrievalError("bad_response", f"response has {len(rows)} result lists for {num_queries} queries")
    parsed = []
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise RetrievalError("bad_response", f"result[{i}] is not a list: {row!r:.80}")
        parsed.append([_parse_document(item, f"result[{i}][{j}]") for j, item in enumerate(row)])
    return parsed


def parse_access_response(payload: Any, num_ids: int) -> list[Page | None]:
    """Validates a ``/access`` response body (ASearcher's shape: one page object or null per id).

    Raises:
        RetrievalError: kind "bad_response", naming what is wrong.
    """
    if not isinstance(payload, Mapping) or not isinstance(payload.get("result"), list):
        raise RetrievalError("bad_response", f"access response has no 'result' list: {payload!r:.120}")
    rows = payload["result"]
    if len(rows) != num_ids:
        raise RetrievalError("bad_response", f"access response has {len(rows)} results for {num_ids} ids")
    pages: list[Page | None] = []
    for i, row in enumerate(rows):
        if row is None:
            pages.append(None)
            continue
        if not isinstance(row, Mapping) or not isinstance(row.get("contents"), str):
            raise RetrievalError("bad_response", f"result[{i}] is neither null nor a page with 'contents': {row!r:.99}")
        pages.append(Page(id=str(row.get("id", row.get("url", ""))), contents=row["contents"]))
    return pages


class SearchCache:
    """Per-tree memo of search results, LRU-bounded by the number of trees."""

    def __init__(self, max_trees: int = 4096):
        self.max_trees = max_trees
        # Per tree: (query, topk) -> documents, and ("\0access", id) -> page or None.
        self._trees: OrderedDict[Hashable, dict[tuple[str, Any], Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _query_key(query: str, topk: int) -> tuple[str, int]:
        return " ".join(query.split()), topk

    def get(self, tree: Hashable, query: str, topk: int) -> list[Document] | None:
        entries = self._trees.get(tree)
        docs = None if entries is None else entries.get(self._query_key(query, topk))
        if docs is None:
            self.misses += 1
            return None
        self._trees.move_to_end(tree)
        self.hits += 1
        return docs

    def put(self, tree: Hashable, query: str, topk: int, docs: list[Document]) -> None:
        entries = self._trees.setdefault(tree, {})
        self._trees.move_to_end(tree)
        entries[self._query_key(query, topk)] = docs
        while len(self._trees) > self.max_trees:
            self._trees.popitem(last=False)

    def get_page(self, tree: Hashable, page_id: str) -> Page | None | bool:
        """The cached answer of an access (a page, or None for an unknown id), False when not cached."""
        entries = self._trees.get(tree)
        key = ("\0access", page_id)  # cannot collide with a search key: (query, topk) has an int second
        if entries is None or key not in entries:
            self.misses += 1
            return False
        self._trees.move_to_end(tree)
        self.hits += 1
        return entries[key]  # type: ignore[return-value]

    def put_page(self, tree: Hashable, page_id: str, page: Page | None) -> None:
        entries = self._trees.setdefault(tree, {})
        self._trees.move_to_end(tree)
        entries[("\0access", page_id)] = page  # type: ignore[index]
        while len(self._trees) > self.max_trees:
            self._trees.popitem(last=False)

    def drop(self, tree: Hashable) -> None:
        """Forgets a finished tree."""
        self._trees.pop(tree, None)

    def __len__(self) -> int:
        return len(self._trees)


class RetrievalClient:
    """Calls ``POST /retrieve``; safe to share between coroutines, and between event loops (one HTTP pool each)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000/retrieve",
        *,
        topk: int = 3,
        timeout: float = 30.0,
        max_retries: int = 2,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        cache: SearchCache | None = None,
        max_connections: int = 256,
    ):
        """Args:
        url: The ``/retrieve`` endpoint; a bare ``http://host:port`` gets ``/retrieve`` appended.
        topk: Documents per query when ``search`` is not given one.
        timeout: Seconds per attempt (connect + read).
        max_retries: Extra attempts after the first (0 = no retry).
        backoff: First sleep between attempts, doubled each time.
        max_backoff: Cap on one sleep.
        cache: Optional per-tree cache used when ``search`` gets a ``cache_key``.
        max_connections: Connections open at once, all kept alive (the module docstring says why).
        """
        if max_retries < 0 or timeout <= 0 or topk < 1 or max_connections < 1:
            raise ValueError(
                f"need max_retries >= 0, timeout > 0, topk >= 1, max_connections >= 1; got {max_retries}, {timeout}, "
                f"{topk}, {max_connections}"
            )
        url = url.rstrip("/")
        self.url = url if httpx.URL(url).path not in ("", "/") else f"{url}/retrieve"
        self.topk = topk
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.cache = cache
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None

    def _client(self) -> httpx.AsyncClient:
        # An httpx.AsyncClient belongs to the event loop it first ran on; verl may call tools from several loops.
        # Its connections (anyio over asyncio) get TCP_NODELAY, which small requests need (tests/recipe/search).
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:
            self._http = httpx.AsyncClient(timeout=self.timeout, limits=self.limits)
            self._http_loop = loop
        return self._http

    async def aclose(self) -> None:
        if self._http is not None and self._http_loop is asyncio.get_running_loop():
            await self._http.aclose()
        self._http = self._http_loop = None

    async def _post(self, url: str, body: dict[str, Any]) -> Any:
        """POSTs ``body`` to ``url`` with the retry policy of the module docstring; returns the decoded JSON."""
        last: RetrievalError | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            try:
                response = await self._client().post(url, json=body)
            except httpx.TimeoutException as e:
                last = RetrievalError("timeout", f"{url} timed out after {self.timeout}s ({type(e).__name__})")
                continue
            except httpx.TransportError as e:
                last = RetrievalError("connect", f"cannot reach {url}: {type(e).__name__}: {e}")
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = RetrievalError("http", f"{url} answered HTTP {response.status_code}: {response.text:.200}")
                continue
            if response.status_code != 200:
                raise RetrievalError(
                    "http", f"{url} answered HTTP {response.status_code}: {response.text:.200}", attempt + 1
                )
            try:
                return response.json()
            except ValueError as e:
                raise RetrievalError("bad_response", f"{url} sent non-JSON: {response.text:.120}", attempt + 1) from e
        assert last is not None
        last.attempts = self.max_retries + 1
        raise last

    async def _request(self, queries: list[str], topk: int) -> list[list[Document]]:
        payload = await self._post(self.url, {"queries": queries, "topk": topk, "return_scores": True})
        return parse_retrieve_response(payload, len(queries))

    @property
    def access_url(self) -> str:
        """The server's ``/access`` endpoint: ``url`` with its last path segment (``retrieve``) replaced."""
        url = httpx.URL(self.url)
        return str(url.copy_with(path=url.path.rsplit("/", 1)[0] + "/access"))

    async def access(self, ids: Sequence[str], cache_key: Hashable | None = None) -> list[Page | None]:
        """The pages holding the passages with these ids (``POST /access``; the retry policy of ``search``).

        Args:
            ids: Passage ids, as search results show them.
            cache_key: Tree id for the per-tree cache (a page is read several times along a tree); None bypasses it.

        Returns:
            One page per id, or None where the server knows no such id.

        Raises:
            RetrievalError: After the retries are spent, or at once for a 4xx (e.g. a page over the server's
                ``--max-page-chars``, or a server without ``--pages``) or a malformed response.
        """
        if isinstance(ids, str):
            raise TypeError("access() takes a list of ids")
        ids = [str(i) for i in ids]
        use_cache = self.cache is not None and cache_key is not None
        results: list[Page | None | bool] = [False] * len(ids)  # False: not looked up yet (None is a real answer)
        if use_cache:
            results = [self.cache.get_page(cache_key, i) for i in ids]  # type: ignore[union-attr]
        missing = [k for k, r in enumerate(results) if r is False]
        if missing:
            payload = await self._post(self.access_url, {"urls": [ids[k] for k in missing]})
            for k, page in zip(missing, parse_access_response(payload, len(missing)), strict=True):
                results[k] = page
                if use_cache:
                    self.cache.put_page(cache_key, ids[k], page)  # type: ignore[union-attr]
        return [r if isinstance(r, Page) else None for r in results]

    async def search(
        self,
        queries: Sequence[str],
        topk: int | None = None,
        cache_key: Hashable | None = None,
        stats: dict[str, int] | None = None,
    ) -> list[list[Document]]:
        """Retrieves up to ``topk`` documents for each query.

        Args:
            queries: The queries; one HTTP request carries all of them (cache hits are left out).
            topk: Documents per query; default ``self.topk``.
            cache_key: Tree id for the per-tree cache; None bypasses the cache.
            stats: If given, receives ``cache_hits`` (queries answered from the cache in this call).

        Returns:
            One list of documents per query, best first.

        Raises:
            RetrievalError: After the retries are spent, or at once for a 4xx or a malformed response.
        """
        if isinstance(queries, str):  # a bare string would otherwise be searched character by character
            raise TypeError("search() takes a list of queries; use search_one(query) for a single string")
        topk = topk or self.topk
        queries = list(queries)
        use_cache = self.cache is not None and cache_key is not None
        results: list[list[Document] | None] = [None] * len(queries)
        if use_cache:
            results = [self.cache.get(cache_key, q, topk) for q in queries]  # type: ignore[union-attr]
        missing = [i for i, r in enumerate(results) if r is None]
        if stats is not None:
            stats["cache_hits"] = len(queries) - len(missing)
        if missing:
            fetched = await self._request([queries[i] for i in missing], topk)
            for i, docs in zip(missing, fetched, strict=True):
                results[i] = docs
                if use_cache:
                    self.cache.put(cache_key, queries[i], topk, docs)  # type: ignore[union-attr]
        return [r or [] for r in results]

    async def search_one(
        self, query: str, topk: int | None = None, cache_key: Hashable | None = None
    ) -> list[Document]:
        """``search`` for a single query: its documents, best first (raises ``RetrievalError`` like ``search``)."""
        return (await self.search([query], topk=topk, cache_key=cache_key))[0]

    async def health(self) -> dict[str, Any]:
        """``GET /health`` of the server (one attempt, no retry)."""
        url = str(httpx.URL(self.url).copy_with(path="/health"))
        started = time.perf_counter()
        response = await self._client().get(url)
        response.raise_for_status()
        return {**response.json(), "latency_s": time.perf_counter() - started}


RETRIEVER_WAIT_ENV = "CARL_RETRIEVER_WAIT_S"
"""Seconds a start-up check keeps retrying a retriever that does not answer yet (default 0: fail at once)."""
WAIT_EVERY_S = 5.0
"""Seconds between two tries of `until_it_answers`."""


def retriever_wait_s(environ: Mapping[str, str] | None = None) -> float:
    """`CARL_RETRIEVER_WAIT_S` as seconds (0 when unset).

    Raises:
        ValueError: naming the variable, when it is not a number >= 0.
    """
    import os

    text = (os.environ if environ is None else environ).get(RETRIEVER_WAIT_ENV, "") or "0"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:  # also NaN
        raise ValueError(f"{RETRIEVER_WAIT_ENV}={text!r}: give seconds >= 0 (e.g. 600; 0 = do not wait).")
    return value


T = TypeVar("T")


def until_it_answers(
    check: Callable[[], T], url: str, wait_s: float, log: Callable[[str], None], every_s: float | None = None
) -> T:
    """`check()`'s result, retried every `every_s` for up to `wait_s` seconds while it raises (a retriever that is
    still loading its index, or not started yet); the last error is raised once the time is up (`every_s` defaults
    to `WAIT_EVERY_S`)."""
    every_s = WAIT_EVERY_S if every_s is None else every_s
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return check()
        except Exception:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            log(f"the retriever at {url} does not answer yet; trying again for {left:.0f} s ({RETRIEVER_WAIT_ENV})")
            time.sleep(min(every_s, left))
