"""`benchmarks/bench_packing.py` on shrunken 7B-shaped trees: its last line, its token ratio, its log-prob check, and
the GPU settings' code path (remove-padding layout, gradient checkpointing) run on the CPU."""

import pytest

from benchmarks.bench_packing import main, tree_from_json, tree_to_json

SMALL = ["--workloads", "7B-shape", "--scale", "0.05", "--count-trees", "4", "--time-trees", "1", "--repeats", "1"]


def _fields(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in (part.split("=") for part in line.split()[1:])}


@pytest.mark.parametrize("extra", [[], ["--layout", "packed", "--checkpointing"]])
def test_last_line_names_the_workload_and_its_ratio(extra):
    (line,) = main(SMALL + extra)
    assert line.startswith("7B-shape ratio=")
    fields = _fields(line)
    assert 0 < fields["ratio"] <= 0.5 and fields["grpo_ratio"] < 1
    assert fields["max_abs_logp_diff"] < 1e-4 and fields["time_ratio"] > 0


def test_tree_json_round_trip():
    from benchmarks.bench_packing import shaped_trees

    (tree,), _ = shaped_trees(1, scale=0.02)
    again = tree_from_json(tree_to_json(tree))
    assert [n.action.token_ids if n.action else None for n in again.nodes] == [
        n.action.token_ids if n.action else None for n in tree.nodes
    ]
    assert [(n.parent, n.terminal, n.reward) for n in again.nodes] == [
        (n.parent, n.terminal, n.reward) for n in tree.nodes
    ]
