"""Local retrieval for the search agent: corpus loading, cached BM25/dense indexes with verified content.

Corpus: a JSONL file, one ``{"id": ..., "contents": "Title\\ntext"}`` object per line (Search-R1's wiki-18 format;
``id`` defaults to the line number). Hits are ordered by score, equal scores by corpus position, on every machine
(``stable_top_k``). Backends:

* ``bm25`` (default): bm25s with the PyStemmer English stemmer and English stop words. Sub-second to index 10k
  passages on CPU. Documents that match no query term (score 0) are not returned. ``BM25Backend.from_texts`` is the
  same index in memory, without a corpus file (SynthHop's environment uses it).
* ``dense``: any sentence-transformers encoder (or the offline ``hash[:dim]`` feature-hashing encoder, meant for tests
  and smoke runs) plus faiss. ``--index-type flat`` is exact inner product, ``ivf`` is approximate (``--nlist`` cells,
  ``--nprobe`` probed). ``--fp16`` stores vectors as float16 (faiss scalar quantiser), halving memory: a wiki-18
  e5-base index is about 65 GB flat fp32, 32 GB flat fp16, and IVF does not add much on top. Embeddings are encoded
  and added in chunks, so building never holds all of them in memory.

Index cache and integrity: ``<index-dir>/manifest.json`` records the corpus (path, size, mtime and its sha256), the
backend, every setting that changes the index, and the size and sha256 of every index file. At start-up:

* the corpus is hashed while it is read (one pass, so nearly free next to parsing its JSON); a corpus whose content
  differs from the manifest's (even with the same size and modification time) makes the index stale: it is rebuilt,
  or refused with ``--on-stale error``. A touched but identical corpus is not rebuilt. Caches from before content
  hashes (manifest version 1) are stale in the same way;
* every index file is checked against its size and sha256 (``CorruptIndexError`` naming the file and the fix,
  ``--rebuild``), then the index is loaded and one probe search runs, so a damaged index fails at start-up and not
  on every search afterwards. Hashing reads each index file once more: about 1.6 GB/s per core for sha256 here,
  i.e. seconds for a BM25 index of wiki-18 and about 40 s for a 65 GB flat dense index when it is in the page cache
  (disk speed otherwise). ``--no-verify-index`` (``verify_index=False``) skips the hashes of a trusted large index;
  the size check and the probe search still run.

Builds go to a temporary directory that replaces the old one only when complete (``recipe.carl.io.atomic_dir``), so an
interrupted build never leaves a half-written index behind.

Serve it (Search-R1 protocol; the CLI lives in ``server.py``)::

    python -m recipe.carl.search.server --corpus data/wiki.jsonl --port 8000
    python -m recipe.carl.search.server --corpus data/wiki.jsonl --backend dense \\
        --encoder intfloat/e5-base-v2 --query-prefix "query: " --doc-prefix "passage: " --index-type ivf --fp16
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from recipe.carl.io import atomic_dir, write_json

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
    "stable_top_k",
]

MANIFEST_NAME = "manifest.json"
#: Bumped when the on-disk layout changes, so old caches are rebuilt rather than misread. Version 2 added the
#: corpus sha256 and the index files' sizes and sha256 (a version-1 cache cannot be verified, so it is stale).
MANIFEST_VERSION = 2

Hit = tuple[int, float]  # (document position in the corpus, score)


class RetrieverError(RuntimeError):
    """Base class for the retriever's start-up errors; the CLI prints them without a traceback."""


class CorpusError(RetrieverError):
    """The corpus file is missing, empty or malformed."""


class StaleIndexError(RetrieverError):
    """The cached index was built from another corpus or with other settings."""


class CorruptIndexError(RetrieverError):
    """The cached index cannot be read, or its files differ from the checksums in its manifest."""


