"""The retrieval server over loopback against the same search in process, and small requests beside a large one.

On a synthetic 10k-document corpus (generated deterministically: Zipf-distributed pseudo-words, nothing downloaded),
with the BM25 server started as its CLI runs it (`python -m recipe.carl.search.server`, its own process):

1. in process: `Retriever.search_documents([q], topk)` for single queries (p50, p99);
2. HTTP, one client reusing its connection, single queries: p50, p99, and `ratio` = HTTP p50 / in-process p50
   (target <= 3; before TCP_NODELAY on the server's sockets it was ~45 ms against ~1.3 ms, a ratio of ~35);
3. HTTP, `--requests` single-query requests from `--clients` concurrent clients: errors, p50, p99, requests/s;
4. fairness: while one request of `--large` queries runs, `--small-clients` clients send single queries; their p50
   and p99 against the large request's own duration. The same is measured on a second server that searches a whole
   request at once (`--max-batch` larger than the request: the behaviour before chunked batches);
5. CARL's burst through the recipe's own client (`RetrievalClient`, the search tool's settings: 30 s timeout, 2
   retries, its connection limit): each of `--burst-workers` clients (one per agent-loop worker; verl's default is 8)
   sends `--burst` searches at once (N0 x trees per worker: 8 x 16 = 128 with the 7B script), `--burst-rounds`
   times; first one worker's burst alone, then every worker's at the same moment, as the N0 phase's first turn
   does. Errors (searches that failed after the client's retries), p50 and p99 of a search as its caller waits.

    python -m benchmarks.bench_retriever                # the measured setting (~1-2 min on 2 cores)
    python -m benchmarks.bench_retriever --tiny         # seconds; what the smoke test runs

The last lines are `burst_errors=N` (failed searches in 5), `errors=N` (failed requests in 3) and `ratio=R`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from recipe.carl.io import write_jsonl
from recipe.carl.search.client import RetrievalClient, RetrievalError
from recipe.carl.search.retriever import Retriever, RetrieverConfig
from recipe.carl.search.server import DEFAULT_MAX_BATCH

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_corpus(path: Path, num_docs: int, seed: int = 0, vocab: int = 20_000, words: int = 80) -> list[str]:
    """Writes a deterministic corpus of Zipf-distributed pseudo-words; returns the vocabulary (by frequency rank)."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "gu", "fe", "hi", "jo", "be"]
    vocabulary = []
    for i in range(vocab):
        word, n = "", i + 16
        while n:
            n, r = divmod(n, len(syllables))
            word += syllables[r]
        vocabulary.append(word)
    ranks = np.minimum(rng.zipf(1.2, size=(num_docs, words)), vocab) - 1
    docs = (
        {
            "id": str(i),
            "contents": " ".join(vocabulary[r] for r in doc[:2]).title() + "\n" + " ".join(vocabulary[r] for r in doc),
        }
        for i, doc in enumerate(ranks)
    )
    write_jsonl(path, docs)
    return vocabulary


def make_queries(vocabulary: list[str], n: int, seed: int = 1) -> list[str]:
    """Queries of 2-5 words from the mid-frequency vocabulary (rare enough to rank, common enough to match)."""
    rng = np.random.default_rng(seed)
    pool = vocabulary[20:2000]
    return [" ".join(rng.choice(pool, size=int(rng.integers(2, 6)))) for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def fmt_ms(values: list[float]) -> str:
    return f"p50 {1e3 * percentile(values, 50):7.2f} ms  p99 {1e3 * percentile(values, 99):7.2f} ms  (n={len(values)})"


@contextmanager
def server_process(corpus: Path, work: Path, name: str, *flags: str):
    """The server CLI in its own process (as in production); yields its base URL and the start-up seconds."""
    port_file = work / f"{name}.port"
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "recipe.carl.search.server", "--corpus", str(corpus), "--port", "0",
           "--port-file", str(port_file), "--log-level", "warning", *flags]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"server {name} exited: {proc.stderr.read()}")
            if time.perf_counter() - started > 300:
                raise TimeoutError(f"server {name} did not start within 300 s")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        while True:
            try:
                httpx.get(f"{url}/health", timeout=5).raise_for_status()
                break
            except httpx.TransportError:
                time.sleep(0.05)
        yield url, time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def in_process(retriever: Retriever, queries: list[str], topk: int) -> list[float]:
    times = []
    for query in queries:
        t0 = time.perf_counter()
        retriever.search_documents([query], topk)
        times.append(time.perf_counter() - t0)
    return times


