"""What building and loading a retriever index costs at growing corpus sizes, extrapolated to wiki-18 (21M passages).

A wiki-18-like corpus is generated for each size (deterministic, nothing downloaded): one passage per line,
`{"id", "contents": "Title\\n<100 words>"}`, the shape of Search-R1's `wiki-18.jsonl` (DPR's 100-word passages of the
2018 Wikipedia, each with its article title). Words are pseudo-words drawn from a Zipf law over a large vocabulary,
so a passage has a realistic number of distinct terms (printed as `terms/passage`). For each size the index is built
as the server's CLI builds it, in its own process (`python -m recipe.carl.search.server --corpus ... --build-only`),
then started again (verify the cache and load it, `--build-only` once more). Per run: wall seconds, peak resident
memory of that process (`wait4`'s `ru_maxrss`), and the index's size on disk.

Extrapolation to `--target` passages (default 21,015,324, wiki-18's count), two ways, both printed:

- **power law**: the exponent b of `y = a * N^b`, fitted by least squares on log-log over the measured sizes; the
  value at the target is `y(N_max) * (target / N_max)^b`, the largest measurement scaled by the measured exponent;
- **linear**: `y = c + d * N` fitted by least squares; the value at the target is `c + d * target`, the fixed cost
  (Python, imports) plus the measured cost per passage.

Memory and disk grow linearly with what is stored, so their power-law exponents fall below 1 while the fixed costs
weigh (small sizes) and the linear fit is the one to read for them; the power law shows whether time grows faster
than linearly. The fits use the sizes at or above `--fit-from`. `--report FILE` prints them again from a `--json` file.

    python -m benchmarks.bench_retriever_build --sizes 100000 300000 1000000           # BM25 (~15 min on 2 cores)
    python -m benchmarks.bench_retriever_build --backend dense --encoder <model> --sizes 2000 5000   # an encoder
    python -m benchmarks.bench_retriever_build --tiny                                   # seconds: the smoke test

The last line is `extrapolated: ...` with the target's build time, peak memory and index size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
WIKI18_PASSAGES = 21_015_324
"""Passages in wiki-18 (DPR's psgs_w100, the corpus of Search-R1's `wiki-18.jsonl`)."""
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "gu", "fe", "hi", "jo", "be")


def pseudo_words(n: int) -> list[str]:
    """`n` distinct pseudo-words, shortest first (rank 0 is the most frequent word)."""
    words = []
    for i in range(n):
        word, k = "", i + len(SYLLABLES)
        while k:
            k, r = divmod(k, len(SYLLABLES))
            word += SYLLABLES[r]
        words.append(word)
    return words


def make_corpus(path: Path, num_docs: int, seed: int = 0, vocab: int = 500_000, words: int = 100) -> float:
    """Writes `num_docs` wiki-18-like passages (a 2-4 word title, then `words` words) to `path`.

    Returns:
        The mean number of distinct words per passage (title included), measured on the first 2,000 passages.
    """
    rng = np.random.default_rng(seed)
    vocabulary = np.array(pseudo_words(vocab), dtype=object)
    distinct = []
    with path.open("w") as f:
        for start in range(0, num_docs, 10_000):
            n = min(10_000, num_docs - start)
            ranks = np.minimum(rng.zipf(1.15, size=(n, words + 4)), vocab) - 1  # Zipf, as word frequencies are
            title_len = rng.integers(2, 5, size=n)
            for i in range(n):
                title = " ".join(vocabulary[ranks[i, words : words + title_len[i]]]).title()
                body = " ".join(vocabulary[ranks[i, :words]])
                f.write(json.dumps({"id": str(start + i), "contents": f"{title}\n{body}"}) + "\n")
                if len(distinct) < 2_000:
                    distinct.append(len(set(ranks[i, : words + title_len[i]].tolist())))
    return float(np.mean(distinct))


def timed_process(args: list[str]) -> tuple[float, float]:
    """Runs `args`; returns (wall seconds, peak resident memory in GB of that process). Raises on failure."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{output.decode(errors='replace')[-2000:]}")
    return wall, usage.ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def folder_size(path: Path) -> float:
    """Bytes of the files under `path`, in GB."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1024**3


def fit_exponent(sizes: list[int], values: list[float]) -> float:
    """b of y = a N^b, least squares on log-log (1.0 when fewer than two sizes)."""
    if len(sizes) < 2:
        return 1.0
    slope, _ = np.polyfit(np.log(sizes), np.log(values), 1)
    return float(slope)


def extrapolate(sizes: list[int], values: list[float], target: int) -> tuple[float, float]:
    """(exponent, value at `target`), scaled from the largest size by the fitted exponent."""
    b = fit_exponent(sizes, values)
    return b, values[-1] * (target / sizes[-1]) ** b


def extrapolate_linear(sizes: list[int], values: list[float], target: int) -> tuple[float, float, float]:
    """(fixed cost c, cost per passage d, value at `target`) of y = c + d N, least squares (d from the two points
    if there are two; with one size, c = 0)."""
    if len(sizes) < 2:
        return 0.0, values[0] / sizes[0], values[0] / sizes[0] * target
    d, c = np.polyfit(np.asarray(sizes, dtype=float), np.asarray(values, dtype=float), 1)
    return float(c), float(d), float(c + d * target)


def report(rows: list[dict], target: int, fit_from: int) -> dict:
    """Both extrapolations of every quantity (module docstring), printed; returns them."""
    fitted = [r for r in rows if r["passages"] >= fit_from] or rows
    n = [r["passages"] for r in fitted]
    result = {}
    for key in QUANTITIES:
        values = [r[key] for r in fitted]
        b, power = extrapolate(n, values, target)
        c, d, linear = extrapolate_linear(n, values, target)
        result[key] = {"exponent": b, "at_target": power, "fixed": c, "per_passage": d, "linear_at_target": linear}
    print(f"fitted on {n}; at {target:,} passages (power law N^b | linear c + d N):")
    for key, v in result.items():
        print(f"  {key}: {v['at_target']:.4g} (b = {v['exponent']:.2f}) | {v['linear_at_target']:.4g} "
              f"(c = {v['fixed']:.3g}, d = {v['per_passage']:.3g} per passage)")  # fmt: skip
    hours = result["build_s"]["at_target"] / 3600
    print(
        f"extrapolated: build {hours:.2f} h (linear {result['build_s']['linear_at_target'] / 3600:.2f} h), "
        f"build peak {result['build_peak_gb']['linear_at_target']:.1f} GB, serving peak "
        f"{result['load_peak_gb']['linear_at_target']:.1f} GB, index {result['index_gb']['linear_at_target']:.1f} GB "
        f"(linear), load {result['load_s']['linear_at_target'] / 60:.1f} min (linear)"
        + ("" if all(math.isfinite(v["at_target"]) for v in result.values()) else " (some not finite)")
    )
    return result


def measure(size: int, work: Path, server_flags: list[str], seed: int) -> dict:
    """One size: generate the corpus, build the index, start again on the cache."""
    corpus = work / f"corpus_{size}.jsonl"
    terms = make_corpus(corpus, size, seed=seed)
    index = work / f"index_{size}"
    base = [sys.executable, "-m", "recipe.carl.search.server", "--corpus", str(corpus), "--index-dir", str(index)]
    base += [*server_flags, "--build-only", "--log-level", "warning"]
    build_s, build_gb = timed_process(base)
    load_s, load_gb = timed_process(base)
    row = {
        "passages": size,
        "terms_per_passage": terms,
        "corpus_gb": corpus.stat().st_size / 1024**3,
        "build_s": build_s,
        "build_peak_gb": build_gb,
        "load_s": load_s,
        "load_peak_gb": load_gb,
        "index_gb": folder_size(index),
    }
    corpus.unlink()
    return row


QUANTITIES = ("corpus_gb", "build_s", "build_peak_gb", "load_s", "load_peak_gb", "index_gb")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--backend", choices=["bm25", "dense"], default="bm25")
    parser.add_argument("--encoder", default=None, help="dense: a sentence-transformers model folder, or hash:<dim>")
    parser.add_argument("--device", default="cpu", help="dense: the encoder's device (default cpu)")
    parser.add_argument("--fp16", action="store_true", help="dense: float16 vectors")
    parser.add_argument("--target", type=int, default=WIKI18_PASSAGES, help="passages to extrapolate to")
    parser.add_argument("--fit-from", type=int, default=0, help="fit the exponents on sizes >= this (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="seconds: 200 and 600 passages (the smoke test)")
    parser.add_argument("--work-dir", default=None, help="where corpora and indexes go (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write the rows and the extrapolation here")
    parser.add_argument("--report", default=None, help="print the extrapolations of a --json file, measure nothing")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        report(saved["rows"], args.target, args.fit_from)
        return 0
    sizes = [200, 600] if args.tiny else sorted(args.sizes)
    flags = ["--backend", args.backend]
    if args.backend == "dense":
        if not args.encoder:
            parser.error("--backend dense needs --encoder (a sentence-transformers model folder, or hash:<dim>)")
        flags += ["--encoder", args.encoder, "--device", args.device] + (["--fp16"] if args.fp16 else [])
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        for size in sizes:
            rows.append(measure(size, Path(tmp), flags, args.seed))
            r = rows[-1]
            print(
                f"{r['passages']:>10,} passages ({r['terms_per_passage']:.1f} terms/passage, corpus "
                f"{r['corpus_gb']:.3f} GB): build {r['build_s']:.1f} s, peak {r['build_peak_gb']:.2f} GB; "
                f"load {r['load_s']:.1f} s, peak {r['load_peak_gb']:.2f} GB; index {r['index_gb']:.3f} GB",
                flush=True,
            )
    result = report(rows, args.target, args.fit_from)
    if args.json:
        record = {"backend": args.backend, "rows": rows, "target": args.target, "extrapolated": result}
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
