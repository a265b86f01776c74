"""`python -m recipe.carl.evaluate.study`: saved per-question files of two arms x three RL seeds compared without
rolling out, against arrays built by hand from the same numbers; and the folders it refuses, by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recipe.carl.evaluate.stats import macro_interval, mean_interval, paired_difference, paired_macro_difference
from recipe.carl.evaluate.study import main

#: Two data sets of 6 and 3 questions; EM per (arm, seed, data set, question), drawn once with a fixed generator.
RNG = np.random.default_rng(0)
SETS = {"nq": 6, "bamboogle": 3}
EM = {arm: {s: {d: (RNG.random(n) < p).astype(float) for d, n in SETS.items()} for s in range(3)}
      for arm, p in (("CARL", 0.6), ("GRPO", 0.4))}  # fmt: skip


def write_eval(folder, values, with_results=True, label="policy", extra_question=False):
    """An evaluation's --out as `recipe.carl.evaluate` leaves it: results.json and <label>/<data_source>.jsonl."""
    (folder / label).mkdir(parents=True)
    for d, em in values.items():
        records = [
            {"data_source": d, "file": f"/data/{d}.parquet", "row": i, "question": f"{d} q{i}", "em": float(x),
             "f1": float(x) / 2, "format": 1.0, "reward": float(x), "samples": []}
            for i, x in enumerate(em)
        ]  # fmt: skip
        if extra_question:
            records.append({**records[0], "row": 99, "question": "only here"})
        (folder / label / f"{d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if with_results:
        (folder / "results.json").write_text(json.dumps({"models": {label: {}}}))


def arrays(arm):
    """[shape: (3 seeds, 9 questions)], questions in the study's order (data sets by name, then row), and strata."""
    order = sorted(SETS)
    x = np.array([np.concatenate([EM[arm][s][d] for d in order]) for s in range(3)])
    return x, np.repeat(order, [SETS[d] for d in order])


def test_two_arms_three_seeds_give_the_bootstrap_of_the_hand_built_arrays(tmp_path, capsys):
    folders = {arm: [tmp_path / f"{arm}_{s}" for s in range(3)] for arm in EM}
    for arm, paths in folders.items():
        for s, path in enumerate(paths):
            write_eval(path, EM[arm][s], extra_question=(arm, s) == ("GRPO", 1))
    result = main(
        [
            "--out",
            str(tmp_path / "study"),
            *[a for arm, paths in folders.items() for a in ("--arm", arm, *map(str, paths))],
        ]
    )
    m = result["metrics"]["em"]
    carl, strata = arrays("CARL")
    grpo, _ = arrays("GRPO")
    assert m["questions"] == 9 and m["data_sets"] == {"bamboogle": 3, "nq": 6}
    assert result["left_out"] == {str(folders["GRPO"][1] / "policy"): 2}  # its extra question, in each data set
    got = m["arms"]["CARL"]
    want = macro_interval(carl, strata)
    assert got["by_data_set"]["macro"] == {"mean": want.estimate, "low": want.low, "high": want.high}
    assert want.estimate == pytest.approx(np.mean([carl[:, strata == d].mean() for d in ("bamboogle", "nq")]))
    nq = mean_interval(carl[:, strata == "nq"])
    assert got["by_data_set"]["nq"] == {"mean": nq.estimate, "low": nq.low, "high": nq.high}
    diff = paired_macro_difference(carl, grpo, strata)
    assert got["minus_reference"]["macro"] == {"mean": diff.estimate, "low": diff.low, "high": diff.high}
    d_nq = paired_difference(carl[:, strata == "nq"], grpo[:, strata == "nq"])
    assert got["minus_reference"]["nq"]["mean"] == pytest.approx(d_nq.estimate)
    assert "minus_reference" not in m["arms"]["GRPO"]  # the reference (the last arm)
    assert result["metrics"]["f1"]["arms"]["CARL"]["by_data_set"]["macro"]["mean"] == pytest.approx(want.estimate / 2)
    printed = capsys.readouterr().out
    assert "| CARL − GRPO |" in printed and "draw RL seeds, then questions" in printed
    assert (tmp_path / "study" / "study.md").read_text().strip() == printed.strip()


def test_unequal_seeds_give_means_but_no_paired_difference(tmp_path):
    for arm, seeds in (("CARL", 2), ("GRPO", 3)):
        for s in range(seeds):
            write_eval(tmp_path / f"{arm}_{s}", EM[arm][s], with_results=False)
    args = ["--arm", "CARL", *(str(tmp_path / f"CARL_{s}" / "policy") for s in range(2))]
    args += ["--arm", "GRPO", *(str(tmp_path / f"GRPO_{s}" / "policy") for s in range(3))]
    carl = main([*args, "--out", str(tmp_path / "s"), "--metric", "em"])["metrics"]["em"]["arms"]["CARL"]
    assert carl["minus_reference"] is None and "2 seeds against 3 for GRPO" in carl["note"]


def test_bad_folders_and_options_are_named(tmp_path):
    write_eval(tmp_path / "one", EM["CARL"][0])
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "results.json").write_text(json.dumps({"models": {"a": {}, "b b": {}}}))
    (tmp_path / "empty").mkdir()
    cases = [
        (["--arm", "X", str(tmp_path / "nope")], "no such folder"),
        (
            ["--arm", "X", str(tmp_path / "two")],
            f"holds 2 models: give one of their folders: {tmp_path / 'two' / 'a'}, ",
        ),
        (["--arm", "X", str(tmp_path / "empty")], "holds neither per-question files"),
        (["--arm", "X", str(tmp_path / "one"), "--reference", "Y"], "--reference Y: not an arm"),
        (["--arm", "X", str(tmp_path / "one"), "--metric", "acc"], "--metric acc: unknown"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
            main([*args, "--out", str(tmp_path / "s")])
