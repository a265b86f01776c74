"""`benchmarks/bench_stats.py`: it times both bootstrap paths on the same draws and reports whether they agree."""

import pytest

from benchmarks import bench_stats


def test_both_paths_give_one_interval_and_the_report_names_its_shape():
    got = bench_stats.main(["--seeds", "3", "--questions", "40", "--n-boot", "200"])
    assert got["shape"] == [3, 40] and got["n_boot"] == 200 and got["same_interval"] is True
    assert got["generic_over_fast"] == pytest.approx(got["generic_s"] / got["fast_s"])


def test_a_size_below_one_is_refused_by_name():
    with pytest.raises(SystemExit, match="--n-boot 0 must be >= 1"):
        bench_stats.main(["--n-boot", "0"])
