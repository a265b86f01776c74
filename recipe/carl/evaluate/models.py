"""Which weights to load for `--model` / `--baseline`: a Hugging Face folder, a hub id, or a verl checkpoint.

A verl checkpoint (`.../global_step_N/actor`, or `global_step_N`) gives its `huggingface/` folder when that holds
weights (`checkpoint.save_contents` with `hf_model`), else its FSDP shards merged once with verl's own merger
(`python -m verl.model_merger merge --backend fsdp`, bf16 weights) into `<actor>/merged_hf` (or `--merge-dir`), reused
while the shards are unchanged. Megatron checkpoints are named and refused (merge them first).

`recorded_run` reads what the training run that wrote a checkpoint recorded about its agent settings.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from recipe.carl.evaluate.settings import EvalError
from recipe.carl.io import atomic_dir, write_json
from recipe.carl.run_record import checkpoint_step_dir, find_run_record, read_run_record

#: `org/name`: a Hugging Face hub id (when no such local path exists).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: Files that hold a model's weights in a Hugging Face folder.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)


def _shard_stamp(actor: Path) -> dict[str, list[int]]:
    return {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(actor.glob("model_world_size_*_rank_*.pt"))
    }


def resolve_model(
    path: str | Path, merge_dir: str | Path | None = None, flag: str = "--model", fetch: bool = True
) -> Path:
    """The Hugging Face folder to load for `path` (a model folder, or a verl checkpoint, merged if needed).

    With `fetch=False` only the checks run: a hub id is not downloaded and a checkpoint not merged (the path it would
    be merged to is returned), so that every cheap check can come before the slow steps.

    Raises:
        EvalError: naming the input and what to give instead.
    """
    given = Path(path)
    what = (
        "give a Hugging Face model folder (config.json + weights) or a verl checkpoint folder "
        "(<trainer.default_local_dir>/global_step_N/actor)"
    )
    if not given.exists() and HUB_ID.fullmatch(str(path)):
        return hub_model(str(path), flag) if fetch else given
    if not given.exists():
        raise EvalError(f"{flag} {given}: no such folder; {what}.")
    if not given.is_dir():
        raise EvalError(f"{flag} {given}: is a file, not a folder; {what}.")
    folder = given / "actor" if (given / "actor").is_dir() and not (given / "config.json").exists() else given
    if (folder / "config.json").exists():
        if not has_weights(folder):
            raise EvalError(f"{flag} {folder}: has config.json but no weights (*.safetensors, *.bin); {what}.")
        return folder
    if (folder / "model" / "dist_ckpt").is_dir():
        raise EvalError(
            f"{flag} {folder}: a Megatron checkpoint; merge it first with python -m verl.model_merger merge "
            f"--backend megatron --local_dir {folder} --target_dir <folder>, then pass that folder."
        )
    if not (folder / "fsdp_config.json").exists():
        raise EvalError(
            f"{flag} {folder}: neither a model folder nor a verl FSDP checkpoint (no fsdp_config.json); {what}."
        )
    if has_weights(folder / "huggingface"):
        return folder / "huggingface"
    target = Path(merge_dir) if merge_dir else folder / "merged_hf"
    stamp = _shard_stamp(folder)
    if not stamp:
        raise EvalError(f"{flag} {folder}: a verl checkpoint without model shards (model_world_size_*_rank_*.pt).")
    marker = target / "merged_from.json"
    if marker.exists() and has_weights(target) and json.loads(marker.read_text()).get("shards") == stamp:
        return target
    if target.exists() and any(target.iterdir()) and not marker.exists():
        raise EvalError(
            f"{flag} {folder}: the merge folder {target} exists and holds something else (no merged_from.json); "
            "pass --merge-dir with a new or empty folder."
        )
    if not fetch:
        return target
    print(f"merging the FSDP checkpoint {folder} into {target} (verl.model_merger)", file=sys.stderr, flush=True)
    try:
        with atomic_dir(target) as tmp:
            cmd = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp"]
            cmd += ["--local_dir", str(folder), "--target_dir", str(tmp)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise EvalError(
                    f"{flag} {folder}: verl's model merger failed (exit {done.returncode}): "
                    f"{(done.stderr or done.stdout).strip()[-1500:]}\ncommand: {shlex.join(cmd)}"
                )
            write_json(tmp / "merged_from.json", {"checkpoint": str(folder.resolve()), "shards": stamp})
    except PermissionError as error:
        raise EvalError(
            f"{flag} {folder}: cannot write the merged model to {target} ({error}); pass --merge-dir."
        ) from error
    return target


def hub_model(repo_id: str, flag: str) -> Path:
    """A Hugging Face hub id (`Qwen/Qwen2.5-7B-Instruct`): its local snapshot, downloaded once (as verl's trainer does).

    Raises:
        EvalError: when it is neither cached nor downloadable (offline, no such model), naming the id.
    """
    from huggingface_hub import snapshot_download  # deferred: only a hub id needs it

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as error:
        raise EvalError(
            f"{flag} {repo_id}: not a local folder, and the Hugging Face hub could not give it "
            f"({type(error).__name__}: {str(error)[:200]}); download it first (huggingface-cli download {repo_id}) "
            "or pass a local folder."
        ) from None


def model_label(path: str | Path) -> str:
    """A short name: the folder's, or `<experiment>/global_step_N` for a checkpoint."""
    p = Path(path).resolve()
    if p.name in ("huggingface", "merged_hf") and p.parent.name == "actor":
        p = p.parent
    if p.name == "actor":
        p = p.parent
    if re.fullmatch(r"global_step_\d+", p.name):
        return f"{p.parent.name}/{p.name}"
    return p.name or str(path)


def recorded_run(path: str | Path | None, flag: str = "--model") -> tuple[Path | None, dict[str, Any]]:
    """The agent settings the training run of a verl checkpoint recorded (`recipe.carl.run_record`) and the record's
    path; `(None, {})` for a model folder, a hub id, or a checkpoint whose run recorded nothing.

    Raises:
        EvalError: an unreadable record, naming it and the fix.
    """
    record = find_run_record(path) if path else None
    if record is None:
        return None, {}
    try:
        return record, read_run_record(record)
    except ValueError as error:
        raise EvalError(f"{flag} {path}: {error}") from None


def is_unrecorded_checkpoint(path: str | Path | None) -> bool:
    """A verl checkpoint without a run record (written before the CARL trainer recorded one, or by another trainer)."""
    return bool(path) and checkpoint_step_dir(path) is not None and find_run_record(path) is None
