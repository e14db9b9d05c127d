"""Prediction files: one JSONL file per task and rank, one record per
sample, appended and fsynced, so a crash loses at most the record being
written and a restarted run knows exactly what is done."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from refreekv.eval.data import read_jsonl

__all__ = ["completed_ids", "prediction_files", "repair_tail", "shard_info", "write_json_atomic", "write_record"]


def shard_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad RANK={rank} / WORLD_SIZE={world}")
    return rank, world, local


def prediction_files(run_dir: str | Path, task: str) -> list[Path]:
    return sorted((Path(run_dir) / task).glob("predictions.rank*.jsonl"))


def completed_ids(run_dir: str | Path, task: str) -> set[str]:
    """Ids with a complete record in any rank's file of `task` (a last line
    without its newline is not complete: the resumed run cuts and redoes it)."""
    done = set()
    for path in prediction_files(run_dir, task):
        for _, record, _ in read_jsonl(path, terminated_only=True):
            if record is not None and "_id" in record:
                done.add(str(record["_id"]))
    return done


def repair_tail(path: Path) -> None:
    """Cuts a last line that a crash left without its newline."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data.endswith(b"\n"):
            return
        handle.truncate(data.rfind(b"\n") + 1)
        handle.flush()
        os.fsync(handle.fileno())


def write_json_atomic(path: Path, document: Any) -> None:
    """Replaces `path` with `document` as indented JSON in one step: a
    reader (or a crash) never sees half a file."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def write_record(handle: IO[str], record: dict[str, Any]) -> None:
    """Appends one record and forces it to disk before the next sample."""
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())