# ----------------------------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Documents kept as two parallel lists (cheaper than one dict per document for millions of passages)."""

    path: Path
    ids: list[str]
    contents: list[str]
    sha256: str | None = None
    """Hex sha256 of the file's bytes as they were read (None for a corpus built in memory)."""

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
        The corpus, with the sha256 of exactly the bytes that were parsed (hashed in the same pass, so the index
        built from it and the checksum in its manifest cannot disagree).

    Raises:
        CorpusError: The file is missing or empty, a line is not UTF-8 or not a JSON object, or ``contents`` is not
            a non-empty string; the message names the line number.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path} (expected a JSONL file of {{'id', 'contents'}} lines)")
    ids: list[str] = []
    contents: list[str] = []
    # Hashing line by line in the parsing pass costs what hashing the file alone does (~0.08 s per 100 MB here, against
    # ~0.5 s to parse it); reading and decoding in large blocks instead measured no faster.
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            digest.update(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start} of the line); "
                    "re-encode the file as UTF-8 or delete that line"
                ) from e
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
    return Corpus(path=path, ids=ids, contents=contents, sha256=digest.hexdigest())


def _corpus_fingerprint(corpus: Corpus) -> dict[str, Any]:
    """Path, size and mtime (for people reading the manifest) and the sha256 (what staleness is decided on)."""
    stat = corpus.path.stat()
    return {
        "path": str(corpus.path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": corpus.sha256,
    }


def _sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _index_files(index_dir: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of an index directory except its manifest, by path relative to the directory."""
    return {
        str(path.relative_to(index_dir)): {"size": path.stat().st_size, "sha256": _sha256_file(path)}
        for path in sorted(index_dir.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def verify_index_files(index_dir: Path, manifest: dict[str, Any], *, hashes: bool = True) -> None:
    """Checks every index file named in the manifest against its recorded size and (with ``hashes``) sha256.

    Raises:
        CorruptIndexError: A file is missing, has another size or other content; the message names the file and the
            fix (``--rebuild``).
    """
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptIndexError(
            f"index manifest {index_dir / MANIFEST_NAME} lists no index files to verify. Rebuild it with --rebuild"
        )
    fix = f"The index in {index_dir} is damaged; rebuild it with --rebuild (or delete the directory)"
    for name, expected in files.items():
        path = index_dir / name
        if not path.is_file():
            raise CorruptIndexError(f"index file {path} is missing. {fix}")
        size = path.stat().st_size
        if size != expected.get("size"):
            raise CorruptIndexError(
                f"index file {path} has {size} bytes, the manifest says {expected.get('size')}. {fix}"
            )
        if hashes and _sha256_file(path) != expected.get("sha256"):
            raise CorruptIndexError(f"index file {path} does not match the sha256 in its manifest. {fix}")


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


def stable_top_k(scores: np.ndarray, k: int, positions: np.ndarray | None = None) -> list[Hit]:
    """The ``k`` best hits by the key (score descending, then corpus position ascending): the same on every machine.

    Which of several equal scores makes a top-k cut must not be left to a selection algorithm: numpy's partition and
    sort (under bm25s' and faiss' top-k) order equal elements by whatever SIMD kernel the CPU dispatches to, so the
    same query returned different documents on an AVX2 and an AVX-512 machine. The cut here is by value: every
    candidate scoring at least the k-th best score is kept (all ties, however many), then ordered by the key.

    Args:
        scores: one score per candidate [shape: (n,)].
        k: hits wanted (fewer when there are fewer candidates).
        positions: the candidates' corpus positions [shape: (n,)]; default ``arange(n)`` (``scores`` covers the
            whole corpus).

    Returns:
        Up to ``k`` ``(position, score)`` pairs, best first.
    """
    scores = np.asarray(scores)
    positions = np.arange(len(scores)) if positions is None else np.asarray(positions)
    if k < 1 or not len(scores):
        return []
    if k < len(scores):
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]  # the k-th best value (a value: no order)
        keep = np.flatnonzero(scores >= kth)
        scores, positions = scores[keep], positions[keep]
    order = np.lexsort((positions, -scores))[:k]  # the last key is the primary one
    return [(int(positions[i]), float(scores[i])) for i in order]


class BM25Backend:
    """bm25s index over stemmed, stop-word-filtered tokens (the project's one BM25: the server and SynthHop use it)."""

    def __init__(self, model: Any, num_docs: int):
        import Stemmer

        self.model = model
        self.num_docs = num_docs
        self._stemmer = Stemmer.Stemmer("english")

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> BM25Backend:
        """Indexes ``texts`` ("Title\\ntext" contents) in memory; document positions are the list positions."""
        import bm25s
        import Stemmer

        tokens = bm25s.tokenize(list(texts), stopwords="en", stemmer=Stemmer.Stemmer("english"), show_progress=False)
        model = bm25s.BM25()
        model.index(tokens, show_progress=False)
        return cls(model, len(texts))

    @classmethod
    def build(cls, corpus: Corpus, out_dir: Path) -> BM25Backend:
        backend = cls.from_texts(corpus.contents)
        backend.model.save(str(out_dir))
        return backend

    @classmethod
    def load(cls, index_dir: Path, num_docs: int) -> BM25Backend:
        import bm25s

        return cls(bm25s.BM25.load(str(index_dir)), num_docs)

    def query_terms(self, query: str) -> list[str]:
        """The stemmed, stop-word-filtered terms BM25 searches for ``query``."""
        import bm25s

        return bm25s.tokenize([query], stopwords="en", stemmer=self._stemmer, return_ids=False, show_progress=False)[0]

    def search(self, queries: Sequence[str], topk: int, *, keep_unmatched: bool = False) -> list[list[Hit]]:
        """Up to ``topk`` hits per query, best first.

        Args:
            queries: The queries.
            topk: Hits per query (clamped to the corpus size).
            keep_unmatched: Also return documents that match no query term (score 0), filling the ``topk`` in corpus
                order. Off for the server (they are noise); SynthHop's observations keep them, as its seed-0 data
                (and the shipped SFT start, keyed on those tokens) was generated that way.

        Equal scores are cut and ordered by corpus position (``stable_top_k``), the same on every machine.
        """
        import bm25s

        tokens = bm25s.tokenize(
            list(queries), stopwords="en", stemmer=self._stemmer, return_ids=False, show_progress=False
        )
        out = []
        for terms in tokens:
            # bm25s' own `retrieve` cuts the k best with numpy's partition and sort, which leave equal scores in an
            # order that depends on the CPU's SIMD kernels: the scores are taken here and cut by (score, position).
            scores = self.model.get_scores(terms) if terms else np.zeros(self.num_docs, dtype=np.float32)
            hits = stable_top_k(np.asarray(scores), topk)
            out.append([(p, s) for p, s in hits if keep_unmatched or s > 0])
        return out


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
        """Up to ``topk`` hits per query, best first, equal scores in corpus order (see ``stable_top_k``).

        faiss keeps the k best in a heap whose order among equal scores is its own, so the cut is made here: a query
        is searched again with twice the candidates until the last one scores below the k-th (every tie is in).
        """
        vectors = self.encoder.encode([self.query_prefix + q for q in queries])
        out: list[list[Hit]] = []
        for vector in vectors:
            k = min(topk, self.index.ntotal)
            fetch = min(k + 8, self.index.ntotal)
            while True:
                scores, positions = self.index.search(vector[None, :], fetch)
                found = positions[0] >= 0  # faiss pads with -1 when an IVF probe finds fewer than asked
                row_scores, row_pos = scores[0][found], positions[0][found]
                complete = fetch >= self.index.ntotal or len(row_pos) < fetch or len(row_pos) <= k
                if complete or row_scores[-1] < row_scores[k - 1]:
                    break
                fetch = min(2 * fetch, self.index.ntotal)
            out.append(stable_top_k(row_scores, k, row_pos))
        return out


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
    """Kept for old callers; no effect: the corpus sha256 is always recorded and compared (computed while reading)."""
    on_stale: Literal["rebuild", "error"] = "rebuild"
    """What to do when the cached index does not match the corpus or settings."""
    rebuild: bool = False
    """Rebuild even if a matching index exists (also the fix for a corrupt index)."""
    verify_index: bool = True
    """Check every index file's sha256 against the manifest at start-up (sizes and a probe search always run)."""

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
            CorruptIndexError: The cache exists but a file is missing, differs from its manifest's size or sha256,
                cannot be read, or the loaded index cannot search (rebuild with ``rebuild=True`` / ``--rebuild``).
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
            "corpus": _corpus_fingerprint(corpus),
            "num_docs": len(corpus),
            "index": cfg.index_settings(len(corpus)),
        }
        manifest_path = index_dir / MANIFEST_NAME
        if manifest_path.exists() and not cfg.rebuild:
            manifest = _read_manifest(manifest_path)
            mismatch = _manifest_mismatch(manifest, expected)
            if mismatch is None:
                logger.info("loading cached %s index from %s", cfg.backend, index_dir)
                started = time.perf_counter()
                verify_index_files(index_dir, manifest, hashes=cfg.verify_index)
                if cfg.verify_index:
                    logger.info("index files verified (sha256) in %.1fs", time.perf_counter() - started)
                retriever = cls(corpus, _load_backend(index_dir, corpus, cfg, encoder), cfg, manifest)
                retriever.probe()
                return retriever
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
        backend, manifest = _build(index_dir, corpus, cfg, encoder, expected)
        return cls(corpus, backend, cfg, manifest)

    def probe(self) -> None:
        """One search with words of the first document, at start-up: an index that loads but raises, or finds nothing
        for words it was built from, fails here and not on every search afterwards.

        Raises:
            CorruptIndexError: The search raised or came back empty; the message names the index and the fix.
        """
        query = " ".join(self.corpus.contents[0].split()[:8])
        where = f"the {self.config.backend} index in {self.config.resolved_index_dir()}"
        try:
            hits = self.search([query], 1)[0]
        except Exception as e:
            raise CorruptIndexError(
                f"{where} loads but cannot search ({type(e).__name__}: {e}). Rebuild it with --rebuild"
            ) from e
        # Every indexed term has a positive BM25 weight, so words of an indexed document must find something.
        must_match = not isinstance(self.backend, BM25Backend) or bool(self.backend.query_terms(query))
        if must_match and not hits:
            raise CorruptIndexError(
                f"{where} finds nothing for words of its own first document ({query!r:.60}). Rebuild it with --rebuild"
            )

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
    """Describes the first difference between a stored manifest and the expected one, or None when they match.

    The corpus is compared by content (sha256) only: a moved or touched but identical corpus keeps its index, and an
    edit that keeps the size and the modification time does not.
    """
    if manifest.get("version") != expected["version"]:
        return (
            f"manifest version {manifest.get('version')} != {expected['version']} "
            "(version 1 caches hold no content checksums and cannot be verified)"
        )
    if manifest.get("index") != expected["index"]:
        return f"index settings changed: stored {manifest.get('index')}, requested {expected['index']}"
    stored, current = manifest.get("corpus") or {}, expected["corpus"]
    if stored.get("sha256") != current["sha256"]:
        return f"corpus file changed (the sha256 of {current['path']} differs from the one the index was built from)"
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


def _build(
    index_dir: Path, corpus: Corpus, cfg: RetrieverConfig, encoder: Encoder | None, manifest: dict[str, Any]
) -> tuple[BM25Backend | DenseBackend, dict[str, Any]]:
    """Builds into a temporary sibling directory and swaps it in, so readers never see a partial index.

    Returns:
        The backend and the manifest written with it (the expected one plus the index files' sizes and sha256).
    """
    started = time.perf_counter()
    with atomic_dir(index_dir) as tmp_dir:
        if cfg.backend == "bm25":
            backend = BM25Backend.build(corpus, tmp_dir)
        else:
            assert encoder is not None
            backend = DenseBackend.build(corpus, tmp_dir, encoder, cfg)
        manifest = {**manifest, "files": _index_files(tmp_dir), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        # The manifest is written last: a directory without it is an incomplete build.
        write_json(tmp_dir / MANIFEST_NAME, manifest, indent=2)
    logger.info(
        "built %s index over %d documents in %.1fs: %s",
        cfg.backend,
        len(corpus),
        time.perf_counter() - started,
        index_dir,
    )
    return backend, manifest


if __name__ == "__main__":
    # The server CLI moved to server.py, which imports this module (not the other way round).
    print(
        "error: the retriever CLI moved: python -m recipe.carl.search.server --corpus ... (same flags)",
        file=sys.stderr,
    )
    sys.exit(2)
