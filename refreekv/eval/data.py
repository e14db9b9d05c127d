"""Reading LongBench JSONL files: samples, and the lines that are not."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from refreekv.eval.tasks import Task

__all__ = ["BadLine", "Sample", "needs_classes", "prediction_problem", "read_jsonl", "read_samples", "task_file"]

REQUIRED_FIELDS = ("_id", "input", "context", "answers")
PREDICTION_FIELDS = ("_id", "pred", "answers")


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

    A line that is not UTF-8 or not a JSON object is a BadLine: bytes are
    never replaced, since a sample whose text was altered would still run
    and quietly score differently. A byte-order mark before the first line
    is dropped (editors on Windows write one). With `terminated_only`, a
    last line without its newline (a write in progress, or cut short by a
    crash) is passed over silently."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if terminated_only and not raw.endswith(b"\n"):
                continue
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                found = f"byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the line"
                yield number, None, BadLine(str(path), number, f"not UTF-8 text (expected UTF-8, got {found})")
                continue
            if not line.strip():
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


def needs_classes(task: Task) -> bool:
    """Whether `task`'s metric needs each sample's `all_classes`: a
    classification prediction is scored by the class names it mentions."""
    return task.metric == "classification"


def _given(value: Any) -> str:
    """What a JSON value is, for messages that say what was found."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                return f"a list with {_given(item)} at index {index}"
        return "a list of strings" if value else "an empty list"
    kind = "a boolean" if isinstance(value, bool) else "a number" if isinstance(value, (int, float)) else "a string"
    text = json.dumps(value, ensure_ascii=False)
    return f"{kind} {text[:40]}{'...' if len(text) > 40 else ''}"


def _missing_problem(record: dict[str, Any], required: tuple[str, ...]) -> Optional[str]:
    missing = [name for name in required if name not in record]
    return f"missing field(s) {', '.join(missing)} (expected {', '.join(required)})" if missing else None


def _id_problem(record: dict[str, Any]) -> Optional[str]:
    if not isinstance(record["_id"], (str, int)) or isinstance(record["_id"], bool):
        return f"_id must be a string or an integer, got {_given(record['_id'])}"
    return None


def _string_problem(record: dict[str, Any], name: str) -> Optional[str]:
    return None if isinstance(record[name], str) else f"{name} must be a string, got {_given(record[name])}"


def _string_list_problem(record: dict[str, Any], name: str, nullable: bool = False) -> Optional[str]:
    values = record.get(name)
    if (nullable and values is None) or (isinstance(values, list) and all(isinstance(v, str) for v in values)):
        return None
    return f"{name} must be a list of strings{' or null' if nullable else ''}, got {_given(values)}"


def _classes_problem(record: dict[str, Any], classes_required: bool) -> Optional[str]:
    classes = record.get("all_classes")
    if classes_required and not classes:
        return f"all_classes is required for classification tasks: expected a non-empty list of class names, got {_given(classes)}"
    return _string_list_problem(record, "all_classes", nullable=True)


def _number_problem(record: dict[str, Any], name: str) -> Optional[str]:
    value = record.get(name)
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return None
    return f"{name} must be a number or null, got {_given(value)}"


def _sample_problem(value: dict[str, Any], classes_required: bool) -> Optional[str]:
    return (
        _missing_problem(value, REQUIRED_FIELDS)
        or _id_problem(value)
        or _string_problem(value, "input")
        or _string_problem(value, "context")
        or _string_list_problem(value, "answers")
        or _classes_problem(value, classes_required)
        or _number_problem(value, "length")
        or _optional_string_problem(value, "answer_prefix")
    )


def _optional_string_problem(record: dict[str, Any], name: str) -> Optional[str]:
    if name not in record or isinstance(record[name], str):
        return None
    return f"{name} must be a string when present, got {_given(record[name])}"


def prediction_problem(record: dict[str, Any], classes_required: bool = False) -> Optional[str]:
    """Why a prediction record cannot be scored, or None. The same checks
    as for a task file's samples: a record edited or written by another
    tool must fail here, naming its line, not in the middle of a metric."""
    return (
        _missing_problem(record, PREDICTION_FIELDS)
        or _id_problem(record)
        or _string_problem(record, "pred")
        or _string_list_problem(record, "answers")
        or _classes_problem(record, classes_required)
        or _number_problem(record, "length")
        or _number_problem(record, "input_tokens")
        or _number_problem(record, "budget")
    )


def read_samples(
    path: str | Path, limit: Optional[int] = None, classes_required: bool = False
) -> tuple[list[Sample], list[BadLine]]:
    """The valid samples of a task file (the first `limit` of them) and the
    lines skipped. Duplicate `_id`s are skipped as bad lines; so are
    samples without `all_classes` when `classes_required` (see
    `needs_classes`). The whole file is checked whatever the limit, so a
    short trial run reports every line the full run would skip. A file
    without any line raises ValueError: it is a failed download or a wrong
    file, not a task with no samples."""
    samples: list[Sample] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    lines = 0
    for number, value, problem in read_jsonl(path):
        lines += 1
        if problem is not None:
            bad.append(problem)
            continue
        error = _sample_problem(value, classes_required)
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
    if not lines:
        raise ValueError(f"task file {path} is empty: expected one JSON sample per line")
    return samples[:limit], bad
