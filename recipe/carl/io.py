"""Whole-file writes: every file the recipe publishes is written beside its target and renamed into place.

A reader (or a Ctrl-C, a SIGTERM, a full disk) never sees half a file, and the result has the mode an ordinary
`open()` would give it (0644 under the usual umask), not the private 0600 of a temporary file.

    write_text(path, text)          write_json(path, obj)          write_jsonl(path, records)
    with atomic_path(path) as tmp:  ...any writer that takes a path (parquet, safetensors, a PNG)...
    with atomic_dir(path) as tmp:   ...a writer that fills a folder (save_pretrained)...
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_path", "public_mode", "read_jsonl", "write_json", "write_jsonl", "write_text"]


def public_mode(mode: int = 0o666) -> int:
    """`mode` under the process umask: what `open()` (0o666) or `mkdir()` (0o777) would create."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it becomes `path` (mode as `open()` gives), else vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, public_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary folder beside `path`; on success it replaces `path` (an existing folder is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for entry in [tmp, *tmp.rglob("*")]:
            os.chmod(entry, public_mode(0o777 if entry.is_dir() else 0o666))
        if path.exists():  # os.replace cannot replace a non-empty folder
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Writes `text` (UTF-8) to `path` whole."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 1) -> Path:
    """Writes `obj` as JSON to `path` whole."""
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Any]) -> Path:
    """Writes one JSON object per line to `path` whole."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)


def read_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    """The JSON objects of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
