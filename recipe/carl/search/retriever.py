"""Local retrieval for the search agent: corpus loading, cached BM25/dense indexes, and the server CLI.

Corpus: a JSONL file, one ``{"id": ..., "contents": "Title\\ntext"}`` object per line (Search-R1's wiki-18 format;
``id`` defaults to the line number). Backends:

* ``bm25`` (default): bm25s with the PyStemmer English stemmer and English stop words. Sub-second to index 10k
  passages on CPU. Documents that match no query term (score 0) are not returned.
* ``dense``: any sentence-transformers encoder (or the offline ``hash[:dim]`` feature-hashing encoder, meant for tests
  and smoke runs) plus faiss. ``--index-type flat`` is exact inner product, ``ivf`` is approximate (``--nlist`` cells,
  ``--nprobe`` probed). ``--fp16`` stores vectors as float16 (faiss scalar quantiser), halving memory: a wiki-18
  e5-base index is about 65 GB flat fp32, 32 GB flat fp16, and IVF does not add much on top. Embeddings are encoded
  and added in chunks, so building never holds all of them in memory.

Index cache: ``<index-dir>/manifest.json`` records the corpus (absolute path, size, mtime, optionally sha256), the
backend and every setting that changes the index. At start-up a missing index is built; a stale one (corpus or
settings changed) is rebuilt, or refused with ``--on-stale error``; an unreadable one raises ``CorruptIndexError``
that says to rebuild with ``--rebuild``. Builds go to a temporary directory that replaces the old one only when
complete, so an interrupted build never leaves a half-written index behind.

Serve it (Search-R1 protocol, see ``server.py``)::

    python -m recipe.carl.search.retriever --corpus data/wiki.jsonl --port 8000
    python -m recipe.carl.search.retriever --corpus data/wiki.jsonl --backend dense \\
        --encoder intfloat/e5-base-v2 --query-prefix "query: " --doc-prefix "passage: " --index-type ivf --fp16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CorruptIndexError",
    "Corpus",
    "CorpusError",
    "HashingEncoder",
    "Retriever",
    "RetrieverConfig",
    "RetrieverError",
    "StaleIndexError",
    "load_corpus",
    "main",
]

MANIFEST_NAME = "manifest.json"
#: Bumped when the on-disk layout changes, so old caches are rebuilt rather than misread.
MANIFEST_VERSION = 1

Hit = tuple[int, float]  # (document position in the corpus, score)


class RetrieverError(RuntimeError):
    """Base class for the retriever's start-up errors; the CLI prints them without a traceback."""


class CorpusError(RetrieverError):
    """The corpus file is missing, empty or malformed."""


class StaleIndexError(RetrieverError):
    """The cached index was built from another corpus or with other settings."""


class CorruptIndexError(RetrieverError):
    """The cached index cannot be read."""


# ----------------------------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Documents kept as two parallel lists (cheaper than one dict per document for millions of passages)."""

    path: Path
    ids: list[str]
    contents: list[str]

    def __len__(self) -> int:
        return len(self.contents)

    def document(self, position: int) -> dict[str, str]:
        """Returns the document at ``position`` as Search-R1 does: ``{"id", "contents"}``."""
        return {"id": self.ids[position], "contents": self.contents[position]}


