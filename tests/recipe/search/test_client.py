"""The start-up wait for a retriever that does not answer yet (`CARL_RETRIEVER_WAIT_S`), used by `main_carl`'s
preflight and by `recipe.carl.evaluate`, and the client's connection pool at CARL's burst. (The client's requests are
tested with the tool in test_search_tool.py.)"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading

import pytest

from recipe.carl.search import client
from recipe.carl.search.client import RETRIEVER_WAIT_ENV, retriever_wait_s, until_it_answers


@pytest.mark.parametrize(("value", "seconds"), [(None, 0.0), ("", 0.0), ("0", 0.0), ("12.5", 12.5), ("600", 600.0)])
def test_wait_seconds_from_the_environment(value, seconds):
    assert retriever_wait_s({} if value is None else {RETRIEVER_WAIT_ENV: value}) == seconds


@pytest.mark.parametrize("value", ["-1", "ten", "nan", "1e"])
def test_a_bad_wait_names_the_variable(value):
    with pytest.raises(ValueError, match=rf"{RETRIEVER_WAIT_ENV}='{value}': give seconds >= 0"):
        retriever_wait_s({RETRIEVER_WAIT_ENV: value})


def flaky(failures: int):
    """A check that raises `failures` times, then answers."""
    calls = []

    def check():
        calls.append(1)
        if len(calls) <= failures:
            raise ConnectionError(f"refused #{len(calls)}")
        return {"status": "ok"}

    return check, calls


def test_a_retriever_that_answers_late_is_waited_for():
    check, calls = flaky(2)
    messages = []
    assert until_it_answers(check, "http://h:1/retrieve", 5.0, messages.append, every_s=0.01) == {"status": "ok"}
    assert len(calls) == 3 and len(messages) == 2
    assert all("http://h:1/retrieve does not answer yet" in m and RETRIEVER_WAIT_ENV in m for m in messages)


def test_without_a_wait_the_first_error_is_raised_at_once():
    check, calls = flaky(1)
    messages = []
    with pytest.raises(ConnectionError, match="refused #1"):
        until_it_answers(check, "u", 0.0, messages.append, every_s=0.01)
    assert len(calls) == 1 and messages == []


def test_the_last_error_is_raised_when_the_time_is_up(monkeypatch):
    monkeypatch.setattr(client, "WAIT_EVERY_S", 0.01)  # the default interval is read when called
    check, calls = flaky(10**6)
    with pytest.raises(ConnectionError) as error:
        until_it_answers(check, "u", 0.1, lambda message: None)
    assert 2 <= len(calls) < 100 and str(error.value) == f"refused #{len(calls)}"


# ---- connections: CARL's burst ----------------------------------------------------------------------------------

#: CARL's burst per agent-loop worker with the 7B script: N0 = 8 trajectories x 16 trees (128 questions a step over
#: verl's 8 agent-loop workers), each searching at its first turn.
BURST = 8 * 16


class BarrierServer(http.server.ThreadingHTTPServer):
    """Answers `/retrieve` only once `BURST` requests are in flight at the same time (each waits at a barrier)."""

    request_queue_size = 2 * BURST  # the listen backlog: a burst connects at once
    daemon_threads = True

    def __init__(self, parties: int):
        self.barrier = threading.Barrier(parties, timeout=20)
        super().__init__(("127.0.0.1", 0), BarrierHandler)


class BarrierHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        queries = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["queries"]
        try:
            self.server.barrier.wait()
        except threading.BrokenBarrierError:
            self.send_error(503)
            return
        body = json.dumps({"result": [[{"document": {"id": "0", "contents": "T\nx"}, "score": 1.0}]] * len(queries)})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_one_client_holds_carls_whole_burst_in_flight():
    """httpx's default pool (100 connections) would hold 28 of the 128 searches back until the others return, and
    the others wait for them: every search would time out. The client's own limit lets all 128 be in flight."""
    server = BarrierServer(BURST)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    retrieval = client.RetrievalClient(f"http://127.0.0.1:{server.server_port}", timeout=15, max_retries=0)
    assert retrieval.limits.max_connections >= BURST and retrieval.limits.max_keepalive_connections >= BURST

    async def burst():
        try:
            return await asyncio.gather(*(retrieval.search_one(f"q{i}") for i in range(BURST)), return_exceptions=True)
        finally:
            await retrieval.aclose()

    try:
        results = asyncio.run(burst())
    finally:
        server.shutdown()
        server.server_close()
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert all(r[0].contents == "T\nx" for r in results)


def test_a_bad_connection_limit_is_refused():
    with pytest.raises(ValueError, match="max_connections >= 1"):
        client.RetrievalClient(max_connections=0)
