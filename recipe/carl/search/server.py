"""The retrieval server: Search-R1's ``/retrieve`` protocol on FastAPI over a ``Retriever``, and its CLI.

Protocol (the same as Search-R1's ``retrieval_server.py``, so its clients and verl's v0.7.1 SearchTool work)::

    POST /retrieve {"queries": ["q1", ...], "topk": 3, "return_scores": true}
      -> {"result": [[{"document": {"id": "...", "contents": "Title\\ntext"}, "score": 12.3}, ...], ...]}
    with "return_scores": false (Search-R1's default) each entry is the bare document:
      -> {"result": [[{"id": "...", "contents": "Title\\ntext"}, ...], ...]}
    GET /health -> {"status": "ok", "backend": "bm25", "num_docs": 10033, "default_topk": 3,
                    "max_queries": 1024, "max_query_chars": 8192}   (+ "pages": 3512 with --pages)

``topk`` may be omitted or null (the server's ``--topk`` is used).

Pages (``--pages``; the paper's `access` action, ``recipe.carl.search.pages``). The request and response have the
shape of ASearcher's local server (``tools/local_retrieval_server.py``: ``POST /access {"urls": [...]}`` answering
``{"result": [page or null, ...]}``, read by its client as ``result["contents"]``); here a "url" is the id of any
passage of the page, as a search result shows it::

    POST /access {"urls": ["17", "nope"]}
      -> {"result": [{"url": "17", "id": "15", "title": "T", "contents": "T\\nwhole page", "passages": 4}, null]}

An unknown id answers ``null`` (the agent named a page that does not exist). A page longer than ``--max-page-chars``
answers HTTP 413 naming it; more ids than ``--max-queries`` HTTP 413, an id longer than ``--max-query-chars`` HTTP
422, and a server started without ``--pages`` HTTP 404 naming the flag. ``/retrieve`` is unchanged.

Limits (each names itself and its flag in the error):

* a request with more than ``--max-queries`` queries gets HTTP 413; a query longer than ``--max-query-chars``
  characters gets HTTP 422. Both bound the work one request can ask for; neither bounds the body's bytes (put a
  reverse proxy in front of a server that faces untrusted clients).

Scheduling: searching is CPU work, so it never runs on the event loop. Requests are queued; a scheduler takes at most
``--max-batch`` queries at a time, shared fairly between the waiting requests (a request with few queries goes whole,
the rest of the batch is split equally among the larger ones), searches them in one worker thread and hands each
request its rows when all of its queries are done. A request with 3,000 queries is therefore searched in chunks that
interleave with everyone else's, and a small request waits for at most about one batch, not for the whole large
request (``benchmarks/bench_retriever.py`` measures it). Batching matters for the dense backend, whose encoder is much
faster on a batch; ``--batch-wait-ms`` makes an idle server wait that long for company (default 0: under load
batches form by themselves while the previous one runs).

Failures are per query: when a batch raises, its queries are searched one by one, and only the requests whose own
queries fail get HTTP 500 (naming the query); the others are answered normally.

Latency: the listening socket is created with ``IPPROTO_TCP``, so asyncio sets ``TCP_NODELAY`` on every accepted
connection (it skips sockets whose ``proto`` is 0). Without it a small search over a reused connection took ~45 ms
(Nagle's algorithm against the client's delayed ACK) instead of ~3 ms. httpx sets ``TCP_NODELAY`` on the client side.

CLI::

    python -m recipe.carl.search.server --corpus data/wiki.jsonl --port 8000
    python -m recipe.carl.search.server --corpus data/wiki.jsonl --backend dense \\
        --encoder intfloat/e5-base-v2 --query-prefix "query: " --doc-prefix "passage: " --index-type ivf --fp16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from recipe.carl.io import write_text
from recipe.carl.search.pages import PageStore
from recipe.carl.search.retriever import Retriever, RetrieverConfig, RetrieverError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_PAGE_CHARS",
    "DEFAULT_MAX_QUERIES",
    "DEFAULT_MAX_QUERY_CHARS",
    "AccessRequest",
    "PortInUseError",
    "QueryFailedError",
    "RetrieveRequest",
    "bind_socket",
    "build_arg_parser",
    "config_from_args",
    "create_app",
    "main",
    "serve",
    "serve_in_thread",
]

SearchFn = Callable[[Sequence[str], int], list[list[dict[str, Any]]]]

#: Most queries in one request (HTTP 413 above). Rollouts send one query per request; evaluation may batch.
DEFAULT_MAX_QUERIES = 1024
#: Longest query in characters (HTTP 422 above). A 512-token action is ~2-3k characters.
DEFAULT_MAX_QUERY_CHARS = 8192
#: Most queries searched together: bounds how long a small request waits behind a large one.
DEFAULT_MAX_BATCH = 64
#: Longest page served by `/access`, in characters (HTTP 413 above); wiki-18's largest articles are a few 100k.
DEFAULT_MAX_PAGE_CHARS = 1_000_000


class PortInUseError(OSError):
    """The requested port is taken; the message names it."""


class QueryFailedError(RuntimeError):
    """One query of a request failed; ``index`` is its position in the request."""

    def __init__(self, index: int, query: str, error: BaseException):
        super().__init__(f"search failed for query {index} ({query!r:.80}): {type(error).__name__}: {error}")
        self.index = index


class RetrieveRequest(BaseModel):
    """Body of ``POST /retrieve``."""

    queries: list[str]
    topk: int | None = Field(default=None, ge=1, le=1000)
    return_scores: bool = False


class AccessRequest(BaseModel):
    """Body of ``POST /access``: ids of passages whose pages are wanted (named ``urls`` as ASearcher's field)."""

    urls: list[str]


@dataclass(eq=False)
class _Job:
    """One request's queries, the next one to schedule, and its rows as they come back."""

    queries: list[str]
    topk: int
    future: asyncio.Future
    next: int = 0
    done: int = 0
    rows: list[list[dict[str, Any]] | None] = field(default_factory=list)

    @property
    def unscheduled(self) -> int:
        return len(self.queries) - self.next


class _Scheduler:
    """Searches the queries of concurrent requests in fair batches of at most ``max_batch``, one batch at a time."""

    def __init__(self, search_fn: SearchFn, max_batch: int, wait_s: float):
        if max_batch < 1:
            raise ValueError(f"max_batch (--max-batch) must be >= 1, got {max_batch}")
        self.search_fn = search_fn
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.active: list[_Job] = []  # jobs with unscheduled queries, in arrival order
        self.wakeup: asyncio.Event | None = None

    async def submit(self, queries: list[str], topk: int) -> list[list[dict[str, Any]]]:
        job = _Job(queries, topk, asyncio.get_running_loop().create_future(), rows=[None] * len(queries))
        self.active.append(job)
        assert self.wakeup is not None, "the scheduler runs inside the app's lifespan"
        self.wakeup.set()
        return await job.future

    def take(self) -> list[tuple[_Job, int, int]]:
        """The next batch as (job, start, end) slices: small jobs whole, the rest sharing what is left equally."""
        self.active = [job for job in self.active if not job.future.done()]  # cancelled or failed: drop the rest
        if not self.active:
            return []
        capacity = self.max_batch
        if len(self.active) >= capacity:  # more requests than room: one query each, oldest first
            shares = {id(job): 1 for job in self.active[:capacity]}
        else:
            shares = {}
            left = len(self.active)
            for job in sorted(self.active, key=lambda j: j.unscheduled):  # stable: arrival order among equals
                share = min(job.unscheduled, capacity // left)
                shares[id(job)] = share
                capacity -= share
                left -= 1
        parts = []
        for job in self.active:
            share = shares.get(id(job), 0)
            if share:
                parts.append((job, job.next, job.next + share))
                job.next += share
        self.active = [job for job in self.active if job.unscheduled]
        return parts

    async def run(self) -> None:
        assert self.wakeup is not None
        while True:
            if not self.active:
                self.wakeup.clear()
                await self.wakeup.wait()
                if self.wait_s > 0:
                    await asyncio.sleep(self.wait_s)
            parts = self.take()
            if parts:
                await self._process(parts)

    async def _search(self, queries: list[str], topk: int) -> list[list[dict[str, Any]]]:
        rows = await asyncio.to_thread(self.search_fn, queries, topk)
        if len(rows) != len(queries):
            raise RuntimeError(f"search returned {len(rows)} result lists for {len(queries)} queries")
        return rows

    async def _process(self, parts: list[tuple[_Job, int, int]]) -> None:
        queries = [q for job, start, end in parts for q in job.queries[start:end]]
        # One search at the largest topk serves every request: a smaller topk is a prefix of the same ranking.
        topk = max(job.topk for job, _, _ in parts)
        try:
            rows = await self._search(queries, topk)
        except Exception as e:
            if len(parts) == 1 and parts[0][2] - parts[0][1] == 1:
                job, start, _ = parts[0]
                self._fail(job, start, e)
                return
            # Isolate the failure: search one query at a time, so only the requests that own a failing query fail.
            logger.warning(
                "a batch of %d queries failed (%s: %s); retrying them one by one", len(queries), type(e).__name__, e
            )
            for job, start, end in parts:
                for i in range(start, end):
                    if job.future.done():
                        break
                    try:
                        (row,) = await self._search([job.queries[i]], topk)
                    except Exception as query_error:
                        self._fail(job, i, query_error)
                        break
                    self._deliver(job, i, [row])
            return
        offset = 0
        for job, start, end in parts:
            self._deliver(job, start, rows[offset : offset + end - start])
            offset += end - start

    @staticmethod
    def _deliver(job: _Job, start: int, rows: list[list[dict[str, Any]]]) -> None:
        if job.future.done():  # the client went away, or another of its queries failed
            return
        job.rows[start : start + len(rows)] = [row[: job.topk] for row in rows]
        job.done += len(rows)
        if job.done == len(job.queries):
            job.future.set_result(job.rows)

    @staticmethod
    def _fail(job: _Job, index: int, error: BaseException) -> None:
        logger.error("query %d of a request failed: %s: %s", index, type(error).__name__, error)
        if not job.future.done():
            job.future.set_exception(QueryFailedError(index, job.queries[index], error))


def _check_ids(ids: Sequence[str], max_queries: int, max_query_chars: int) -> None:
    """Refuses an `/access` request with too many ids (413) or an overlong one (422), naming the flag."""
    if len(ids) > max_queries:
        raise HTTPException(
            status_code=413,
            detail=f"{len(ids)} ids in one request; this server takes at most {max_queries} (--max-queries)",
        )
    for i, doc_id in enumerate(ids):
        if len(doc_id) > max_query_chars:
            raise HTTPException(
                status_code=422,
                detail=f"id {i} has {len(doc_id)} characters; this server takes at most {max_query_chars} "
                "(--max-query-chars)",
            )


def _page_entries(pages: PageStore, ids: Sequence[str], max_page_chars: int) -> list[dict[str, Any] | None]:
    """`/access`'s answer: per id its page (ASearcher's `contents`, plus its canonical id, title and passage count)
    or None for an unknown id; a page over `max_page_chars` refuses the request (413, naming it)."""
    result: list[dict[str, Any] | None] = []
    for doc_id in ids:
        page = pages.get(doc_id)
        if page is not None and len(page.text) > max_page_chars:
            raise HTTPException(
                status_code=413,
                detail=f"the page of id {doc_id!r} ({page.title!r}) has {len(page.text)} characters; this server "
                f"returns at most {max_page_chars} (--max-page-chars)",
            )
        result.append(
            None
            if page is None
            else {
                "url": doc_id,
                "id": page.id,
                "title": page.title,
                "contents": page.contents,
                "passages": len(page.passage_ids),
            }
        )
    return result


def _add_access_route(
    app: FastAPI, pages: PageStore | None, max_queries: int, max_query_chars: int, max_page_chars: int
) -> None:
    """``POST /access`` (module docstring): whole pages by the id of any of their passages."""

    @app.post("/access")
    async def access(request: AccessRequest) -> JSONResponse:
        if pages is None:
            raise HTTPException(
                status_code=404,
                detail="this server has no page store: restart it with --pages (the corpus's passages are grouped "
                "into pages) to serve the access action",
            )
        _check_ids(request.urls, max_queries, max_query_chars)
        # Joining a page's passages is CPU work: off the event loop.
        return JSONResponse({"result": await asyncio.to_thread(_page_entries, pages, request.urls, max_page_chars)})


def create_app(
    retriever: Retriever | None = None,
    *,
    search_fn: SearchFn | None = None,
    default_topk: int = 3,
    max_batch: int = DEFAULT_MAX_BATCH,
    batch_wait_ms: float = 0.0,
    max_queries: int = DEFAULT_MAX_QUERIES,
    max_query_chars: int = DEFAULT_MAX_QUERY_CHARS,
    info: dict[str, Any] | None = None,
    pages: PageStore | None = None,
    max_page_chars: int = DEFAULT_MAX_PAGE_CHARS,
) -> FastAPI:
    """Builds the FastAPI app.

    Args:
        retriever: The retriever to serve.
        search_fn: Instead of a retriever, any function ``(queries, topk) -> per-query lists of
            {"document", "score"}`` (used by tests to inject slow or failing searches).
        default_topk: topk for requests that do not give one.
        max_batch: Most queries searched together (see the module docstring: it bounds a small request's wait).
        batch_wait_ms: How long an idle server waits for more requests before searching.
        max_queries: Most queries in one request; more get HTTP 413.
        max_query_chars: Longest query in characters; longer get HTTP 422.
        info: Extra fields for ``GET /health``.
        pages: The page store served by ``POST /access`` (None: the endpoint answers 404 naming ``--pages``).
        max_page_chars: Longest page ``/access`` returns; longer get HTTP 413.

    Returns:
        The app; start it with uvicorn, ``serve`` or ``serve_in_thread``.
    """
    if (retriever is None) == (search_fn is None):
        raise ValueError("pass exactly one of retriever or search_fn")
    if max_queries < 1 or max_query_chars < 1 or max_page_chars < 1:
        raise ValueError(
            f"max_queries, max_query_chars and max_page_chars must be >= 1, got {max_queries}, {max_query_chars}, "
            f"{max_page_chars}"
        )
    fn: SearchFn = search_fn or retriever.search_documents  # type: ignore[union-attr]
    health: dict[str, Any] = {"status": "ok", "default_topk": default_topk}
    if retriever is not None:
        health.update(backend=retriever.config.backend, num_docs=retriever.num_docs)
    health.update(max_queries=max_queries, max_query_chars=max_query_chars)
    health.update({"pages": len(pages)} if pages is not None else {}, **(info or {}))
    scheduler = _Scheduler(fn, max_batch=max_batch, wait_s=batch_wait_ms / 1000)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        # The scheduler's event and task must belong to the server's own event loop, hence created here.
        scheduler.wakeup = asyncio.Event()
        task = asyncio.create_task(scheduler.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(title="CARL retriever", lifespan=lifespan)

    @app.get("/health")
    async def get_health() -> dict[str, Any]:
        return health

    @app.post("/retrieve")
    async def retrieve(request: RetrieveRequest) -> JSONResponse:
        queries = request.queries
        if len(queries) > max_queries:
            raise HTTPException(
                status_code=413,
                detail=f"{len(queries)} queries in one request; this server takes at most {max_queries} "
                "(--max-queries): split the request",
            )
        for i, query in enumerate(queries):
            if len(query) > max_query_chars:
                raise HTTPException(
                    status_code=422,
                    detail=f"query {i} has {len(query)} characters; this server takes at most {max_query_chars} "
                    "(--max-query-chars): shorten the query",
                )
        if not queries:
            return JSONResponse({"result": []})
        try:
            rows = await scheduler.submit(queries, request.topk or default_topk)
        except QueryFailedError as e:
            raise HTTPException(status_code=500, detail=str(e)) from e
        except Exception as e:
            logger.exception("search failed for %d queries", len(queries))
            raise HTTPException(status_code=500, detail=f"search failed: {type(e).__name__}: {e}") from e
        if not request.return_scores:
            rows = [[hit["document"] for hit in row] for row in rows]
        # A JSONResponse is sent as is; returning the dict would walk every hit through jsonable_encoder first.
        return JSONResponse({"result": rows})

    _add_access_route(app, pages, max_queries, max_query_chars, max_page_chars)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """Binds a listening-ready TCP socket; port 0 asks the OS for a free one.

    The socket is created with ``IPPROTO_TCP``: asyncio sets ``TCP_NODELAY`` only on sockets whose ``proto`` says TCP,
    and accepted connections inherit it from this one.

    Raises:
        PortInUseError: The port is taken; the message names it and suggests ``--port 0``.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # SO_REUSEADDR only skips TIME_WAIT after a restart; a port another process listens on still fails below.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(
                errno.EADDRINUSE,
                f"port {port} on {host} is already in use: stop the process holding it, choose another --port, "
                "or pass --port 0 to pick a free one",
            ) from e
        raise
    sock.set_inheritable(True)
    return sock


def _make_server(app: FastAPI, log_level: str) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level.lower(), lifespan="on", access_log=False))


def serve(
    retriever: Retriever,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    port_file: str | None = None,
    log_level: str = "info",
    **app_kwargs: Any,
) -> None:
    """Runs the server in the foreground until interrupted (the CLI's path)."""
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    server = _make_server(create_app(retriever, **app_kwargs), log_level)
    if port_file:
        write_text(port_file, f"{bound_port}\n")
    print(f"retriever listening on http://{host}:{bound_port}/retrieve", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


@contextlib.contextmanager
def serve_in_thread(
    retriever: Retriever | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout_s: float = 20.0,
    log_level: str = "warning",
    **app_kwargs: Any,
) -> Iterator[str]:
    """Starts the server in a daemon thread for tests and notebooks; yields its base URL and stops it on exit.

    Example::

        with serve_in_thread(retriever) as url:
            httpx.post(f"{url}/retrieve", json={"queries": ["paris"], "topk": 2})

    Args:
        retriever: The retriever (or pass ``search_fn=...`` through ``app_kwargs``).
        host: Interface to bind.
        port: Port; 0 (default) picks a free one.
        startup_timeout_s: How long to wait for the server to accept connections.
        log_level: uvicorn log level.
        **app_kwargs: Passed to ``create_app``.
    """
    sock = bind_socket(host, port)
    server = _make_server(create_app(retriever, **app_kwargs), log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="carl-retriever", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("retriever server thread exited during start-up (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"retriever server did not start within {startup_timeout_s}s")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    defaults = RetrieverConfig(corpus_path="")
    p = argparse.ArgumentParser(
        prog="python -m recipe.carl.search.server",
        description="Serve a local corpus over Search-R1's /retrieve protocol (BM25 or dense).",
    )
    p.add_argument("--corpus", required=True, help="JSONL corpus, one {'id', 'contents': 'Title\\ntext'} per line")
    p.add_argument("--backend", choices=["bm25", "dense"], default=defaults.backend)
    p.add_argument("--index-dir", default=None, help="index cache directory (default: <corpus>.<backend>_index)")
    p.add_argument("--encoder", default=None, help="dense (required): sentence-transformers model, or hash[:dim]")
    p.add_argument("--index-type", choices=["flat", "ivf"], default=defaults.index_type)
    p.add_argument("--fp16", action="store_true", help="dense: store vectors as float16 (half the memory)")
    p.add_argument("--nlist", type=int, default=None, help="dense ivf: number of cells (default 4*sqrt(N))")
    p.add_argument("--nprobe", type=int, default=defaults.nprobe, help="dense ivf: cells searched per query")
    p.add_argument("--query-prefix", default="", help='dense: query prefix, e.g. "query: " for e5')
    p.add_argument("--doc-prefix", default="", help='dense: passage prefix, e.g. "passage: " for e5')
    p.add_argument("--encode-batch-size", type=int, default=defaults.encode_batch_size)
    p.add_argument("--device", default=None, help="dense: encoder device (cuda, cpu)")
    p.add_argument(
        "--hash-corpus", action="store_true", help="no effect (kept for old scripts): the corpus is always hashed"
    )
    p.add_argument("--on-stale", choices=["rebuild", "error"], default=defaults.on_stale)
    p.add_argument("--rebuild", action="store_true", help="rebuild the index even if the cache matches")
    p.add_argument(
        "--no-verify-index",
        action="store_true",
        help="skip the sha256 check of the index files at start-up (sizes and a probe search still run); "
        "for a trusted index of tens of GB, where hashing takes ~1 s per 1.6 GB",
    )
    p.add_argument("--build-only", action="store_true", help="build or check the index, then exit")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed, and see --port-file)")
    p.add_argument("--port-file", default=None, help="write the bound port here once the server listens")
    p.add_argument("--topk", type=int, default=3, help="default topk when a request does not give one")
    p.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help="most queries searched together; a small request waits for at most about one such batch",
    )
    p.add_argument("--batch-wait-ms", type=float, default=0.0, help="how long an idle server gathers requests")
    p.add_argument("--max-queries", type=int, default=DEFAULT_MAX_QUERIES, help="most queries per request (413)")
    p.add_argument(
        "--max-query-chars", type=int, default=DEFAULT_MAX_QUERY_CHARS, help="longest query in characters (422)"
    )
    p.add_argument(
        "--pages",
        action="store_true",
        help="serve POST /access: the corpus's consecutive passages of one title form a page (the paper's access "
        "action, algorithm.carl.action_space=paper)",
    )
    p.add_argument(
        "--max-page-chars",
        type=int,
        default=DEFAULT_MAX_PAGE_CHARS,
        help="longest page /access returns, in characters (413 above)",
    )
    p.add_argument("--log-level", default="info")
    return p


def config_from_args(args: argparse.Namespace) -> RetrieverConfig:
    return RetrieverConfig(
        corpus_path=args.corpus,
        backend=args.backend,
        index_dir=args.index_dir,
        encoder=args.encoder,
        index_type=args.index_type,
        fp16=args.fp16,
        nlist=args.nlist,
        nprobe=args.nprobe,
        query_prefix=args.query_prefix,
        doc_prefix=args.doc_prefix,
        encode_batch_size=args.encode_batch_size,
        device=args.device,
        hash_corpus=args.hash_corpus,
        on_stale=args.on_stale,
        rebuild=args.rebuild,
        verify_index=not args.no_verify_index,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code (2 for a start-up error, printed without a traceback)."""
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    for flag in ("max_batch", "max_queries", "max_query_chars", "topk", "max_page_chars"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        retriever = Retriever.from_config(config_from_args(args))
        logger.info("retriever ready: %s", json.dumps(asdict(retriever.config), default=str))
        pages = PageStore(retriever.corpus) if args.pages else None
        if pages is not None:
            logger.info("page store ready: %d pages", len(pages))
        if args.build_only:
            print(f"index ready: {retriever.config.resolved_index_dir()} ({retriever.num_docs} documents)")
            return 0
        serve(
            retriever,
            host=args.host,
            port=args.port,
            default_topk=args.topk,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
            max_queries=args.max_queries,
            max_query_chars=args.max_query_chars,
            pages=pages,
            max_page_chars=args.max_page_chars,
            port_file=args.port_file,
            log_level=args.log_level,
        )
    except (RetrieverError, PortInUseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