def http_sequential(url: str, queries: list[str], topk: int) -> list[float]:
    times = []
    with httpx.Client(timeout=60) as client:
        client.get(f"{url}/health")  # open the connection first: the timings reuse it
        for query in queries:
            t0 = time.perf_counter()
            client.post(f"{url}/retrieve", json={"queries": [query], "topk": topk}).raise_for_status()
            times.append(time.perf_counter() - t0)
    return times


async def http_concurrent(url: str, queries: list[str], clients: int, topk: int) -> tuple[list[float], int, float]:
    """`len(queries)` single-query requests from `clients` concurrent clients; (latencies, errors, wall seconds).

    Every client is created and connected before the clock starts (creating an httpx client takes tens of ms, which
    would otherwise block the event loop while other clients' requests are being timed).
    """
    pending = list(reversed(queries))
    times: list[float] = []
    errors = 0
    pool = [httpx.AsyncClient(timeout=120) for _ in range(clients)]
    await asyncio.gather(*(client.get(f"{url}/health") for client in pool))

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while pending:
            query = pending.pop()
            t0 = time.perf_counter()
            try:
                response = await client.post(f"{url}/retrieve", json={"queries": [query], "topk": topk})
                ok = response.status_code == 200 and len(response.json()["result"]) == 1
            except httpx.HTTPError:
                ok = False
            times.append(time.perf_counter() - t0)
            errors += not ok

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client_loop(client) for client in pool))
    finally:
        await asyncio.gather(*(client.aclose() for client in pool))
    return times, errors, time.perf_counter() - started


