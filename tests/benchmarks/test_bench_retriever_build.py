"""`benchmarks/bench_retriever_build.py`: the tiny mode builds and loads real indexes and reports every quantity (never
its times), and the extrapolation recovers a power law given by hand."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_retriever_build as bench


def test_the_fit_recovers_a_power_law_and_scales_the_largest_size():
    sizes = [100, 1_000, 10_000]
    values = [3.0 * n**1.5 for n in sizes]
    exponent, at_target = bench.extrapolate(sizes, values, 1_000_000)
    assert exponent == pytest.approx(1.5)
    assert at_target == pytest.approx(3.0 * 1_000_000**1.5)
    assert bench.extrapolate([500], [2.0], 5_000) == (1.0, pytest.approx(20.0))  # one size: linear


def test_the_linear_fit_separates_the_fixed_cost_from_the_cost_per_passage(tmp_path, capsys):
    sizes = [25_000, 50_000, 100_000]
    fixed, per = bench.extrapolate_linear(sizes, [0.1 + 4e-6 * n for n in sizes], 21_000_000)[:2]
    assert (fixed, per) == (pytest.approx(0.1), pytest.approx(4e-6))
    assert bench.extrapolate_linear(sizes, [0.1 + 4e-6 * n for n in sizes], 1_000_000)[2] == pytest.approx(4.1)
    rows = [{"passages": n, **{k: 1.0 + n for k in bench.QUANTITIES}} for n in sizes]
    (tmp_path / "r.json").write_text(json.dumps({"rows": rows}))
    assert bench.main(["--report", str(tmp_path / "r.json"), "--target", "200000"]) == 0
    printed = capsys.readouterr().out
    assert "  build_s: 2e+05 (b = 1.00) | 2e+05 (c = 1, d = 1 per passage)" in printed  # y = 1 + N at N = 200,000


def test_the_corpus_has_wiki18s_shape(tmp_path):
    terms = bench.make_corpus(tmp_path / "c.jsonl", 50)
    lines = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(lines) == 50 and lines[7]["id"] == "7"
    title, body = lines[0]["contents"].split("\n")
    assert 2 <= len(title.split()) <= 4 and len(body.split()) == 100
    assert 30 < terms < 100  # distinct terms a passage, with repeats as in text


def test_tiny_mode_measures_build_and_load(tmp_path, capsys):
    assert bench.main(["--tiny", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert [r["passages"] for r in result["rows"]] == [200, 600]
    assert set(result["extrapolated"]) == set(bench.QUANTITIES) and result["target"] == 21_015_324
    assert all(r["index_gb"] > 0 and r["build_peak_gb"] > 0 for r in result["rows"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("extrapolated: build ")
