"""recipe.carl.io: whole-file writes with public modes."""

import json
import os
import stat

import pytest

from recipe.carl.io import atomic_dir, atomic_path, read_jsonl, write_json, write_jsonl, write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_mode_open_would_give(tmp_path, umask_022):
    assert mode(write_text(tmp_path / "a.txt", "x")) == 0o644
    assert mode(write_json(tmp_path / "b.json", {"a": 1})) == 0o644
    assert mode(write_jsonl(tmp_path / "c.jsonl", [{"a": 1}])) == 0o644
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f.bin").write_bytes(b"1")
    assert mode(tmp_path / "d") == 0o755 and mode(tmp_path / "d" / "f.bin") == 0o644


def test_round_trip(tmp_path):
    write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, {"b": "é"}])
    assert read_jsonl(tmp_path / "r.jsonl") == [{"a": 1}, {"b": "é"}]
    assert json.loads((write_json(tmp_path / "j.json", [1, 2])).read_text()) == [1, 2]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_a_folder_is_replaced_whole(tmp_path):
    with atomic_dir(tmp_path / "m") as tmp:
        (tmp / "old").write_text("1")
    with atomic_dir(tmp_path / "m") as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["new"]
    with pytest.raises(ValueError), atomic_dir(tmp_path / "m") as tmp:
        (tmp / "broken").write_text("3")
        raise ValueError
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
