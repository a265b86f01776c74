"""verl's `file` logger, made resumable: a resumed run keeps every earlier step's metrics line, exactly once.

verl 0.9.1's `FileLogger` (`verl/utils/tracking.py`) opens its JSON-lines file with mode "wb", so a run resumed from
a checkpoint erases the metrics of every step before it. Importing this module (the recipe's verl plugin does so in
every process right after `verl.utils.tracking` is imported) replaces it by `ResumingFileLogger`: the same lines
(`{"step": s, "data": {...}}`), but an existing file is kept up to the checkpoint the trainer resumed from. The file
is `VERL_FILE_LOGGER_PATH`, else `$VERL_FILE_LOGGER_ROOT/<project>/<experiment>.jsonl` as in verl, else (neither
set) `metrics.jsonl` in the checkpoint folder (`trainer.default_local_dir`), where it survives with the checkpoints
it resumes from and where the plots look (`python -m recipe.carl.tiny.plots`); verl's own default is
`./<project>/<experiment>.jsonl` in whichever directory the TaskRunner runs.

The trainer's first line tells where that is: verl's V1 `fit()` logs the validation before training at the loaded
step N (`trainer.val_before_train`, read from the config `Tracking` gets), else step N + 1 first. Then:

- N = 0 (a fresh run, or no checkpoint to resume from): the file starts empty, as verl's does;
- N > 0: the lines of steps up to N stay, one per step; lines of later steps (logged after the checkpoint, before
  the run stopped; those steps run again now) are dropped; the resumed run's validation at step N joins step N's
  line (its keys replace the old validation's).

A step logged after its checkpoint was saved but before the run died is kept; a step whose checkpoint was saved but
whose line was not yet written (verl saves before it logs) has no line, and is not run again.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
from collections.abc import Mapping
from typing import Any

import orjson

from recipe.carl.io import atomic_path

_TRACKING_CONFIG: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "carl_tracking_config", default=None
)


def _read_lines(path: str) -> dict[int, dict[str, Any]]:
    """step -> merged data of an existing file's lines (a half-written last line of a killed run is left out)."""
    steps: dict[int, dict[str, Any]] = {}
    if not os.path.exists(path):
        return steps
    with open(path, "rb") as f:
        for line in f:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                steps.setdefault(record["step"], {}).update(record.get("data") or {})
    return steps


def _dumps(step: int, data: Mapping[str, Any]) -> bytes:
    return orjson.dumps({"step": step, "data": data}, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


METRICS_FILE = "metrics.jsonl"
"""The file's name in the checkpoint folder when neither `VERL_FILE_LOGGER_PATH` nor `VERL_FILE_LOGGER_ROOT` is set."""


def default_path(project_name: str, experiment_name: str, checkpoint_dir: str | None) -> str:
    """Where the metrics go: `VERL_FILE_LOGGER_PATH`; else verl's `$VERL_FILE_LOGGER_ROOT/<project>/<experiment>.jsonl`;
    else `<checkpoint_dir>/metrics.jsonl` for a local checkpoint folder; else verl's default under `.`."""
    if os.getenv("VERL_FILE_LOGGER_PATH"):
        return os.environ["VERL_FILE_LOGGER_PATH"]
    local = checkpoint_dir and "://" not in checkpoint_dir
    if os.getenv("VERL_FILE_LOGGER_ROOT") or not local:
        directory = os.path.join(os.path.expanduser(os.getenv("VERL_FILE_LOGGER_ROOT", ".")), project_name)
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, f"{experiment_name}.jsonl")
    return os.path.join(os.path.expanduser(str(checkpoint_dir)), METRICS_FILE)


class ResumingFileLogger:
    """Drop-in for verl's `FileLogger(project_name, experiment_name)` with `log(data, step)` and `finish()`."""

    def __init__(self, project_name: str, experiment_name: str):
        config = _TRACKING_CONFIG.get()
        trainer = (config or {}).get("trainer") or {}
        self.filepath = default_path(project_name, experiment_name, trainer.get("default_local_dir"))
        # Without the trainer's config (built outside `Tracking`), the first line is taken for a training step.
        self.val_before_train = config is not None and bool(trainer.get("val_before_train", True))
        self.fp = None
        print(f"Creating file logger at {os.path.abspath(self.filepath)} (resumable, recipe.carl.metrics_file)")

    def _start(self, step: int, data: Mapping[str, Any]) -> bool:
        """Rewrites the file up to the resumed step and opens it for appending; True if `data` joined a kept line."""
        resumed = step if self.val_before_train else step - 1
        kept = {s: d for s, d in _read_lines(self.filepath).items() if s <= resumed} if resumed > 0 else {}
        merged = self.val_before_train and resumed in kept
        if merged:
            kept[resumed].update(data)
        os.makedirs(os.path.dirname(os.path.abspath(self.filepath)), exist_ok=True)
        with atomic_path(self.filepath) as tmp, open(tmp, "wb") as f:
            for s in sorted(kept):
                f.write(_dumps(s, kept[s]))
        self.fp = open(self.filepath, "ab", buffering=0)
        return merged

    def log(self, data: Mapping[str, Any], step: int) -> None:
        if self.fp is None and self._start(step, data):
            return
        self.fp.write(_dumps(step, data))

    def finish(self) -> None:
        if self.fp is not None:
            self.fp.close()


def install() -> None:
    """Makes verl's `Tracking` build `ResumingFileLogger` for the `file` backend (idempotent).

    `Tracking.__init__` is wrapped only to hand the trainer's config (which it receives) to the file logger.
    """
    from verl.utils import tracking

    if getattr(tracking.Tracking.__init__, "_carl_resumable", False):
        return
    original = tracking.Tracking.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        token = _TRACKING_CONFIG.set(signature.bind(self, *args, **kwargs).arguments.get("config"))
        try:
            original(self, *args, **kwargs)
        finally:
            _TRACKING_CONFIG.reset(token)

    __init__._carl_resumable = True  # type: ignore[attr-defined]
    tracking.Tracking.__init__ = __init__
    tracking.FileLogger = ResumingFileLogger


install()
