"""Reading LongBench JSONL files: samples, and the lines that are not."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

__all__ = ["BadLine", "Sample", "read_jsonl", "read_samples", "task_file"]

REQUIRED_FIELDS = ("_id", "input", "context", "answers")


@dataclass(frozen=True)
class BadLine:
    """A line that was skipped, with where it is and why."""

    file: str
    line: int
    error: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.error}"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "error": self.error}


@dataclass(frozen=True)
class Sample:
    """One benchmark sample. `index` is its position among the file's valid
    samples (sharding and the order of merged predictions use it)."""

    index: int
    id: str
    input: str
    context: str
    answers: list[str]
    all_classes: Optional[list[str]]
    length: Optional[float]
    raw: dict[str, Any] = field(repr=False, compare=False)


def task_file(data_dir: str | Path, task: str, longbench_e: bool = False) -> Path:
    return Path(data_dir) / (f"{task}_e.jsonl" if longbench_e else f"{task}.jsonl")


def read_jsonl(
    path: str | Path, terminated_only: bool = False
) -> Iterator[tuple[int, Optional[dict[str, Any]], Optional[BadLine]]]:
    """(line number, object or None, BadLine or None) for each non-blank line.

    A line that is not a JSON object is a BadLine. With `terminated_only`, a
    last line without its newline (a write in progress, or cut short by a
    crash) is passed over silently."""
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip() or (terminated_only and not line.endswith("\n")):
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                yield number, None, BadLine(str(path), number, f"not valid JSON ({error.msg} at column {error.colno})")
                continue
            if not isinstance(value, dict):
                yield number, None, BadLine(str(path), number, f"a JSON {type(value).__name__}, not an object")
                continue
            yield number, value, None


def _check_sample(value: dict[str, Any]) -> Optional[str]:
    missing = [name for name in REQUIRED_FIELDS if name not in value]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if not isinstance(value["_id"], (str, int)) or isinstance(value["_id"], bool):
        return "_id is not a string"
    if not isinstance(value["input"], str) or not isinstance(value["context"], str):
        return "input and context must be strings"
    answers = value["answers"]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        return "answers must be a list of strings"
    classes = value.get("all_classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        return "all_classes must be a list of strings or null"
    length = value.get("length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, (int, float))):
        return "length must be a number"
    return None


def read_samples(path: str | Path, limit: Optional[int] = None) -> tuple[list[Sample], list[BadLine]]:
    """The valid samples of a task file (the first `limit` of them) and the
    lines skipped on the way. Duplicate `_id`s are skipped as bad lines."""
    samples: list[Sample] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    for number, value, problem in read_jsonl(path):
        if limit is not None and len(samples) >= limit:
            break
        if problem is not None:
            bad.append(problem)
            continue
        error = _check_sample(value)
        sample_id = str(value.get("_id"))
        if error is None and sample_id in seen:
            error = f"duplicate _id {sample_id!r} (first on line {seen[sample_id]})"
        if error is not None:
            bad.append(BadLine(str(path), number, error))
            continue
        seen[sample_id] = number
        samples.append(
            Sample(
                index=len(samples),
                id=sample_id,
                input=value["input"],
                context=value["context"],
                answers=list(value["answers"]),
                all_classes=value.get("all_classes"),
                length=value.get("length"),
                raw=value,
            )
        )
    return samples, bad
