"""Retriever: corpus errors, BM25/dense search, index cache and manifest, and the HTTP server over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from recipe.carl.search import retriever as retriever_mod
from recipe.carl.search.retriever import (
    MANIFEST_NAME,
    BM25Backend,
    CorpusError,
    CorruptIndexError,
    HashingEncoder,
    Retriever,
    RetrieverConfig,
    StaleIndexError,
    load_corpus,
)
from recipe.carl.search.server import PortInUseError, bind_socket, serve_in_thread

REPO_ROOT = Path(__file__).resolve().parents[3]


def top_title(retriever: Retriever, query: str) -> str:
    hits = retriever.search_documents([query], 1)[0]
    return hits[0]["document"]["contents"].split("\n")[0].strip('"')


# --------------------------------------------------------------------------------------------------- corpus errors


def test_missing_corpus_names_the_path(tmp_path):
    with pytest.raises(CorpusError, match="corpus file not found: .*nope.jsonl"):
        load_corpus(tmp_path / "nope.jsonl")


def test_empty_corpus_is_refused(make_corpus):
    with pytest.raises(CorpusError, match="corpus file is empty"):
        load_corpus(make_corpus("empty.jsonl", lines=["", "   "]))


def test_bad_json_line_names_the_line_number(make_corpus):
    good = json.dumps({"id": "a", "contents": "T\nx"})
    path = make_corpus("bad.jsonl", lines=[good, good, "{not json"])
    with pytest.raises(CorpusError, match=r"bad.jsonl:3: not valid JSON"):
        load_corpus(path)


def test_missing_contents_names_the_line_number(make_corpus):
    path = make_corpus("nocontents.jsonl", lines=[json.dumps({"id": "a", "contents": "T\nx"}), json.dumps({"id": 1})])
    with pytest.raises(CorpusError, match=r":2: 'contents' must be a non-empty string"):
        load_corpus(path)


def test_ids_default_to_line_numbers(make_corpus):
    corpus = load_corpus(
        make_corpus("noid.jsonl", lines=[json.dumps({"contents": "A\na"}), json.dumps({"contents": "B\nb"})])
    )
    assert corpus.ids == ["0", "1"]
    assert corpus.document(1) == {"id": "1", "contents": "B\nb"}


# --------------------------------------------------------------------------------------------------- BM25 search


@pytest.mark.parametrize(
    ("query", "title"),
    [
        ("capital of Germany", "Berlin"),
        ("pointillist painting Grande Jatte", "Georges Seurat"),
        ("highest mountain Himalayas", "Mount Everest"),
        ("first algorithm Analytical Engine", "Ada Lovelace"),
    ],
)
def test_bm25_finds_the_relevant_document(bm25_retriever, query, title):
    assert top_title(bm25_retriever, query) == title


def test_bm25_scores_are_sorted_and_topk_is_respected(bm25_retriever):
    hits = bm25_retriever.search(["capital city weather region"], 3)[0]
    assert len(hits) == 3
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True)


def test_bm25_unmatched_query_returns_nothing_and_topk_is_clamped(bm25_retriever):
    # Zero-score documents are noise, not results; topk beyond the corpus size must not raise (bm25s would).
    assert bm25_retriever.search(["zzzqx unknownword"], 5) == [[]]
    assert len(bm25_retriever.search(["filler passage"], 10_000)[0]) == 30  # only the 30 fillers match


def test_search_edge_cases(bm25_retriever):
    assert bm25_retriever.search([], 3) == []
    with pytest.raises(ValueError, match="topk must be >= 1"):
        bm25_retriever.search(["x"], 0)


# --------------------------------------------------------------------------------------------------- index cache


def test_cached_index_is_loaded_not_rebuilt(corpus_path, monkeypatch):
    cfg = RetrieverConfig(corpus_path=str(corpus_path))
    Retriever.from_config(cfg)
    manifest = json.loads((cfg.resolved_index_dir() / MANIFEST_NAME).read_text())
    assert manifest["num_docs"] == 36 and manifest["index"]["backend"] == "bm25"
    assert manifest["corpus"]["path"] == str(corpus_path.resolve())

    def fail_build(*args, **kwargs):
        raise AssertionError("index was rebuilt although the cache matches")

    monkeypatch.setattr(BM25Backend, "build", fail_build)
    assert top_title(Retriever.from_config(cfg), "capital of Germany") == "Berlin"


def test_changed_corpus_is_detected_and_rebuilt(corpus_path, make_corpus):
    cfg = RetrieverConfig(corpus_path=str(corpus_path))
    assert Retriever.from_config(cfg).num_docs == 36
    make_corpus(corpus_path.name, docs=[("Oslo", "Oslo is the capital of Norway."), ("Rome", "Rome is in Italy.")])
    rebuilt = Retriever.from_config(cfg)
    assert rebuilt.num_docs == 2
    assert top_title(rebuilt, "capital of Norway") == "Oslo"


def test_stale_index_is_refused_with_on_stale_error(corpus_path, make_corpus):
    Retriever.from_config(RetrieverConfig(corpus_path=str(corpus_path)))
    make_corpus(corpus_path.name, docs=[("Oslo", "Oslo is the capital of Norway.")])
    with pytest.raises(StaleIndexError, match="stale: corpus file changed.*--rebuild"):
        Retriever.from_config(RetrieverConfig(corpus_path=str(corpus_path), on_stale="error"))


def test_changed_dense_settings_make_the_index_stale(corpus_path):
    index_dir = str(corpus_path.parent / "dense_idx")
    Retriever.from_config(RetrieverConfig(str(corpus_path), backend="dense", encoder="hash:64", index_dir=index_dir))
    with pytest.raises(StaleIndexError, match="index settings changed"):
        Retriever.from_config(
            RetrieverConfig(
                str(corpus_path), backend="dense", encoder="hash:128", index_dir=index_dir, on_stale="error"
            )
        )


def test_hash_corpus_accepts_touched_but_identical_file(corpus_path, monkeypatch):
    cfg = RetrieverConfig(corpus_path=str(corpus_path), hash_corpus=True, on_stale="error")
    Retriever.from_config(cfg)
    os.utime(corpus_path, (time.time() + 100, time.time() + 100))  # new mtime, same bytes
    monkeypatch.setattr(BM25Backend, "build", lambda *a, **k: pytest.fail("rebuilt an unchanged corpus"))
    Retriever.from_config(cfg)


def test_corrupt_manifest_gives_a_clear_error_and_rebuild_fixes_it(corpus_path):
    cfg = RetrieverConfig(corpus_path=str(corpus_path))
    Retriever.from_config(cfg)
    (cfg.resolved_index_dir() / MANIFEST_NAME).write_text("{truncated")
    with pytest.raises(CorruptIndexError, match="cannot read index manifest.*--rebuild"):
        Retriever.from_config(cfg)
    cfg.rebuild = True
    assert Retriever.from_config(cfg).num_docs == 36


@pytest.mark.parametrize("backend", ["bm25", "dense"])
def test_corrupt_index_files_give_a_clear_error(corpus_path, backend):
    cfg = RetrieverConfig(corpus_path=str(corpus_path), backend=backend, encoder="hash:32")
    Retriever.from_config(cfg)
    for path in cfg.resolved_index_dir().iterdir():
        if path.name != MANIFEST_NAME:
            path.write_bytes(b"garbage")
    with pytest.raises(CorruptIndexError, match=f"cannot load the {backend} index.*--rebuild"):
        Retriever.from_config(cfg)


def test_directory_without_manifest_is_not_overwritten_silently(corpus_path):
    cfg = RetrieverConfig(corpus_path=str(corpus_path))
    cfg.resolved_index_dir().mkdir()
    (cfg.resolved_index_dir() / "precious.txt").write_text("not an index")
    with pytest.raises(CorruptIndexError, match="has no manifest.json"):
        Retriever.from_config(cfg)


def test_interrupted_build_leaves_no_index_behind(corpus_path, monkeypatch):
    def interrupted(corpus, out_dir):
        (out_dir / "partial.npy").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(BM25Backend, "build", staticmethod(interrupted))
    cfg = RetrieverConfig(corpus_path=str(corpus_path))
    with pytest.raises(KeyboardInterrupt):
        Retriever.from_config(cfg)
    assert not cfg.resolved_index_dir().exists()
    assert [p.name for p in corpus_path.parent.iterdir()] == [corpus_path.name]


# --------------------------------------------------------------------------------------------------- dense


@pytest.mark.parametrize(("index_type", "fp16"), [("flat", False), ("flat", True), ("ivf", False), ("ivf", True)])
def test_dense_backend_finds_exact_passage(corpus_path, index_type, fp16):
    cfg = RetrieverConfig(
        str(corpus_path), backend="dense", encoder="hash:256", index_type=index_type, fp16=fp16, nlist=4, nprobe=4
    )
    retriever = Retriever.from_config(cfg)
    # The hashing encoder is a bag of words, so a passage's own words find it exactly.
    assert top_title(retriever, "Mount Everest is Earth's highest mountain above sea level") == "Mount Everest"
    reloaded = Retriever.from_config(cfg)
    assert reloaded.search(["capital of Germany"], 3) == retriever.search(["capital of Germany"], 3)


def test_fp16_halves_the_flat_index(corpus_path):
    sizes = {}
    for fp16 in (False, True):
        cfg = RetrieverConfig(
            str(corpus_path), backend="dense", encoder="hash:512", fp16=fp16, index_dir=f"{corpus_path}.{fp16}"
        )
        Retriever.from_config(cfg)
        sizes[fp16] = (cfg.resolved_index_dir() / "index.faiss").stat().st_size
    assert sizes[True] < 0.6 * sizes[False]


def test_hashing_encoder_is_normalised_and_deterministic():
    enc = HashingEncoder(64)
    a, b = enc.encode(["hello world", "hello world"]), enc.encode(["hello world"])
    assert a.shape == (2, 64) and abs(float((a[0] ** 2).sum()) - 1.0) < 1e-5
    assert (a[0] == b[0]).all()


def test_missing_sentence_transformers_is_a_clear_error(corpus_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # makes the import fail
    with pytest.raises(retriever_mod.RetrieverError, match="pip install sentence-transformers"):
        Retriever.from_config(RetrieverConfig(str(corpus_path), backend="dense", encoder="intfloat/e5-base-v2"))


# --------------------------------------------------------------------------------------------------- HTTP server


def test_server_speaks_search_r1_protocol(bm25_retriever):
    with serve_in_thread(bm25_retriever, default_topk=2) as url:
        health = httpx.get(f"{url}/health").json()
        assert health == {"status": "ok", "default_topk": 2, "backend": "bm25", "num_docs": 36}

        scored = httpx.post(
            f"{url}/retrieve", json={"queries": ["capital of Germany"], "topk": 1, "return_scores": True}
        )
        (hit,) = scored.json()["result"][0]
        assert set(hit) == {"document", "score"} and isinstance(hit["score"], float)
        assert hit["document"] == {
            "id": "d1",
            "contents": '"Berlin"\nBerlin is the capital of Germany and its largest city by population.',
        }

        # Search-R1 returns the bare documents when return_scores is false (its default).
        bare = httpx.post(f"{url}/retrieve", json={"queries": ["capital of Germany", "pet mammal city"]}).json()[
            "result"
        ]
        assert [len(row) for row in bare] == [2, 2]  # topk omitted -> the server's default
        assert bare[0][0] == hit["document"] and bare[1][0]["id"] == "d3"

        assert httpx.post(f"{url}/retrieve", json={"queries": []}).json() == {"result": []}
        assert httpx.post(f"{url}/retrieve", json={"queries": "not a list"}).status_code == 422
        assert httpx.post(f"{url}/retrieve", json={"queries": ["x"], "topk": 0}).status_code == 422


def test_concurrent_requests_are_batched_and_answered_individually():
    batch_sizes = []

    def search_fn(queries, topk):
        batch_sizes.append(len(queries))
        return [
            [{"document": {"id": q, "contents": f"{q}\n{i}"}, "score": float(i)} for i in range(topk)] for q in queries
        ]

    async def fire(url):
        async with httpx.AsyncClient() as client:
            requests = [
                client.post(f"{url}/retrieve", json={"queries": [f"q{i}"], "topk": 1 + i % 3}) for i in range(12)
            ]
            return [r.json()["result"] for r in await asyncio.gather(*requests)]

    with serve_in_thread(search_fn=search_fn, batch_wait_ms=100) as url:
        results = asyncio.run(fire(url))
    for i, result in enumerate(results):
        assert len(result) == 1 and len(result[0]) == 1 + i % 3  # each request keeps its own topk
        assert result[0][0]["id"] == f"q{i}"
    assert sum(batch_sizes) == 12 and max(batch_sizes) > 1


def test_search_runs_off_the_event_loop():
    release = threading.Event()

    def slow_search(queries, topk):
        release.wait(5)
        return [[] for _ in queries]

    with serve_in_thread(search_fn=slow_search, batch_wait_ms=0) as url:
        pending = threading.Thread(target=lambda: httpx.post(f"{url}/retrieve", json={"queries": ["q"]}, timeout=10))
        pending.start()
        time.sleep(0.1)
        started = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=2).status_code == 200  # not stuck behind the search
        assert time.perf_counter() - started < 1.0
        release.set()
        pending.join()


def test_search_failure_is_an_http_500():
    def broken(queries, topk):
        raise RuntimeError("index exploded")

    with serve_in_thread(search_fn=broken) as url:
        response = httpx.post(f"{url}/retrieve", json={"queries": ["q"]})
    assert response.status_code == 500 and "index exploded" in response.json()["detail"]


def test_port_in_use_is_named_and_port_zero_picks_a_free_one():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is already in use.*--port 0"):
            bind_socket("127.0.0.1", port)
        free = bind_socket("127.0.0.1", 0)
        assert free.getsockname()[1] not in (0, port)
        free.close()
    finally:
        holder.close()


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_build_only_and_start_up_errors(corpus_path, tmp_path, capsys):
    assert retriever_mod.main(["--corpus", str(corpus_path), "--build-only", "--log-level", "warning"]) == 0
    assert "index ready" in capsys.readouterr().out

    assert retriever_mod.main(["--corpus", str(tmp_path / "missing.jsonl")]) == 2
    assert "corpus file not found" in capsys.readouterr().err

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        assert retriever_mod.main(["--corpus", str(corpus_path), "--port", str(port), "--log-level", "warning"]) == 2
    finally:
        holder.close()
    assert f"port {port}" in capsys.readouterr().err


def test_cli_serves_over_http_in_a_subprocess(corpus_path, tmp_path):
    port_file = tmp_path / "port"
    cmd = [sys.executable, "-m", "recipe.carl.search.retriever", "--corpus", str(corpus_path), "--port", "0",
           "--port-file", str(port_file), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        for _ in range(100):  # the port file is written just before uvicorn starts accepting
            try:
                response = httpx.post(f"{url}/retrieve", json={"queries": ["capital of Germany"], "topk": 1})
                break
            except httpx.ConnectError:
                time.sleep(0.05)
        assert response.json()["result"][0][0]["id"] == "d1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_dense_without_encoder_says_which_flag_to_pass(corpus_path):
    with pytest.raises(retriever_mod.RetrieverError, match="dense backend needs an encoder: pass --encoder"):
        Retriever.from_config(RetrieverConfig(str(corpus_path), backend="dense"))


def test_launch_script_builds_and_checks_the_corpus(corpus_path, tmp_path):
    script = REPO_ROOT / "scripts" / "launch_retriever.sh"
    env = {**os.environ, "PYTHON": sys.executable, "CORPUS": str(corpus_path), "BACKEND": "dense", "ENCODER": "hash:32"}
    done = subprocess.run(["bash", str(script), "--build-only"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"index ready: {corpus_path}.dense_index (36 documents)" in done.stdout

    env["CORPUS"] = str(tmp_path / "missing.jsonl")
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "corpus file not found" in done.stderr