async def small_beside_large(
    url: str, large: list[str], small: list[str], small_clients: int, topk: int
) -> tuple[list[float], float, int]:
    """Small single-query requests while one large request runs: (small latencies, large seconds, errors).

    A small request counts when it starts while the large one is in flight.
    """
    window = [float("inf"), float("inf")]  # start and end of the large request
    done = asyncio.Event()
    spans: list[tuple[float, float]] = []
    errors = 0

    async def large_request() -> None:
        nonlocal errors
        async with httpx.AsyncClient(timeout=600) as client:
            window[0] = time.perf_counter()
            response = await client.post(f"{url}/retrieve", json={"queries": large, "topk": topk})
            window[1] = time.perf_counter()
        errors += response.status_code != 200
        done.set()

    async def small_loop(offset: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(timeout=600) as client:
            await client.get(f"{url}/health")  # connect before the large request starts
            await started.wait()
            i = offset
            while not done.is_set():
                t0 = time.perf_counter()
                response = await client.post(f"{url}/retrieve", json={"queries": [small[i % len(small)]], "topk": topk})
                spans.append((t0, time.perf_counter()))
                errors += response.status_code != 200
                i += small_clients

    started = asyncio.Event()

    async def start_large() -> None:
        task = asyncio.create_task(large_request())
        await asyncio.sleep(0)  # the large request's task runs first, up to sending its body
        started.set()
        await task

    await asyncio.gather(start_large(), *(small_loop(k) for k in range(small_clients)))
    times = [end - t0 for t0, end in spans if window[0] <= t0 <= window[1]]
    return times, window[1] - window[0], errors


async def carl_burst(
    url: str, queries: list[str], workers: int, burst: int, rounds: int, topk: int
) -> tuple[list[float], int, list[float]]:
    """`rounds` times, `workers` clients (one per agent-loop worker) each send `burst` searches at once through the
    recipe's `RetrievalClient`; (latency of every search, failed searches, wall seconds of each round).

    The clients are connected before the clock starts, as a worker's client is after its first searches. All of them
    run on this one event loop, which also parses every reply: the latencies include that client-side work, which
    the agent-loop workers (separate processes) share out in a run.
    """
    clients = [RetrievalClient(url, topk=topk) for _ in range(workers)]
    await asyncio.gather(*(c.health() for c in clients))
    times: list[float] = []
    walls: list[float] = []
    errors = 0

    async def one(client: RetrievalClient, query: str) -> None:
        nonlocal errors
        t0 = time.perf_counter()
        try:
            await client.search_one(query)
        except RetrievalError:
            errors += 1
        times.append(time.perf_counter() - t0)

    try:
        for r in range(rounds):
            start = time.perf_counter()
            await asyncio.gather(
                *(
                    one(client, queries[(r * workers * burst + w * burst + i) % len(queries)])
                    for w, client in enumerate(clients)
                    for i in range(burst)
                )
            )
            walls.append(time.perf_counter() - start)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return times, errors, walls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=1000, help="single-query requests in the concurrent phase")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients in the concurrent phase")
    parser.add_argument("--single", type=int, default=300, help="sequential single queries (in process and HTTP)")
    parser.add_argument("--large", type=int, default=3000, help="queries in the large request")
    parser.add_argument("--small-clients", type=int, default=4, help="clients sending small requests beside it")
    parser.add_argument("--burst", type=int, default=8 * 16, help="searches one agent-loop worker sends at once")
    parser.add_argument("--burst-workers", type=int, default=8, help="agent-loop workers bursting together")
    parser.add_argument("--burst-rounds", type=int, default=5, help="bursts of each kind")
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=None, help="the server's --max-batch (default: its own)")
    parser.add_argument("--tiny", action="store_true", help="a few seconds: 300 docs and few requests (smoke test)")
    parser.add_argument("--work-dir", default=None, help="where the corpus and index go (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.docs, args.requests, args.clients, args.single, args.large = 300, 40, 4, 20, 200
        args.burst, args.burst_workers, args.burst_rounds = 16, 2, 1

    with tempfile.TemporaryDirectory(prefix="bench_retriever_") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / "corpus.jsonl"
        vocabulary = make_corpus(corpus, args.docs)
        t0 = time.perf_counter()
        retriever = Retriever.from_config(RetrieverConfig(corpus_path=str(corpus)))
        print(f"corpus: {args.docs} documents, BM25 index built in {time.perf_counter() - t0:.1f} s")
        queries = make_queries(vocabulary, max(args.single, args.requests, args.large) + 1000)

        local = in_process(retriever, queries[: args.single], args.topk)
        print(f"in process, single queries:         {fmt_ms(local)}")

        batch_flags = ["--max-batch", str(args.max_batch)] if args.max_batch else []
        with server_process(corpus, work, "chunked", "--max-queries", str(args.large), *batch_flags) as (url, startup):
            print(f"server start-up (index verified and loaded): {startup:.1f} s")
            remote = http_sequential(url, queries[: args.single], args.topk)
            print(f"HTTP, one client, single queries:   {fmt_ms(remote)}")
            times, errors, wall = asyncio.run(http_concurrent(url, queries[: args.requests], args.clients, args.topk))
            rate, local_rate = len(times) / wall, 1 / statistics.mean(local)
            print(f"HTTP, {args.clients} clients, {len(times)} requests: {fmt_ms(times)}  {rate:.0f} req/s "
                  f"(in process: {local_rate:.0f} searches/s)")  # fmt: skip
            small, large_s, fair_errors = asyncio.run(
                small_beside_large(url, queries[: args.large], queries[-1000:], args.small_clients, args.topk)
            )
            batch = args.max_batch or DEFAULT_MAX_BATCH
            print(f"beside a {args.large}-query request ({large_s:.2f} s), chunked batches of {batch}: small requests "
                  f"{fmt_ms(small)}")  # fmt: skip
            burst_errors = 0
            for workers in sorted({1, args.burst_workers}):
                latencies, b_errors, walls = asyncio.run(
                    carl_burst(url, queries, workers, args.burst, args.burst_rounds, args.topk)
                )
                burst_errors += b_errors
                print(f"CARL burst through RetrievalClient, {workers} worker(s) x {args.burst} searches at once, "
                      f"{args.burst_rounds} round(s): errors {b_errors}, {fmt_ms(latencies)}, round "
                      f"{statistics.median(walls):.2f} s (median)")  # fmt: skip
        with server_process(
            corpus, work, "whole", "--max-queries", str(args.large), "--max-batch", str(args.large)
        ) as (
            url,
            _,
        ):
            whole, whole_s, whole_errors = asyncio.run(
                small_beside_large(url, queries[: args.large], queries[-1000:], args.small_clients, args.topk)
            )
            print(f"beside a {args.large}-query request ({whole_s:.2f} s), whole request in one batch: small requests "
                  f"{fmt_ms(whole)}")  # fmt: skip

    ratio = percentile(remote, 50) / percentile(local, 50)
    print(f"target HTTP p50 <= 3x in process: {'met' if ratio <= 3 else 'NOT met'}")
    print(f"requests={len(times)} clients={args.clients} small_requests={len(small)}+{len(whole)} "
          f"fairness_errors={fair_errors + whole_errors}")  # fmt: skip
    print(f"small_p99_ms={1e3 * percentile(small, 99):.1f} small_p99_whole_ms={1e3 * percentile(whole, 99):.1f}")
    print(f"burst_errors={burst_errors}")
    print(f"errors={errors}")
    print(f"ratio={ratio:.2f}")
    return 0 if errors == 0 and burst_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