def load_corpus(path: str | os.PathLike) -> Corpus:
    """Reads a JSONL corpus of ``{"id", "contents"}`` lines.

    Args:
        path: The corpus file. Blank lines are skipped.

    Returns:
        The corpus.

    Raises:
        CorpusError: The file is missing or empty, a line is not a JSON object, or ``contents`` is not a
            non-empty string; the message names the line number.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path} (expected a JSONL file of {{'id', 'contents'}} lines)")
    ids: list[str] = []
    contents: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{line_no}: not valid JSON ({e.msg}); fix or delete that line") from e
            if not isinstance(row, dict):
                raise CorpusError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            text = row.get("contents")
            if not isinstance(text, str) or not text.strip():
                raise CorpusError(
                    f"{path}:{line_no}: 'contents' must be a non-empty string ('Title\\ntext'), got {text!r:.80}"
                )
            ids.append(str(row.get("id", line_no - 1)))
            contents.append(text)
    if not contents:
        raise CorpusError(f"corpus file is empty: {path} (expected at least one {{'id', 'contents'}} line)")
    return Corpus(path=path, ids=ids, contents=contents)


def _file_fingerprint(path: Path, with_hash: bool) -> dict[str, Any]:
    stat = path.stat()
    fingerprint: dict[str, Any] = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if with_hash:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        fingerprint["sha256"] = digest.hexdigest()
    return fingerprint


# ----------------------------------------------------------------------------------------------------------------
# Encoders (dense backend)
# ----------------------------------------------------------------------------------------------------------------


class Encoder(Protocol):
    """Maps texts to L2-normalised float32 vectors of shape (len(texts), dim)."""

    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class HashingEncoder:
    """Offline bag-of-words feature hashing: deterministic, no model download; for tests and smoke runs only."""

    def __init__(self, dim: int = 256):
        self.dim = dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for token in re.findall(r"\w+", text.lower()):
                h = zlib.crc32(token.encode())
                out[row, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


class SentenceTransformerEncoder:
    """A sentence-transformers model (a hub name or a local directory), normalised embeddings."""

    def __init__(self, name: str, device: str | None = None, fp16: bool = False, batch_size: int = 256):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise RetrieverError(
                f"the dense backend with encoder {name!r} needs sentence-transformers: "
                "pip install sentence-transformers (or use --encoder hash for an offline test encoder)"
            ) from e
        self.model = SentenceTransformer(name, device=device)
        if fp16 and str(self.model.device).startswith("cuda"):
            self.model.half()  # halves encoder memory and time on GPU; CPU fp16 matmuls are slow, so not there
        self.batch_size = batch_size
        self.dim = int(self.model.get_sentence_embedding_dimension())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def load_encoder(name: str, device: str | None = None, fp16: bool = False, batch_size: int = 256) -> Encoder:
    """``hash`` or ``hash:<dim>`` gives ``HashingEncoder``; anything else is a sentence-transformers model."""
    if name == "hash" or name.startswith("hash:"):
        return HashingEncoder(int(name.split(":", 1)[1]) if ":" in name else 256)
    return SentenceTransformerEncoder(name, device=device, fp16=fp16, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------


class BM25Backend:
    """bm25s index over stemmed, stop-word-filtered tokens."""

    def __init__(self, model: Any, num_docs: int):
        import Stemmer

        self.model = model
        self.num_docs = num_docs
        self._stemmer = Stemmer.Stemmer("english")

    @classmethod
    def build(cls, corpus: Corpus, out_dir: Path) -> BM25Backend:
        import bm25s
        import Stemmer

        tokens = bm25s.tokenize(
            corpus.contents, stopwords="en", stemmer=Stemmer.Stemmer("english"), show_progress=False
        )
        model = bm25s.BM25()
        model.index(tokens, show_progress=False)
        model.save(str(out_dir))
        return cls(model, len(corpus))

    @classmethod
    def load(cls, index_dir: Path, num_docs: int) -> BM25Backend:
        import bm25s

        return cls(bm25s.BM25.load(str(index_dir)), num_docs)

    def search(self, queries: Sequence[str], topk: int) -> list[list[Hit]]:
        import bm25s

        k = min(topk, self.num_docs)  # bm25s refuses k larger than the corpus
        tokens = bm25s.tokenize(
            list(queries), stopwords="en", stemmer=self._stemmer, return_ids=False, show_progress=False
        )
        docs, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        return [
            [(int(d), float(s)) for d, s in zip(row_docs, row_scores, strict=True) if s > 0]
            for row_docs, row_scores in zip(docs, scores, strict=True)
        ]


class DenseBackend:
    """faiss inner-product index over normalised embeddings (cosine similarity)."""

    INDEX_FILE = "index.faiss"

    def __init__(self, index: Any, encoder: Encoder, query_prefix: str = "", nprobe: int = 16):
        self.index = index
        self.encoder = encoder
        self.query_prefix = query_prefix
        if _is_ivf(index):
            faiss_ivf(index).nprobe = nprobe

    @classmethod
    def build(cls, corpus: Corpus, out_dir: Path, encoder: Encoder, cfg: RetrieverConfig) -> DenseBackend:
        import faiss
        from tqdm import tqdm

        n, dim = len(corpus), encoder.dim
        metric = faiss.METRIC_INNER_PRODUCT
        if cfg.index_type == "flat":
            if cfg.fp16:
                index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, metric)
            else:
                index = faiss.IndexFlatIP(dim)
        else:
            nlist = cfg.resolved_nlist(n)
            quantizer = faiss.IndexFlatIP(dim)
            if cfg.fp16:
                index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16, metric)
            else:
                index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
            # No own_fields=True here: faiss' Python wrapper already keeps the quantizer alive, and owning it
            # too would free it twice (a segfault at garbage collection).
            # k-means needs a sample, not every vector: ~256 points per cell is plenty (faiss' own guidance).
            sample = np.linspace(0, n - 1, num=min(n, 256 * nlist)).astype(np.int64)
            index.train(encoder.encode([cfg.doc_prefix + corpus.contents[i] for i in sample]))
        if not index.is_trained:
            index.train(np.zeros((1, dim), dtype=np.float32))  # scalar quantiser fp16 needs no real statistics
        step = cfg.encode_batch_size
        for start in tqdm(range(0, n, step), desc="encoding corpus", disable=n <= step):
            chunk = [cfg.doc_prefix + text for text in corpus.contents[start : start + step]]
            index.add(encoder.encode(chunk))
        faiss.write_index(index, str(out_dir / cls.INDEX_FILE))
        return cls(index, encoder, cfg.query_prefix, cfg.nprobe)

    @classmethod
    def load(cls, index_dir: Path, encoder: Encoder, cfg: RetrieverConfig) -> DenseBackend:
        import faiss

        index = faiss.read_index(str(index_dir / cls.INDEX_FILE))
        if index.d != encoder.dim:
            raise CorruptIndexError(f"{index_dir}: index dimension {index.d} != encoder dimension {encoder.dim}")
        return cls(index, encoder, cfg.query_prefix, cfg.nprobe)

    def search(self, queries: Sequence[str], topk: int) -> list[list[Hit]]:
        vectors = self.encoder.encode([self.query_prefix + q for q in queries])
        scores, positions = self.index.search(vectors, min(topk, self.index.ntotal))
        # faiss pads with -1 when an IVF probe finds fewer than k vectors.
        return [
            [(int(p), float(s)) for p, s in zip(row_pos, row_scores, strict=True) if p >= 0]
            for row_pos, row_scores in zip(positions, scores, strict=True)
        ]


def _is_ivf(index: Any) -> bool:
    try:
        faiss_ivf(index)
        return True
    except RuntimeError:
        return False


def faiss_ivf(index: Any) -> Any:
    """The IVF part of a faiss index (raises RuntimeError for a flat index)."""
    import faiss

    return faiss.extract_index_ivf(index)


# ----------------------------------------------------------------------------------------------------------------
# Retriever
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RetrieverConfig:
    """How to build or load an index. Fields marked (index) are in the manifest: changing them rebuilds."""

    corpus_path: str
    """JSONL corpus, one {"id", "contents"} object per line."""
    backend: Literal["bm25", "dense"] = "bm25"
    """(index) bm25 (bm25s) or dense (encoder + faiss)."""
    index_dir: str | None = None
    """Where the index and its manifest live; default: "<corpus>.<backend>_index" next to the corpus."""
    encoder: str | None = None
    """(index, dense; required) sentence-transformers model name or path, or "hash[:dim]" (offline test encoder)."""
    index_type: Literal["flat", "ivf"] = "flat"
    """(index, dense) flat = exact search; ivf = approximate, much less search time on big corpora."""
    fp16: bool = False
    """(index, dense) store vectors as float16 (half the memory); also runs the encoder in fp16 on GPU."""
    nlist: int | None = None
    """(index, dense ivf) number of IVF cells; default 4 * sqrt(num_docs)."""
    nprobe: int = 16
    """(dense ivf) cells searched per query: higher = better recall, slower. Not part of the index."""
    query_prefix: str = ""
    """(dense) prepended to queries, e.g. "query: " for e5."""
    doc_prefix: str = ""
    """(index, dense) prepended to passages before encoding, e.g. "passage: " for e5."""
    encode_batch_size: int = 256
    """(dense) passages encoded per chunk while building."""
    device: str | None = None
    """(dense) encoder device, e.g. "cuda" or "cpu"; default: sentence-transformers' choice."""
    hash_corpus: bool = False
    """Record the corpus sha256 (slow on big files) instead of trusting size + mtime to detect changes."""
    on_stale: Literal["rebuild", "error"] = "rebuild"
    """What to do when the cached index does not match the corpus or settings."""
    rebuild: bool = False
    """Rebuild even if a matching index exists (also the fix for a corrupt index)."""

    def resolved_index_dir(self) -> Path:
        if self.index_dir:
            return Path(self.index_dir)
        return Path(f"{self.corpus_path}.{self.backend}_index")

    def resolved_nlist(self, num_docs: int) -> int:
        return max(1, min(num_docs, self.nlist or int(4 * math.sqrt(num_docs))))

    def index_settings(self, num_docs: int) -> dict[str, Any]:
        """The settings that shape the index on disk (compared against the manifest)."""
        if self.backend == "bm25":
            return {"backend": "bm25", "stemmer": "english", "stopwords": "en"}
        settings: dict[str, Any] = {
            "backend": "dense",
            "encoder": self.encoder or "<custom>",
            "index_type": self.index_type,
            "fp16": self.fp16,
            "doc_prefix": self.doc_prefix,
        }
        if self.index_type == "ivf":
            settings["nlist"] = self.resolved_nlist(num_docs)
        return settings


