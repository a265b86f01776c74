"""HTTP front end for ``Retriever``: Search-R1's ``/retrieve`` protocol on FastAPI, with request batching.

Protocol (the same as Search-R1's ``retrieval_server.py``, so its clients and verl's v0.7.1 SearchTool work)::

    POST /retrieve {"queries": ["q1", ...], "topk": 3, "return_scores": true}
      -> {"result": [[{"document": {"id": "...", "contents": "Title\\ntext"}, "score": 12.3}, ...], ...]}
    with "return_scores": false (Search-R1's default) each entry is the bare document:
      -> {"result": [[{"id": "...", "contents": "Title\\ntext"}, ...], ...]}
    GET /health -> {"status": "ok", "backend": "bm25", "num_docs": 10033, "default_topk": 3}

``topk`` may be omitted or null (the server's ``--topk`` is used). Searching is CPU work, so it never runs on the event
loop: concurrent requests are queued, gathered for up to ``batch_wait_ms`` (at most ``max_batch`` queries), searched
together in one worker thread, and answered individually. Batching matters for the dense backend, whose encoder is
much faster on a batch; for BM25 it mostly keeps the event loop free for health checks while searches run.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from recipe.carl.search.retriever import Retriever

logger = logging.getLogger(__name__)

__all__ = ["PortInUseError", "RetrieveRequest", "bind_socket", "create_app", "serve", "serve_in_thread"]

SearchFn = Callable[[Sequence[str], int], list[list[dict[str, Any]]]]


class PortInUseError(OSError):
    """The requested port is taken; the message names it."""


class RetrieveRequest(BaseModel):
    """Body of ``POST /retrieve``."""

    queries: list[str]
    topk: int | None = Field(default=None, ge=1, le=1000)
    return_scores: bool = False


@dataclass
class _Pending:
    queries: list[str]
    topk: int
    future: asyncio.Future


class _Batcher:
    """Gathers concurrent requests into one search call that runs in a worker thread."""

    def __init__(self, search_fn: SearchFn, max_batch: int, wait_s: float):
        self.search_fn = search_fn
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()

    async def submit(self, queries: list[str], topk: int) -> list[list[dict[str, Any]]]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(queries, topk, future))
        return await future

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            if self.wait_s > 0:
                await asyncio.sleep(self.wait_s)
            size = len(batch[0].queries)
            while size < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
                size += len(batch[-1].queries)
            await self._process(batch)

    async def _process(self, batch: list[_Pending]) -> None:
        queries = [q for item in batch for q in item.queries]
        # One search at the largest topk serves every request: a smaller topk is a prefix of the same ranking.
        topk = max(item.topk for item in batch)
        try:
            results = await asyncio.to_thread(self.search_fn, queries, topk)
        except Exception as e:  # forwarded to each waiting request, which turns it into an HTTP 500
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        start = 0
        for item in batch:
            rows = [row[: item.topk] for row in results[start : start + len(item.queries)]]
            start += len(item.queries)
            if not item.future.done():  # the client may have disconnected and cancelled it
                item.future.set_result(rows)


def create_app(
    retriever: Retriever | None = None,
    *,
    search_fn: SearchFn | None = None,
    default_topk: int = 3,
    max_batch: int = 256,
    batch_wait_ms: float = 2.0,
    info: dict[str, Any] | None = None,
) -> FastAPI:
    """Builds the FastAPI app.

    Args:
        retriever: The retriever to serve.
        search_fn: Instead of a retriever, any function ``(queries, topk) -> per-query lists of
            {"document", "score"}`` (used by tests to inject slow or failing searches).
        default_topk: topk for requests that do not give one.
        max_batch: Most queries gathered into one search call.
        batch_wait_ms: How long the batcher waits for more requests after the first one.
        info: Extra fields for ``GET /health``.

    Returns:
        The app; start it with uvicorn, ``serve`` or ``serve_in_thread``.
    """
    if (retriever is None) == (search_fn is None):
        raise ValueError("pass exactly one of retriever or search_fn")
    fn: SearchFn = search_fn or retriever.search_documents  # type: ignore[union-attr]
    health: dict[str, Any] = {"status": "ok", "default_topk": default_topk}
    if retriever is not None:
        health.update(backend=retriever.config.backend, num_docs=retriever.num_docs)
    health.update(info or {})
    batcher = _Batcher(fn, max_batch=max_batch, wait_s=batch_wait_ms / 1000)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        # The batcher's queue and task must belong to the server's own event loop, hence created here.
        batcher.queue = asyncio.Queue()
        task = asyncio.create_task(batcher.run())
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
    async def retrieve(request: RetrieveRequest) -> dict[str, Any]:
        if not request.queries:
            return {"result": []}
        try:
            rows = await batcher.submit(request.queries, request.topk or default_topk)
        except Exception as e:
            logger.exception("search failed for %d queries", len(request.queries))
            raise HTTPException(status_code=500, detail=f"search failed: {type(e).__name__}: {e}") from e
        if request.return_scores:
            return {"result": rows}
        return {"result": [[hit["document"] for hit in row] for row in rows]}

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """Binds a listening-ready TCP socket; port 0 asks the OS for a free one.

    Raises:
        PortInUseError: The port is taken; the message names it and suggests ``--port 0``.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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
        Path(port_file).write_text(f"{bound_port}\n", encoding="utf-8")
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
