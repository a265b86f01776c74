"""Retriever: corpus errors, BM25/dense search, index cache and manifest, and the HTTP server over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from recipe.carl.search import retriever as retriever_mod
from recipe.carl.search import server as server_mod
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
    with pytest.raises(CorruptIndexError, match=r"index file .* has 7 bytes, the manifest says \d+.*--rebuild"):
        Retriever.from_config(cfg)
    cfg.verify_index = False  # sizes are checked even then
    with pytest.raises(CorruptIndexError, match="has 7 bytes"):
        Retriever.from_config(cfg)


def overwrite_middle(path: Path, n: int = 16) -> None:
    """Same-size garbage: ``n`` bytes in the middle of the file become 0xFF."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + n] = b"\xff" * len(data[middle : middle + n])
    path.write_bytes(bytes(data))


def edit_keeping_size_and_mtime(path: Path, old: str, new: str) -> None:
    assert len(old) == len(new)
    stat = path.stat()
    path.write_text(path.read_text().replace(old, new))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_manifest_records_checksums_of_the_corpus_and_every_index_file(corpus_path):
    cfg = RetrieverConfig(corpus_path=str(corpus_path))
    Retriever.from_config(cfg)
    index_dir = cfg.resolved_index_dir()
    manifest = json.loads((index_dir / MANIFEST_NAME).read_text())
    assert manifest["corpus"]["sha256"] == hashlib.sha256(corpus_path.read_bytes()).hexdigest()
    names = sorted(p.name for p in index_dir.iterdir() if p.name != MANIFEST_NAME)
    assert sorted(manifest["files"]) == names and "data.csc.index.npy" in names
    for name, entry in manifest["files"].items():
        data = (index_dir / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("backend", ["bm25", "dense"])
def test_same_size_garbage_in_an_index_file_is_refused_at_start_up(corpus_path, backend):
    cfg = RetrieverConfig(corpus_path=str(corpus_path), backend=backend, encoder="hash:32")
    Retriever.from_config(cfg)
    for path in sorted(cfg.resolved_index_dir().iterdir()):
        if path.name == MANIFEST_NAME:
            continue
        original = path.read_bytes()
        overwrite_middle(path)
        with pytest.raises(CorruptIndexError, match=f"index file .*{path.name} does not match the sha256.*--rebuild"):
            Retriever.from_config(cfg)
        path.write_bytes(original)
    cfg.rebuild = True  # the fix the message names
    overwrite_middle(next(p for p in cfg.resolved_index_dir().iterdir() if p.name != MANIFEST_NAME))
    assert top_title(Retriever.from_config(cfg), "capital of Germany") == "Berlin"


def test_unverified_index_that_finds_nothing_fails_the_start_up_probe(corpus_path):
    cfg = RetrieverConfig(corpus_path=str(corpus_path), verify_index=False)
    Retriever.from_config(cfg)
    indptr = cfg.resolved_index_dir() / "indptr.csc.index.npy"
    data = indptr.read_bytes()
    indptr.write_bytes(data[:128] + b"\xff" * (len(data) - 128))  # loads, then every search finds nothing
    with pytest.raises(CorruptIndexError, match="finds nothing for words of its own first document.*--rebuild"):
        Retriever.from_config(cfg)


def test_index_that_loads_but_cannot_search_fails_the_start_up_probe(corpus_path, monkeypatch):
    cfg = RetrieverConfig(corpus_path=str(corpus_path))
    Retriever.from_config(cfg)

    def broken(self, queries, topk, **kwargs):
        raise IndexError("index 4294967295 is out of bounds")

    monkeypatch.setattr(BM25Backend, "search", broken)
    with pytest.raises(CorruptIndexError, match="loads but cannot search .*out of bounds.*--rebuild"):
        Retriever.from_config(cfg)


@pytest.mark.parametrize("hash_corpus_at_load", [False, True])
def test_same_size_corpus_edit_with_the_old_mtime_is_not_served_stale(corpus_path, hash_corpus_at_load):
    # Built without --hash-corpus; loaded with or without it: the edit is seen either way.
    Retriever.from_config(RetrieverConfig(corpus_path=str(corpus_path)))
    edit_keeping_size_and_mtime(corpus_path, "capital of Germany", "capital of Hungary")
    strict = RetrieverConfig(corpus_path=str(corpus_path), hash_corpus=hash_corpus_at_load, on_stale="error")
    with pytest.raises(StaleIndexError, match="stale: corpus file changed.*--rebuild"):
        Retriever.from_config(strict)
    rebuilt = Retriever.from_config(RetrieverConfig(corpus_path=str(corpus_path), hash_corpus=hash_corpus_at_load))
    assert top_title(rebuilt, "capital of Hungary") == "Berlin"


def test_a_version_1_cache_without_checksums_is_stale(corpus_path):
    cfg = RetrieverConfig(corpus_path=str(corpus_path), on_stale="error")
    Retriever.from_config(cfg)
    manifest_path = cfg.resolved_index_dir() / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    del manifest["corpus"]["sha256"], manifest["files"]
    manifest_path.write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(StaleIndexError, match="manifest version 1 != 2 .*cannot be verified.*--rebuild"):
        Retriever.from_config(cfg)


def test_touched_or_moved_identical_corpus_keeps_its_index(corpus_path, tmp_path, monkeypatch):
    index_dir = str(tmp_path / "index")
    Retriever.from_config(RetrieverConfig(corpus_path=str(corpus_path), index_dir=index_dir))
    moved = corpus_path.rename(tmp_path / "moved.jsonl")
    os.utime(moved, (time.time() + 100, time.time() + 100))
    monkeypatch.setattr(BM25Backend, "build", lambda *a, **k: pytest.fail("rebuilt an unchanged corpus"))
    cfg = RetrieverConfig(corpus_path=str(moved), index_dir=index_dir, on_stale="error")
    assert top_title(Retriever.from_config(cfg), "capital of Germany") == "Berlin"


def test_corpus_hash_is_of_the_file_and_line_numbers_count_blank_lines(make_corpus):
    lines = [json.dumps({"id": f"d{i}", "contents": f"T{i}\n\u00e9t\u00e9 \u2028 {'x' * i}"}) for i in range(12)]
    path = make_corpus("lines.jsonl", lines=[*lines[:5], "", *lines[5:]])
    corpus = load_corpus(path)
    assert corpus.ids == [f"d{i}" for i in range(12)] and corpus.contents[3] == "T3\n\u00e9t\u00e9 \u2028 xxx"
    assert corpus.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(path.read_bytes().rstrip(b"\n") + b'\n{"contents": "caf\xe9"}')  # no final newline
    with pytest.raises(CorpusError, match=r"lines.jsonl:14: not valid UTF-8 .* at byte 17 of the line"):
        load_corpus(path)


def test_non_utf8_corpus_line_is_named(make_corpus):
    path = make_corpus("latin1.jsonl", lines=[json.dumps({"id": "a", "contents": "T\nx"})])
    path.write_bytes(path.read_bytes() + '{"id": "b", "contents": "Caf\u00e9\nx"}\n'.encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1.jsonl:2: not valid UTF-8 .*re-encode"):
        load_corpus(path)


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
        assert health == {"status": "ok", "default_topk": 2, "backend": "bm25", "num_docs": 36,
                          "max_queries": 1024, "max_query_chars": 8192}  # fmt: skip

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
        # Not stuck behind the search: the search holds its thread for 5 s, the health check's timeout is 2 s.
        assert httpx.get(f"{url}/health", timeout=2).status_code == 200
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
    assert server_mod.main(["--corpus", str(corpus_path), "--build-only", "--log-level", "warning"]) == 0
    assert "index ready" in capsys.readouterr().out

    assert server_mod.main(["--corpus", str(tmp_path / "missing.jsonl")]) == 2
    assert "corpus file not found" in capsys.readouterr().err

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        assert server_mod.main(["--corpus", str(corpus_path), "--port", str(port), "--log-level", "warning"]) == 2
    finally:
        holder.close()
    assert f"port {port}" in capsys.readouterr().err


def test_cli_serves_over_http_in_a_subprocess(corpus_path, tmp_path):
    port_file = tmp_path / "port"
    cmd = [sys.executable, "-m", "recipe.carl.search.server", "--corpus", str(corpus_path), "--port", "0",
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


def fake_python(folder: Path, body: str) -> Path:
    """An executable ``folder/python3`` shell script (a stand-in for an environment's interpreter)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "python3"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def launch(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    script = REPO_ROOT / "scripts" / "launch_retriever.sh"
    return subprocess.run(["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_launch_script_uses_the_python_on_path_and_the_callers_relative_paths(corpus_path, tmp_path):
    # No PYTHON, no CARL_VENV, no .venv in the repository: the active interpreter (first python3 on PATH) serves.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "CARL_VENV")}
    bin_dir = tmp_path / "active_env" / "bin"
    fake_python(bin_dir, f'exec {sys.executable} "$@"')
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["CORPUS"] = corpus_path.name  # relative to the caller's directory, not the repository's
    done = launch(["--build-only", "--log-level", "warning"], env, cwd=corpus_path.parent)
    assert done.returncode == 0, done.stderr
    assert f"index ready: {corpus_path}.bm25_index (36 documents)" in done.stdout


def test_launch_script_uses_carl_venv_and_names_a_python_without_the_packages(corpus_path, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["CORPUS"] = str(corpus_path)
    env["CARL_VENV"] = str(tmp_path / "venv")
    fake_python(tmp_path / "venv" / "bin", f'exec {sys.executable} "$@"').rename(tmp_path / "venv" / "bin" / "python")
    done = launch(["--build-only"], env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    env.pop("CARL_VENV")
    env["PYTHON"] = str(fake_python(tmp_path / "bare", "exit 1"))  # an interpreter without fastapi, bm25s, ...
    done = launch([], env, cwd=tmp_path)
    assert done.returncode == 2
    assert f"python '{tmp_path}/bare/python3' cannot import the retriever's packages" in done.stderr
    assert "set PYTHON=/path/to/python" in done.stderr


def test_launch_script_keeps_the_encoder_off_the_first_training_gpu(corpus_path, tmp_path):
    """DEVICE defaults to cpu (sentence-transformers' own default is cuda:0, the first GPU verl trains on); a GPU
    outside the trainer's is asked for by name."""
    env = {**os.environ, "PYTHON": str(fake_python(tmp_path / "echo", 'echo "$@"')), "CORPUS": str(corpus_path)}
    args = launch([], {**env, "BACKEND": "dense", "ENCODER": "hash:32"}, cwd=tmp_path).stdout.split()
    assert args[args.index("--device") + 1] == "cpu"
    args = launch([], {**env, "DEVICE": "cuda:7"}, cwd=tmp_path).stdout.split()
    assert args[args.index("--device") + 1] == "cuda:7"


# --------------------------------------------------------------------------------------------------- ties


def test_stable_top_k_cuts_ties_by_corpus_position():
    # Scores by position: 0.5 at 1, 3, 4, 6 (four tied, more than k), 0.9 at 5, 0 elsewhere. k = 3: 5 first, then
    # the two lowest positions among the tied ones, 1 and 3. Any order of the input gives the same answer.
    scores = np.array([0.0, 0.5, 0.0, 0.5, 0.5, 0.9, 0.5, 0.0], dtype=np.float32)
    assert retriever_mod.stable_top_k(scores, 3) == [(5, pytest.approx(0.9)), (1, 0.5), (3, 0.5)]
    perm = np.random.default_rng(0).permutation(len(scores))
    assert retriever_mod.stable_top_k(scores[perm], 3, perm) == retriever_mod.stable_top_k(scores, 3)
    assert [p for p, _ in retriever_mod.stable_top_k(scores, 20)] == [5, 1, 3, 4, 6, 0, 2, 7]  # k > n: all, by key
    assert retriever_mod.stable_top_k(scores, 0) == [] and retriever_mod.stable_top_k(scores[:0], 2) == []


def _tied_corpus(tmp_path: Path, copies: int = 6) -> Path:
    # `copies` identical passages (equal BM25 and dense scores for any query) among distinct ones, at known positions.
    lines = [{"id": f"d{i}", "contents": f"Filler {i}\nunrelated words number {i} about weather"} for i in range(4)]
    tied = [{"id": f"t{j}", "contents": "Twin\nthe twin passage about rivers and bridges"} for j in range(copies)]
    rows = lines[:2] + tied[:3] + lines[2:] + tied[3:]  # tied ones at positions 2, 3, 4, 7, 8, ...
    path = tmp_path / "tied.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("backend", ["bm25", "dense"])
def test_planted_ties_beyond_k_return_the_lowest_positions(tmp_path, backend):
    path = _tied_corpus(tmp_path)
    cfg = RetrieverConfig(str(path), backend=backend, encoder="hash:64", index_dir=str(tmp_path / f"{backend}_idx"))
    retriever = Retriever.from_config(cfg)
    hits = retriever.search(["twin passage rivers bridges"], 2)[0]
    assert [p for p, _ in hits] == [2, 3]  # six documents tie at the top; the cut keeps the first two in the corpus
    assert hits[0][1] == hits[1][1]
    # Four of the six tied: still the first four positions (faiss is asked again with more candidates).
    assert [p for p, _ in retriever.search(["twin passage rivers bridges"], 4)[0]] == [2, 3, 4, 7]
