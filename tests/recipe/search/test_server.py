"""Retrieval server: request limits, per-query failure isolation, fair batching, TCP_NODELAY, the CLI's home."""

from __future__ import annotations

import ast
import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from recipe.carl.search import server as server_mod
from recipe.carl.search.client import RetrievalClient, RetrievalError
from recipe.carl.search.server import _Job, _Scheduler, bind_socket, serve_in_thread

REPO_ROOT = Path(__file__).resolve().parents[3]


def echo_search(queries, topk):
    return [[{"document": {"id": q, "contents": f"{q}\ntext"}, "score": 1.0}] for q in queries]


# --------------------------------------------------------------------------------------------------- limits


def test_too_many_queries_is_413_naming_the_limit():
    with serve_in_thread(search_fn=echo_search, max_queries=4) as url:
        assert httpx.post(f"{url}/retrieve", json={"queries": ["q"] * 4}).status_code == 200
        response = httpx.post(f"{url}/retrieve", json={"queries": ["q"] * 5})
        health = httpx.get(f"{url}/health").json()
    assert response.status_code == 413
    assert response.json()["detail"].startswith("5 queries in one request; this server takes at most 4 (--max-queries)")
    assert health["max_queries"] == 4


def test_too_long_query_is_422_naming_the_limit():
    with serve_in_thread(search_fn=echo_search, max_query_chars=10) as url:
        assert httpx.post(f"{url}/retrieve", json={"queries": ["x" * 10]}).status_code == 200
        response = httpx.post(f"{url}/retrieve", json={"queries": ["ok", "x" * 11]})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("query 1 has 11 characters; this server takes at most 10")
    assert "(--max-query-chars)" in response.json()["detail"]


def test_the_client_reports_a_limit_at_once_without_retrying():
    async def ask(url):
        client = RetrievalClient(url, max_retries=3, backoff=5.0)  # a retry would take 5 s
        try:
            await client.search(["a", "b", "c"])
        finally:
            await client.aclose()

    with serve_in_thread(search_fn=echo_search, max_queries=2) as url:
        with pytest.raises(RetrievalError, match="HTTP 413.*at most 2 \\(--max-queries\\)") as caught:
            asyncio.run(ask(url))
    assert caught.value.kind == "http" and caught.value.attempts == 1


def test_cli_takes_the_limits_as_flags_and_refuses_nonsense(capsys):
    args = server_mod.build_arg_parser().parse_args(
        ["--corpus", "c.jsonl", "--max-queries", "7", "--max-query-chars", "99", "--max-batch", "5"]
    )
    assert (args.max_queries, args.max_query_chars, args.max_batch) == (7, 99, 5)
    defaults = server_mod.build_arg_parser().parse_args(["--corpus", "c.jsonl"])
    assert (defaults.max_queries, defaults.max_query_chars) == (1024, 8192)
    with pytest.raises(SystemExit) as exc:
        server_mod.main(["--corpus", "c.jsonl", "--max-queries", "0"])
    assert exc.value.code == 2 and "--max-queries must be >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- failures


def test_a_failing_query_fails_only_its_own_request():
    calls = []

    def search(queries, topk):
        calls.append(list(queries))
        if "boom" in queries:
            raise RuntimeError("encoder exploded")
        return echo_search(queries, topk)

    async def fire(url):
        async with httpx.AsyncClient() as client:
            bodies = [{"queries": ["a1", "boom", "a2"]}, {"queries": ["b"]}, {"queries": ["c1", "c2"]}]
            return await asyncio.gather(*(client.post(f"{url}/retrieve", json=body) for body in bodies))

    with serve_in_thread(search_fn=search, batch_wait_ms=200) as url:  # the wait gathers the three requests
        bad, good_b, good_c = asyncio.run(fire(url))
    assert len(calls[0]) == 6  # they were searched as one batch, which failed ...
    assert bad.status_code == 500
    assert bad.json()["detail"] == "search failed for query 1 ('boom'): RuntimeError: encoder exploded"
    assert good_b.status_code == good_c.status_code == 200  # ... and the others still got their documents
    assert [row[0]["id"] for row in good_b.json()["result"]] == ["b"]
    assert [row[0]["id"] for row in good_c.json()["result"]] == ["c1", "c2"]


def test_a_search_that_returns_the_wrong_number_of_rows_is_an_error():
    with serve_in_thread(search_fn=lambda queries, topk: [], batch_wait_ms=0) as url:
        response = httpx.post(f"{url}/retrieve", json={"queries": ["q"]})
    assert response.status_code == 500 and "returned 0 result lists for 1 queries" in response.json()["detail"]