@dataclass
class Retriever:
    """A corpus plus a search backend; ``search`` is thread-safe (one search at a time)."""

    corpus: Corpus
    backend: BM25Backend | DenseBackend
    config: RetrieverConfig
    manifest: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_config(cls, cfg: RetrieverConfig, encoder: Encoder | None = None) -> Retriever:
        """Loads the corpus, then loads the cached index or (re)builds it.

        Args:
            cfg: Build/load settings.
            encoder: Dense backend only: an encoder object to use instead of loading ``cfg.encoder``.

        Raises:
            CorpusError: See ``load_corpus``.
            StaleIndexError: The cache does not match and ``cfg.on_stale == "error"``.
            CorruptIndexError: The cache exists but cannot be read (rebuild with ``rebuild=True`` / ``--rebuild``).
        """
        if cfg.backend not in ("bm25", "dense"):
            raise RetrieverError(f"unknown backend {cfg.backend!r}; use 'bm25' or 'dense'")
        if cfg.index_type not in ("flat", "ivf"):
            raise RetrieverError(f"unknown index type {cfg.index_type!r}; use 'flat' or 'ivf'")
        if cfg.backend == "dense" and encoder is None and not cfg.encoder:
            raise RetrieverError(
                "the dense backend needs an encoder: pass --encoder <sentence-transformers model or path> "
                "(e.g. intfloat/e5-base-v2 with --query-prefix 'query: ' --doc-prefix 'passage: '), "
                "or --encoder hash for the offline test encoder"
            )
        corpus = load_corpus(cfg.corpus_path)
        if cfg.backend == "dense" and encoder is None:
            encoder = load_encoder(cfg.encoder, device=cfg.device, fp16=cfg.fp16, batch_size=cfg.encode_batch_size)
        index_dir = cfg.resolved_index_dir()
        expected = {
            "version": MANIFEST_VERSION,
            "corpus": _file_fingerprint(corpus.path, cfg.hash_corpus),
            "num_docs": len(corpus),
            "index": cfg.index_settings(len(corpus)),
        }
        manifest_path = index_dir / MANIFEST_NAME
        if manifest_path.exists() and not cfg.rebuild:
            manifest = _read_manifest(manifest_path)
            mismatch = _manifest_mismatch(manifest, expected)
            if mismatch is None:
                logger.info("loading cached %s index from %s", cfg.backend, index_dir)
                return cls(corpus, _load_backend(index_dir, corpus, cfg, encoder), cfg, manifest)
            if cfg.on_stale == "error":
                raise StaleIndexError(
                    f"cached index {index_dir} is stale: {mismatch}. Rebuild it with --rebuild (or on_stale='rebuild'),"
                    " or point --index-dir somewhere else"
                )
            logger.warning("cached index %s is stale (%s); rebuilding", index_dir, mismatch)
        elif index_dir.exists() and any(index_dir.iterdir()) and not cfg.rebuild:
            raise CorruptIndexError(
                f"{index_dir} exists but has no {MANIFEST_NAME} (an interrupted build, or not an index directory). "
                "Delete it or pass --rebuild"
            )
        return cls(corpus, _build(index_dir, corpus, cfg, encoder, expected), cfg, expected)

    @property
    def num_docs(self) -> int:
        return len(self.corpus)

    def search(self, queries: Sequence[str], topk: int) -> list[list[Hit]]:
        """Returns, for each query, up to ``topk`` (document position, score) pairs, best first."""
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if not queries:
            return []
        with self._lock:  # bm25s and faiss calls are not documented as re-entrant; CPU-bound anyway
            return self.backend.search(queries, topk)

    def search_documents(self, queries: Sequence[str], topk: int) -> list[list[dict[str, Any]]]:
        """``search`` in Search-R1's shape: per query a list of ``{"document": {"id", "contents"}, "score"}``."""
        return [
            [{"document": self.corpus.document(pos), "score": score} for pos, score in hits]
            for hits in self.search(queries, topk)
        ]


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptIndexError(
            f"cannot read index manifest {path}: {e}. Delete {path.parent} or pass --rebuild"
        ) from e
    if not isinstance(manifest, dict):
        raise CorruptIndexError(f"index manifest {path} is not a JSON object. Delete {path.parent} or pass --rebuild")
    return manifest


