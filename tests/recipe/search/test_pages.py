"""Pages for the paper's `access` action: the page store of a wiki-18-format corpus, parts of a long page, the
server's `POST /access` (ASearcher's shape), the client's `access` and the verl tools that show ids and open pages."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from recipe.carl.search import pages as pages_mod
from recipe.carl.search.client import Page, RetrievalClient, RetrievalError, SearchCache, parse_access_response
from recipe.carl.search.pages import PageStore, split_parts
from recipe.carl.search.retriever import CorpusError, Retriever, RetrieverConfig, load_corpus
from recipe.carl.search.search_tool import CarlAccessTool, CarlSearchTool
from recipe.carl.search.server import serve_in_thread
from tests.recipe.search.wiki_format import write_wiki18


@pytest.fixture
def wiki(tmp_path):
    return write_wiki18(tmp_path / "wiki.jsonl")


# ------------------------------------------------------------------------------------------------ the page store
def test_a_page_is_every_passage_of_its_article_in_order(wiki):
    store = PageStore(load_corpus(wiki))
    # Lines 0-2 are Alpha, 3 Beta Bay, 4-5 Gamma, 6 the second Alpha: four runs of one title, four pages.
    assert len(store) == 4
    alpha = store.get("1")  # any passage of the page finds it
    assert alpha == store.get("0") == store.get("2")
    assert alpha.id == "0" and alpha.title == "Alpha" and alpha.passage_ids == ("0", "1", "2")
    assert alpha.text == "Alpha is a river in the north.\nIts source lies in the hills.\nIt joins the sea at Beta Bay."
    assert alpha.contents.startswith("Alpha\nAlpha is a river")  # wiki-18's quotes around the title are dropped
    assert store.get("3").passage_ids == ("3",) and store.get("5").text.endswith("Its mayor is Delta Smith.")
    # The same title stored apart is another page, and it is counted as scattered.
    assert store.get("6").id == "6" and store.get("6").text.startswith("Alpha is also a play")
    assert store.scattered_titles() == {"Alpha": 2}
    # Unknown ids: past the end, not a line number's spelling, not a number at all.
    assert store.get("7") is None and store.get("01") is None and store.get("Alpha") is None
    summary = store.summary()
    assert summary["pages"] == 4 and summary["passages_per_page_max"] == 3 and summary["scattered_titles"] == 1
    assert summary["largest_page"] == {"id": "0", "chars": len(alpha.text)}


def test_numbered_ids_from_any_start_need_no_table(tmp_path):
    """DPR numbers its passages from 1: consecutive numbers from any start are positions plus that start."""
    rows = [{"id": str(i + 1), "contents": f"T{i // 2}\np{i}"} for i in range(6)]
    path = tmp_path / "from1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = PageStore(load_corpus(path))
    assert store._position is None and len(store) == 3
    assert store.get("1").passage_ids == ("1", "2") and store.get("6").text == "p4\np5"
    assert store.get("0") is None and store.get("7") is None and store.get("06") is None


def test_ids_that_are_not_line_numbers_are_looked_up_and_must_be_unique(tmp_path):
    path = tmp_path / "named.jsonl"
    rows = [{"id": "Uldal", "contents": "Uldal\nUldal is a company ."}, {"id": "Drein", "contents": "Drein\nA city ."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = PageStore(load_corpus(path))
    assert store.get("Drein").text == "A city ." and store.get("0") is None
    rows.append({"id": "Uldal", "contents": "Other\nx"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(CorpusError, match="the id 'Uldal' is used by more than one passage"):
        PageStore(load_corpus(path))


def test_parts_end_at_sentence_ends_then_spaces_then_the_limit():
    text = "One two three. Four five six seven. Eight nine ten eleven twelve. Thirteen."
    # Windows of 30 (+1) characters: each holds one sentence end, after "three.", "seven.", "twelve.": cut there.
    assert split_parts(text, 30) == [
        "One two three.",
        "Four five six seven.",
        "Eight nine ten eleven twelve.",
        "Thirteen.",
    ]
    # With room for two sentences the cut is at the last sentence end of the window.
    assert split_parts(text, 40) == ["One two three. Four five six seven.", "Eight nine ten eleven twelve. Thirteen."]
    # A sentence longer than a part: the last space ("Uldal is headquartered in Drein ." has 33 characters).
    assert split_parts("Uldal is a company . Uldal is headquartered in Drein .", 22) == [
        "Uldal is a company .",
        "Uldal is headquartered",
        "in Drein .",
    ]
    assert split_parts("abcdefghij klm", 4) == ["abcd", "efgh", "ij", "klm"]  # a word longer than a part is cut
    assert split_parts("  short  ", 100) == ["short"] and split_parts("", 5) == []
    for size in (5, 17, 33):  # no part is longer than asked; no word is cut when every word fits
        parts = split_parts(text, size)
        assert all(len(p) <= size for p in parts) and "".join(parts).replace(" ", "") == text.replace(" ", "")
        assert size < 9 or " ".join(parts).split() == text.split()
    with pytest.raises(ValueError, match="chunk_chars must be >= 1"):
        split_parts(text, 0)


def test_the_command_line_summarises_a_corpus_and_shows_a_page(wiki, capsys):
    out = pages_mod.main(["--corpus", str(wiki)])
    assert out["pages"] == 4 and out["scattered_examples"] == ["Alpha"]
    shown = pages_mod.main(["--corpus", str(wiki), "--show", "2", "--chunk-chars", "40"])
    assert shown["id"] == "0" and shown["passages"] == 3 and " ".join(shown["parts"]).startswith("Alpha is a river")
    with pytest.raises(SystemExit):
        pages_mod.main(["--corpus", str(wiki), "--show", "99"])
    assert "--show 99: no passage has this id" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ POST /access
@pytest.fixture
def served(wiki):
    retriever = Retriever.from_config(RetrieverConfig(corpus_path=str(wiki)))
    return retriever, PageStore(retriever.corpus)


def test_access_returns_whole_pages_in_asearchers_shape(served):
    retriever, store = served
    with serve_in_thread(retriever, pages=store) as url:
        response = httpx.post(f"{url}/access", json={"urls": ["1", "nope"]})
        health = httpx.get(f"{url}/health").json()
        retrieved = httpx.post(f"{url}/retrieve", json={"queries": ["Gamma mayor"], "topk": 1}).json()
    assert response.status_code == 200
    first, unknown = response.json()["result"]
    assert unknown is None  # ASearcher's local server answers null for an unknown url
    assert first == {"url": "1", "id": "0", "title": "Alpha", "contents": store.get("0").contents, "passages": 3}
    assert health["pages"] == 4
    assert retrieved == {"result": [[{"id": "5", "contents": '"Gamma"\nIts mayor is Delta Smith.'}]]}  # unchanged


def test_access_limits_and_a_server_without_pages_name_their_flags(served):
    retriever, store = served
    # Alpha's page: its three passages (30, 29 and 29 characters) joined by two newlines, 90 characters.
    with serve_in_thread(retriever, pages=store, max_page_chars=40, max_queries=2, max_query_chars=5) as url:
        big = httpx.post(f"{url}/access", json={"urls": ["3", "0"]})
        many = httpx.post(f"{url}/access", json={"urls": ["3", "3", "3"]})
        long = httpx.post(f"{url}/access", json={"urls": ["123456"]})
        small = httpx.post(f"{url}/access", json={"urls": ["3"]})
    assert big.status_code == 413 and "the page of id '0' ('Alpha') has 90 characters" in big.json()["detail"]
    assert "(--max-page-chars)" in big.json()["detail"]
    assert many.status_code == 413 and "(--max-queries)" in many.json()["detail"]
    assert long.status_code == 422 and "(--max-query-chars)" in long.json()["detail"]
    assert small.status_code == 200 and small.json()["result"][0]["title"] == "Beta Bay"
    with serve_in_thread(retriever) as url:
        none = httpx.post(f"{url}/access", json={"urls": ["3"]})
        health = httpx.get(f"{url}/health").json()
    assert none.status_code == 404 and "restart it with --pages" in none.json()["detail"]
    assert "pages" not in health


def test_the_server_command_line_takes_pages(wiki, tmp_path):
    from recipe.carl.search.server import build_arg_parser, main

    args = build_arg_parser().parse_args(["--corpus", str(wiki), "--pages", "--max-page-chars", "10"])
    assert args.pages and args.max_page_chars == 10
    with pytest.raises(SystemExit):
        main(["--corpus", str(wiki), "--max-page-chars", "0"])


# --------------------------------------------------------------------------------------------------- the client
class CountingStore(PageStore):
    calls = 0

    def get(self, doc_id):
        CountingStore.calls += 1
        return super().get(doc_id)


def test_the_client_reads_pages_and_nulls_and_caches_them_per_tree(served):
    retriever, _ = served
    store = CountingStore(retriever.corpus)
    CountingStore.calls = 0

    async def run(url):
        client = RetrievalClient(f"{url}/retrieve", cache=SearchCache())
        first = await client.access(["4", "nope"], cache_key="tree")
        again = await client.access(["nope", "4"], cache_key="tree")  # both from the cache (None included)
        other = await client.access(["4"], cache_key="other")
        await client.aclose()
        return client, first, again, other

    with serve_in_thread(retriever, pages=store) as url:
        client, first, again, other = asyncio.run(run(url))
    assert client.access_url == f"{url}/access"
    assert first[0] == Page(id="4", contents="Gamma\nGamma is a town on the Alpha river.\nIts mayor is Delta Smith.")
    assert first[0].title == "Gamma" and first[0].text.endswith("Delta Smith.") and first[1] is None
    assert again == [None, first[0]] and other == [first[0]]
    assert CountingStore.calls == 3  # 2 for the first call, 0 for the cached one, 1 for another tree


def test_a_refused_access_is_not_retried_and_names_the_fix(served):
    retriever, store = served

    async def run(url, **kwargs):
        client = RetrievalClient(f"{url}/retrieve", max_retries=3, backoff=0.0)
        try:
            return await client.access(["0"], **kwargs)
        finally:
            await client.aclose()

    with serve_in_thread(retriever, pages=store, max_page_chars=10) as url:
        with pytest.raises(RetrievalError) as refused:
            asyncio.run(run(url))
    assert refused.value.kind == "http" and refused.value.attempts == 1 and "--max-page-chars" in str(refused.value)
    with serve_in_thread(retriever) as url:
        with pytest.raises(RetrievalError, match="restart it with --pages"):
            asyncio.run(run(url))
    with pytest.raises(TypeError, match="list of ids"):
        asyncio.run(RetrievalClient().access("0"))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"pages": []}, "no 'result' list"),
        ({"result": [None]}, "1 results for 2 ids"),
        ({"result": [{"title": "x"}, None]}, "result[0] is neither null nor a page with 'contents'"),
    ],
)
def test_a_malformed_access_response_is_named(payload, message):
    with pytest.raises(RetrievalError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        parse_access_response(payload, 2)
    assert error.value.kind == "bad_response"
    assert parse_access_response({"result": [{"url": "7", "contents": "T\nx"}, None]}, 2) == [Page("7", "T\nx"), None]


# ----------------------------------------------------------------------------------------------------- the tools
def test_the_search_tool_shows_ids_and_snippets_when_asked(served):
    retriever, store = served

    async def run(tool):
        instance, _ = await tool.create()
        return (await tool.execute(instance, {"query": "Gamma town Alpha river"}))[0].text

    with serve_in_thread(retriever, pages=store) as url:
        plain = asyncio.run(run(CarlSearchTool({"retrieval_service_url": url, "topk": 1})))
        ids = asyncio.run(run(CarlSearchTool({"retrieval_service_url": url, "topk": 1, "show_ids": True})))
        snippet = asyncio.run(
            run(CarlSearchTool({"retrieval_service_url": url, "topk": 1, "show_ids": True, "snippet_words": 3}))
        )
    assert plain == "Doc 1 (Title: Gamma) Gamma is a town on the Alpha river."  # the default rendering, unchanged
    assert ids == "Doc 1 (id: 4, Title: Gamma) Gamma is a town on the Alpha river."
    assert snippet == "Doc 1 (id: 4, Title: Gamma) Gamma is a ..."
    with pytest.raises(ValueError, match="snippet_words=0: give an integer >= 1, or null"):
        CarlSearchTool({"snippet_words": 0})


def test_the_access_tool_opens_a_page_and_reports_unknown_ids_and_failures(served):
    retriever, store = served

    async def run(tool, page_id):
        instance, _ = await tool.create(create_kwargs={"tree_id": "t"})
        return await tool.execute(instance, {"id": page_id})

    with serve_in_thread(retriever, pages=store) as url:
        tool = CarlAccessTool({"retrieval_service_url": f"{url}/retrieve"})
        found, _, ok = asyncio.run(run(tool, "5"))
        missing, _, unknown = asyncio.run(run(tool, "99"))
        _, _, bad = asyncio.run(run(tool, " "))
    assert found.text == store.get("5").contents and ok["search/ok"] == 1 and ok["search/page_found"] == 1
    assert ok["search/page_chars"] == len(found.text)
    assert missing.text == "" and unknown["search/ok"] == 1 and unknown["search/page_found"] == 0
    assert bad["search/error_invalid_args"] == 1 and bad["search/ok"] == 0
    down = CarlAccessTool({"retrieval_service_url": "http://127.0.0.1:9/retrieve", "max_retries": 0})
    response, _, failed = asyncio.run(run(down, "5"))
    assert (
        failed["search/ok"] == 0 and failed["search/error_connect"] == 1 and response.text.startswith("Access failed")
    )
    assert down.get_openai_tool_schema().function.name == "access" and down.cache is None
    with pytest.raises(ValueError, match="unknown CarlAccessTool config keys \\['topk'\\]"):
        CarlAccessTool({"topk": 3})