# --------------------------------------------------------------------------------------------------- fairness


def make_jobs(sizes: list[int]) -> list[_Job]:
    loop = asyncio.new_event_loop()
    jobs = [
        _Job([f"j{j}q{i}" for i in range(n)], 3, loop.create_future(), rows=[None] * n) for j, n in enumerate(sizes)
    ]
    loop.close()
    return jobs


def test_batches_give_small_requests_their_whole_share_and_split_the_rest():
    scheduler = _Scheduler(echo_search, max_batch=64, wait_s=0)
    big, small, medium = make_jobs([3000, 2, 40])
    scheduler.active = [big, small, medium]
    parts = scheduler.take()
    taken = {id(job): end - start for job, start, end in parts}
    assert taken == {id(big): 31, id(small): 2, id(medium): 31}  # small whole; 62 left split between two
    assert scheduler.active == [big, medium]
    assert [end - start for _, start, end in scheduler.take()] == [55, 9]  # medium finishes, big takes the rest


def test_more_requests_than_batch_room_get_one_query_each_oldest_first():
    scheduler = _Scheduler(echo_search, max_batch=4, wait_s=0)
    jobs = make_jobs([3, 1, 1, 1, 1, 1])
    scheduler.active = list(jobs)
    assert [job for job, _, _ in scheduler.take()] == jobs[:4]
    assert [job for job, _, _ in scheduler.take()] == [jobs[0], jobs[4], jobs[5]]  # jobs[0] went to the back


def test_cancelled_requests_are_dropped_from_the_queue():
    scheduler = _Scheduler(echo_search, max_batch=8, wait_s=0)
    gone, kept = make_jobs([100, 1])
    gone.future.cancel()
    scheduler.active = [gone, kept]
    assert [(job, start, end) for job, start, end in scheduler.take()] == [(kept, 0, 1)]


def test_a_small_request_is_answered_while_a_large_one_is_still_being_searched():
    batches: list[list[str]] = []
    first_batch = threading.Event()

    def search(queries, topk):
        batches.append(list(queries))
        first_batch.set()
        time.sleep(0.01)  # 25 batches of the large request take >= 0.25 s; the small one is posted after the first
        return echo_search(queries, topk)

    with serve_in_thread(search_fn=search, max_batch=8) as url:
        big = threading.Thread(
            target=lambda: httpx.post(f"{url}/retrieve", json={"queries": [f"big{i}" for i in range(200)]}, timeout=60)
        )
        big.start()
        assert first_batch.wait(10)
        small = httpx.post(f"{url}/retrieve", json={"queries": ["small"]}, timeout=60)
        big.join()
    assert small.json()["result"][0][0]["id"] == "small"
    assert all(len(batch) <= 8 for batch in batches)
    assert sum(len(batch) for batch in batches) == 201
    with_small = next(i for i, batch in enumerate(batches) if "small" in batch)
    assert with_small < len(batches) - 5  # served between chunks of the large request, not after all of it


# --------------------------------------------------------------------------------------------------- transport


def test_accepted_connections_have_tcp_nodelay():
    """asyncio sets TCP_NODELAY only when the listening socket's proto says TCP (without it: ~45 ms per request)."""
    sock = bind_socket("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    nodelay = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport):
            nodelay.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def accept_one():
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        for _ in range(200):
            if nodelay:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(accept_one())
    assert nodelay and nodelay[0] != 0


# --------------------------------------------------------------------------------------------------- module layout


def test_retriever_does_not_import_the_server():
    tree = ast.parse((REPO_ROOT / "recipe" / "carl" / "search" / "retriever.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any("server" in name for name in imported if name), imported


def test_the_old_cli_entry_names_the_new_one():
    done = subprocess.run(
        [sys.executable, "-m", "recipe.carl.search.retriever", "--corpus", "x.jsonl"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "python -m recipe.carl.search.server --corpus" in done.stderr


def test_the_retrieval_clients_connections_have_tcp_nodelay():
    """The other side of the ~45 ms stall: RetrievalClient's httpx connections must not use Nagle's algorithm either."""

    async def nodelay_of(url):
        client = RetrievalClient(url)
        try:
            response = await client._client().get(f"{url}/health")  # the client's own pool and settings
            sock = response.extensions["network_stream"].get_extra_info("socket")
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            await client.aclose()

    with serve_in_thread(search_fn=echo_search) as url:
        assert asyncio.run(nodelay_of(url)) != 0
