"""CarlSearchTool and RetrievalClient against real HTTP servers: happy path, failures, retries, cache, verl wiring."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from recipe.carl.search.client import Document, RetrievalClient, RetrievalError, SearchCache, parse_retrieve_response
from recipe.carl.search.search_tool import CarlSearchTool
from recipe.carl.search.server import serve_in_thread


def make_tool(url: str, **config) -> CarlSearchTool:
    return CarlSearchTool({"type": "native", "retrieval_service_url": f"{url}/retrieve", **config})


def run_tool(tool: CarlSearchTool, parameters: dict, **create_kwargs):
    async def go():
        instance_id, _ = await tool.create(create_kwargs=create_kwargs)
        try:
            return await tool.execute(instance_id, parameters)
        finally:
            await tool.release(instance_id)

    return asyncio.run(go())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingSearch:
    """A search_fn that counts calls and can hang (until ``release`` is set), fail, or answer with garbage."""

    def __init__(self, mode: str = "ok"):
        self.mode, self.calls = mode, 0
        self.release = threading.Event()

    def __call__(self, queries, topk):
        self.calls += 1
        if self.mode == "hang":
            self.release.wait(10)
        if self.mode == "fail":
            raise RuntimeError("backend down")
        if self.mode == "garbage":
            return [[{"unexpected": "shape"}] for _ in queries]
        return [
            [
                {"document": {"id": f"{q}-{i}", "contents": f"Title {q} {i}\nText about {q}."}, "score": 1.0 / (i + 1)}
                for i in range(topk)
            ]  # fmt: skip
            for q in queries
        ]


ALL_ERROR_KEYS = [f"search/error_{k}" for k in ("connect", "timeout", "http", "bad_response", "invalid_args")]


def assert_only_error(metrics: dict, kind: str | None) -> None:
    for key in ALL_ERROR_KEYS:
        assert metrics[key] == (1.0 if key == f"search/error_{kind}" else 0.0), key
    assert metrics["search/ok"] == (1.0 if kind is None else 0.0)


# --------------------------------------------------------------------------------------------------- happy path


def test_tool_renders_real_documents(bm25_retriever):
    with serve_in_thread(bm25_retriever) as url:
        tool = make_tool(url, topk=2)
        response, reward, metrics = run_tool(tool, {"query": "  capital of   Germany "})
    assert reward == 0.0
    assert response.text.startswith(
        "Doc 1 (Title: Berlin) Berlin is the capital of Germany and its largest city by population.\nDoc 2 (Title: "
    )
    assert response.text.count("\nDoc ") == 1
    assert_only_error(metrics, None)
    assert metrics["search/num_queries"] == 1 and metrics["search/num_docs"] == 2


def test_tool_accepts_query_list_and_caps_observation_length():
    with serve_in_thread(search_fn=CountingSearch()) as url:
        tool = make_tool(url, topk=2, max_obs_chars=60)
        response, _, metrics = run_tool(tool, {"query_list": ["alpha", "beta"]})
        full, _, _ = run_tool(make_tool(url, topk=2), {"query_list": ["alpha", "beta"]})
    assert full.text.startswith('Results for "alpha":\nDoc 1 (Title: Title alpha 0) Text about alpha.')
    assert '\n\nResults for "beta":\n' in full.text
    assert len(response.text) <= 60 and response.text.endswith("...")
    assert metrics["search/truncated"] == 1.0 and metrics["search/num_docs"] == 4


@pytest.mark.parametrize("parameters", [{"query": "   "}, {"q": "x"}, {"query_list": "x"}, {"query": 3}])
def test_invalid_arguments_are_an_error_observation(parameters):
    tool = make_tool("http://127.0.0.1:9")  # never contacted
    response, _, metrics = run_tool(tool, parameters)
    assert response.text.startswith("Search failed: invalid arguments")
    assert_only_error(metrics, "invalid_args")


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match=r"unknown CarlSearchTool config keys \['top_k'\]"):
        CarlSearchTool({"type": "native", "top_k": 3})


# --------------------------------------------------------------------------------------------------- failures


def test_server_down_gives_error_observation_with_bounded_retries():
    tool = make_tool(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff=0.05, timeout=2)
    started = time.perf_counter()
    response, reward, metrics = run_tool(tool, {"query": "anything"})
    elapsed = time.perf_counter() - started
    assert response.text.startswith("Search failed: the retrieval service is unavailable (connect)")
    assert reward == 0.0
    assert_only_error(metrics, "connect")
    assert 0.05 + 0.1 <= elapsed < 2.0  # two backoff sleeps (0.05, 0.1), no more


def test_slow_server_times_out():
    search = CountingSearch(mode="hang")
    with serve_in_thread(search_fn=search, batch_wait_ms=0) as url:
        tool = make_tool(url, timeout=0.2, max_retries=1, backoff=0.0)
        started = time.perf_counter()
        response, _, metrics = run_tool(tool, {"query": "slow"})
        elapsed = time.perf_counter() - started
        search.release.set()  # let the server finish its hung search so it can shut down
    assert "unavailable (timeout)" in response.text
    assert_only_error(metrics, "timeout")
    assert 0.4 <= elapsed < 2.0  # two 0.2 s attempts, then give up


def test_5xx_is_retried_exactly_max_retries_times():
    search = CountingSearch(mode="fail")
    with serve_in_thread(search_fn=search, batch_wait_ms=0) as url:
        response, _, metrics = run_tool(make_tool(url, max_retries=2, backoff=0.01), {"query": "q"})
    assert search.calls == 3  # 1 try + 2 retries
    assert_only_error(metrics, "http")
    assert "unavailable (http)" in response.text


def test_garbage_response_is_not_retried():
    search = CountingSearch(mode="garbage")
    with serve_in_thread(search_fn=search, batch_wait_ms=0) as url:
        response, _, metrics = run_tool(make_tool(url, max_retries=3, backoff=0.01), {"query": "q"})
    assert search.calls == 1
    assert_only_error(metrics, "bad_response")


def test_4xx_is_not_retried():
    search = CountingSearch()
    with serve_in_thread(search_fn=search) as url:
        client = RetrievalClient(url, max_retries=3, backoff=0.01)
        with pytest.raises(RetrievalError) as info:
            asyncio.run(client.search(["q"], topk=5000))  # the server caps topk at 1000 -> HTTP 422
    assert info.value.kind == "http" and info.value.attempts == 1 and "422" in str(info.value)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"results": []}, "no 'result' list"),
        ({"result": [[]]}, "1 result lists for 2 queries"),
        ({"result": ["x", []]}, r"result\[0\] is not a list"),
        ({"result": [[{"document": {"id": 1}}], []]}, "no 'contents' string"),
        ({"result": [[{"document": {"contents": "T\nx"}, "score": "high"}], []]}, "score must be a number"),
    ],
)
def test_malformed_responses_are_named(payload, message):
    with pytest.raises(RetrievalError, match=message):
        parse_retrieve_response(payload, 2)


def test_both_response_shapes_parse_to_documents():
    scored = {"result": [[{"document": {"id": 7, "contents": '"Oslo"\nCapital of Norway.'}, "score": 2.5}]]}
    bare = {"result": [[{"title": "Oslo", "text": "Capital of Norway."}]]}
    (doc,) = parse_retrieve_response(scored, 1)[0]
    assert doc == Document(contents='"Oslo"\nCapital of Norway.', id="7", score=2.5)
    assert (doc.title, doc.text) == ("Oslo", "Capital of Norway.")
    assert parse_retrieve_response(bare, 1)[0][0].title == "Oslo"


# --------------------------------------------------------------------------------------------------- cache


def test_per_tree_cache_serves_siblings_the_same_documents():
    search = CountingSearch()
    with serve_in_thread(search_fn=search, batch_wait_ms=0) as url:
        tool = make_tool(url)
        first, _, m1 = run_tool(tool, {"query": "who painted it"}, tree_id="tree-A")
        second, _, m2 = run_tool(tool, {"query": "who  painted it"}, tree_id="tree-A")  # same query, another branch
        other, _, m3 = run_tool(tool, {"query": "who painted it"}, tree_id="tree-B")
        tool.drop_tree("tree-A")
        _, _, m4 = run_tool(tool, {"query": "who painted it"}, tree_id="tree-A")
        _, _, m5 = run_tool(tool, {"query": "who painted it"})  # no tree id: never cached
    assert first.text == second.text == other.text
    assert [m["search/cache_hits"] for m in (m1, m2, m3, m4, m5)] == [0, 1, 0, 0, 0]
    assert search.calls == 4


def test_cache_key_from_agent_data_and_lru_bound():
    search = CountingSearch()
    with serve_in_thread(search_fn=search, batch_wait_ms=0) as url:
        tool = make_tool(url, cache_max_trees=2)
        agent_data = SimpleNamespace(extra_fields={"tree_id": "t1"})

        async def call(query):
            instance_id, _ = await tool.create(create_kwargs={})
            return await tool.execute(instance_id, {"query": query}, agent_data=agent_data)

        asyncio.run(call("q"))
        _, _, metrics = asyncio.run(call("q"))
    assert metrics["search/cache_hits"] == 1 and search.calls == 1

    cache = SearchCache(max_trees=2)
    for tree in ("a", "b", "c"):
        cache.put(tree, "q", 3, [])
    assert len(cache) == 2 and cache.get("a", "q", 3) is None and cache.get("c", "q", 3) == []


def test_client_batches_only_cache_misses():
    search = CountingSearch()
    with serve_in_thread(search_fn=search, batch_wait_ms=0) as url:
        client = RetrievalClient(url, topk=1, cache=SearchCache())  # bare base URL: /retrieve is appended
        assert client.url == f"{url}/retrieve"

        async def go():
            assert [d.id for d in await client.search_one("a", cache_key="t")] == ["a-0"]
            with pytest.raises(TypeError, match="list of queries"):
                await client.search("a")
            assert (await client.health())["status"] == "ok"
            stats = {}
            docs = await client.search(["a", "b"], cache_key="t", stats=stats)
            return docs, stats

        docs, stats = asyncio.run(go())
    assert [[d.id for d in row] for row in docs] == [["a-0"], ["b-0"]]
    assert stats == {"cache_hits": 1} and search.calls == 2


# --------------------------------------------------------------------------------------------------- verl wiring


def test_tool_loads_from_verl_tool_config_and_runs_through_tool_agent_loop(tmp_path, bm25_retriever):
    from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
    from verl.experimental.agent_loop.tool_parser import FunctionCall
    from verl.tools.tool_registry import initialize_tools_from_config

    with serve_in_thread(bm25_retriever) as url:
        config = tmp_path / "tools.yaml"
        config.write_text(
            "tools:\n"
            "  - class_name: recipe.carl.search.search_tool.CarlSearchTool\n"
            "    config:\n"
            "      type: native\n"
            f"      retrieval_service_url: {url}/retrieve\n"
            "      topk: 1\n"
        )
        (tool,) = initialize_tools_from_config(str(config))
        assert isinstance(tool, CarlSearchTool) and tool.name == "search"
        # ToolAgentLoop._call_tool only needs these attributes; calling it proves the create/execute/release contract.
        loop_stub = SimpleNamespace(
            tools={"search": tool}, max_tool_response_length=10_000, tool_response_truncate_side="right"
        )
        call = FunctionCall(name="search", arguments=json.dumps({"query": "highest mountain"}))
        agent_data = SimpleNamespace(extra_fields={})
        tools_kwargs = {"search": {"create_kwargs": {"data_source": "searchR1_nq", "question_index": 0}}}
        response, reward, metrics = asyncio.run(ToolAgentLoop._call_tool(loop_stub, call, tools_kwargs, agent_data))
    assert response.text.startswith("Doc 1 (Title: Mount Everest)")
    assert metrics["search/ok"] == 1.0 and tool._instances == {}  # released
