"""`benchmarks/bench_retriever.py` in its tiny mode: it runs end to end and reports counts (never checks times)."""

import re

from benchmarks.bench_retriever import main, make_corpus, make_queries


def test_corpus_and_queries_are_deterministic(tmp_path):
    first = make_corpus(tmp_path / "a.jsonl", 50)
    assert make_corpus(tmp_path / "b.jsonl", 50) == first
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 50
    assert make_queries(first, 5) == make_queries(first, 5)


def test_tiny_run_reports_every_phase(capsys):
    assert main(["--tiny"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == "errors=0"
    assert re.fullmatch(r"ratio=\d+\.\d\d", lines[-1])
    counts = dict(item.split("=") for line in lines if line.startswith("requests=") for item in line.split())
    assert counts["requests"] == "40" and counts["clients"] == "4" and counts["fairness_errors"] == "0"
    assert all(int(n) > 0 for n in counts["small_requests"].split("+"))
    assert any(line.startswith("in process, single queries:") for line in lines)
    assert any(line.startswith("HTTP, one client, single queries:") for line in lines)
    # CARL's burst through the recipe's client: one worker, then both (--tiny: 2 workers x 16 searches, 1 round)
    bursts = [line for line in lines if line.startswith("CARL burst through RetrievalClient")]
    assert [re.search(r"(\d+) worker\(s\) x (\d+) searches", b).groups() for b in bursts] == [("1", "16"), ("2", "16")]
    assert all("errors 0," in b for b in bursts) and lines[-3] == "burst_errors=0"
    assert [re.search(r"\(n=(\d+)\)", b).group(1) for b in bursts] == ["16", "32"]
