"""verl's `file` metrics logger under the recipe's plugin: a resumed run keeps every earlier step, exactly once.

The logger is built exactly as verl's trainer builds it (`Tracking(..., default_backend=["file"], config=...)`), and
`recipe.carl.metrics_file` is never imported here: the plugin must install it when verl imports its tracking module.
"""

from __future__ import annotations

import json

import pytest
import verl  # noqa: F401  (loads the recipe's plugin, as in every verl process)
from verl.utils import tracking


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(path, monkeypatch, steps, val_before_train=False, val_at=None):
    """One trainer run: an optional validation line at `val_at`, then one line per step."""
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    config = {"trainer": {"val_before_train": val_before_train}}
    logger = tracking.Tracking("p", "e", default_backend=["file"], config=config)
    if val_at is not None:
        logger.log({"val/score": 0.5, "run": "new"}, step=val_at)
    for step in steps:
        logger.log({"loss": float(step), "run": "new"}, step=step)
    logger.finish()


def old_run(path, steps, with_val=False):
    with path.open("w") as f:
        for step in steps:
            data = {"loss": -1.0, "run": "old", **({"val/score": 0.1} if with_val else {})}
            f.write(json.dumps({"step": step, "data": data}) + "\n")


def test_verl_builds_the_resumable_logger():
    assert tracking.FileLogger.__module__ == "recipe.carl.metrics_file"


def test_a_resumed_run_keeps_the_steps_before_its_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    old_run(path, [1, 2, 3])  # killed after step 3's line; the last checkpoint is step 2
    run(path, monkeypatch, steps=[3, 4])
    assert [(r["step"], r["data"]["run"]) for r in lines(path)] == [(1, "old"), (2, "old"), (3, "new"), (4, "new")]


def test_the_resumed_validation_joins_the_checkpoint_steps_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    old_run(path, [1, 2, 3], with_val=True)
    run(path, monkeypatch, steps=[3, 4], val_before_train=True, val_at=2)
    records = lines(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1]["data"] == {"loss": -1.0, "run": "new", "val/score": 0.5}  # step 2's loss, the new validation


@pytest.mark.parametrize(("val_before_train", "first"), [(False, 1), (True, 0)])
def test_a_fresh_run_starts_an_empty_file(tmp_path, monkeypatch, val_before_train, first):
    path = tmp_path / "metrics.jsonl"
    old_run(path, [0, 1, 2, 3])
    run(path, monkeypatch, steps=[1, 2], val_before_train=val_before_train, val_at=0 if val_before_train else None)
    assert [r["step"] for r in lines(path)] == list(range(first, 3))
    assert {r["data"]["run"] for r in lines(path)} == {"new"}


def test_a_line_cut_short_by_a_kill_is_dropped(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    old_run(path, [1, 2])
    with path.open("a") as f:
        f.write('{"step": 3, "data": {"lo')
    run(path, monkeypatch, steps=[3])
    assert [r["step"] for r in lines(path)] == [1, 2, 3]


def test_a_run_that_logs_nothing_leaves_the_file_alone(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    old_run(path, [1, 2])
    before = path.read_text()
    run(path, monkeypatch, steps=[])
    assert path.read_text() == before


def test_without_a_path_the_metrics_go_beside_the_checkpoints(tmp_path, monkeypatch):
    """No VERL_FILE_LOGGER_PATH or _ROOT: `<trainer.default_local_dir>/metrics.jsonl`, resumable there; _ROOT keeps
    verl's layout, `<root>/<project>/<experiment>.jsonl`."""
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH", raising=False)
    monkeypatch.delenv("VERL_FILE_LOGGER_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    checkpoints = tmp_path / "ckpt" / "exp"
    config = {"trainer": {"val_before_train": False, "default_local_dir": str(checkpoints)}}
    for steps in ([1, 2], [3]):
        logger = tracking.Tracking("p", "e", default_backend=["file"], config=config)
        for step in steps:
            logger.log({"loss": float(step)}, step=step)
        logger.finish()
    assert [r["step"] for r in lines(checkpoints / "metrics.jsonl")] == [1, 2, 3]
    assert not (tmp_path / "p").exists()  # verl's default folder, in the working directory
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", str(tmp_path / "root"))
    tracking.Tracking("p", "e", default_backend=["file"], config=config).log({"loss": 0.0}, step=1)
    assert lines(tmp_path / "root" / "p" / "e.jsonl") == [{"step": 1, "data": {"loss": 0.0}}]