def _manifest_mismatch(manifest: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """Describes the first difference between a stored manifest and the expected one, or None when they match."""
    if manifest.get("version") != expected["version"]:
        return f"manifest version {manifest.get('version')} != {expected['version']}"
    if manifest.get("index") != expected["index"]:
        return f"index settings changed: stored {manifest.get('index')}, requested {expected['index']}"
    stored, current = manifest.get("corpus") or {}, expected["corpus"]
    if stored.get("path") != current["path"]:
        return f"built from corpus {stored.get('path')}, not {current['path']}"
    if "sha256" in current and "sha256" in stored:
        if stored["sha256"] != current["sha256"]:
            return "corpus content changed (sha256 differs)"
    elif (stored.get("size"), stored.get("mtime_ns")) != (current["size"], current["mtime_ns"]):
        return "corpus file changed (size or modification time differs)"
    if manifest.get("num_docs") != expected["num_docs"]:
        return f"index has {manifest.get('num_docs')} documents, corpus has {expected['num_docs']}"
    return None


def _load_backend(index_dir: Path, corpus: Corpus, cfg: RetrieverConfig, encoder: Encoder | None):
    try:
        if cfg.backend == "bm25":
            return BM25Backend.load(index_dir, len(corpus))
        assert encoder is not None
        return DenseBackend.load(index_dir, encoder, cfg)
    except CorruptIndexError:
        raise
    except Exception as e:  # bm25s/faiss raise assorted errors on truncated or foreign files
        raise CorruptIndexError(
            f"cannot load the {cfg.backend} index in {index_dir} ({type(e).__name__}: {e}). "
            "Delete the directory or pass --rebuild"
        ) from e


def _build(index_dir: Path, corpus: Corpus, cfg: RetrieverConfig, encoder: Encoder | None, manifest: dict):
    """Builds into a temporary sibling directory and swaps it in, so readers never see a partial index."""
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = index_dir.with_name(f".{index_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    started = time.perf_counter()
    try:
        if cfg.backend == "bm25":
            backend = BM25Backend.build(corpus, tmp_dir)
        else:
            assert encoder is not None
            backend = DenseBackend.build(corpus, tmp_dir, encoder, cfg)
        manifest = {**manifest, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        # The manifest is written last: a directory without it is an incomplete build.
        (tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        shutil.rmtree(index_dir, ignore_errors=True)
        os.replace(tmp_dir, index_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info(
        "built %s index over %d documents in %.1fs: %s",
        cfg.backend,
        len(corpus),
        time.perf_counter() - started,
        index_dir,
    )
    return backend


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    defaults = RetrieverConfig(corpus_path="")
    p = argparse.ArgumentParser(
        prog="python -m recipe.carl.search.retriever",
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
    p.add_argument("--hash-corpus", action="store_true", help="detect corpus changes by sha256, not size+mtime")
    p.add_argument("--on-stale", choices=["rebuild", "error"], default=defaults.on_stale)
    p.add_argument("--rebuild", action="store_true", help="rebuild the index even if the cache matches")
    p.add_argument("--build-only", action="store_true", help="build or check the index, then exit")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed, and see --port-file)")
    p.add_argument("--port-file", default=None, help="write the bound port here once the server listens")
    p.add_argument("--topk", type=int, default=3, help="default topk when a request does not give one")
    p.add_argument("--max-batch", type=int, default=256, help="most queries searched together")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long to gather concurrent requests")
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
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code (2 for a start-up error, printed without a traceback)."""
    from recipe.carl.search.server import PortInUseError, serve

    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        retriever = Retriever.from_config(config_from_args(args))
        logger.info("retriever ready: %s", json.dumps(asdict(retriever.config), default=str))
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
            port_file=args.port_file,
            log_level=args.log_level,
        )
    except (RetrieverError, PortInUseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
