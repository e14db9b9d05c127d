"""The output directory of a LongBench run or a sweep: its pinned
configuration, its record files and its report. No torch here (the
package's own import aside), so `compare` and `score` read run and sweep
directories without the generation code.

    config.json | sweep.json   the pinned configuration: what makes the records
                               what they are; a resumed run must match it
    <task>/predictions.rank{r}.jsonl | records.jsonl
                               one record per line, appended and fsynced, so a
                               crash loses at most the record being written
    report.json                (report.rank{r}.json per rank when sharded)

The two kinds differ only in names (`LONGBENCH`, `SWEEP`): a LongBench run's
record files are per task and rank, its records name no point, task or
length (its directory and file say them); a sweep keeps every record in one
file, each naming its grid point, suite length and task.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

from refreekv.eval.data import BadLine, read_jsonl
from refreekv.eval.errors import ConfigMismatch, UsageError
from refreekv.eval.options import method_label

__all__ = [
    "CONFIG_FILE", "LONGBENCH", "RECORDS_FILE", "RECORD_FIELDS", "SWEEP", "SWEEP_FILE", "Layout", "RunConfig", "RunDir",
    "check_output_dir", "environment", "read_records", "read_record_files", "shard_info", "write_json_atomic",
]  # fmt: skip

CONFIG_FILE = "config.json"
SWEEP_FILE = "sweep.json"
RECORDS_FILE = "records.jsonl"
# The fields every sweep record names; a LongBench record needs only its _id
# to count as done (its directory and file name the rest).
RECORD_FIELDS = ("point", "method", "length", "task", "_id", "pred", "answers")


@dataclass(frozen=True)
class Layout:
    """File names of one kind of run directory; `records` is a pattern in
    {task} and {rank}."""

    kind: str  # "run" or "sweep", for messages
    pin_file: str
    records: str
    record_fields: tuple[str, ...]


LONGBENCH = Layout("run", CONFIG_FILE, "{task}/predictions.rank{rank}.jsonl", ("_id",))
SWEEP = Layout("sweep", SWEEP_FILE, RECORDS_FILE, RECORD_FIELDS)


@dataclass(frozen=True)
class RunConfig:
    """Everything that changes a LongBench run's predictions. Tasks, the
    sample limit, the data directory, devices and sharding do not, so a run
    can be resumed with more tasks, a larger limit or another number of
    processes."""

    model: str
    method: str
    options: dict[str, Any]  # every option of the method, defaults included
    max_input_length: int
    dtype: str
    longbench_e: bool
    chat_template: bool
    attn_implementation: str

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def label(self) -> str:
        """The method with the options that differ from its defaults."""
        return method_label(self.method, self.options)


class RunDir:
    """One run or sweep directory (`layout` says which)."""

    def __init__(self, path: str | Path, layout: Layout):
        self.path = Path(path)
        self.layout = layout
        self.pin_path = self.path / layout.pin_file

    # -- the pinned configuration ---------------------------------------------

    def check_writable(self) -> None:
        check_output_dir(self.path)

    def pinned(self, required: tuple[str, ...] = ("config",)) -> Optional[dict[str, Any]]:
        """The pin file's document (None when there is none yet); an
        unreadable one, or one without the `required` keys, raises ConfigMismatch."""
        if not self.pin_path.exists():
            return None
        try:
            document = json.loads(self.pin_path.read_text(encoding="utf-8"))
            for key in required:
                document[key]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConfigMismatch(f"{self.pin_path} is unreadable ({error}); use another --output-dir") from None
        return document

    def check_config(self, config: dict[str, Any], required: tuple[str, ...] = ("config",)) -> Optional[dict[str, Any]]:
        """The pinned document, after checking that it holds `config`
        (ConfigMismatch names every setting that differs); None if nothing
        is pinned yet."""
        document = self.pinned(required)
        if document is not None and document["config"] != config:
            raise self.mismatch(f"a {self.layout.kind}", document["config"] or {}, config)
        return document

    def mismatch(self, what: str, stored: dict[str, Any], wanted: dict[str, Any]) -> ConfigMismatch:
        """The error for resuming this directory with another configuration:
        every setting that differs, as stored here and as asked now."""
        there, now = _flatten(stored), _flatten(wanted)
        lines = [
            f"  {key}: {json.dumps(there.get(key))} there, {json.dumps(now.get(key))} now"
            for key in sorted(set(there) | set(now))
            if there.get(key) != now.get(key)
        ]
        return ConfigMismatch(
            f"{self.path} holds {what} made with a different configuration:\n"
            + "\n".join(lines)
            + "\nuse another --output-dir (or the same settings to resume it)"
        )

    def pin(self, document: dict[str, Any]) -> None:
        """Writes the pin file (creating the directory), once the run is sure
        to start; atomic, so ranks racing here write the same content whole."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.pin_path, document)
        except OSError as error:
            raise UsageError(f"cannot write {self.pin_path}: {error.strerror or error}") from None

    # -- records --------------------------------------------------------------

    def record_file(self, task: str = "", rank: int = 0) -> Path:
        return self.path / self.layout.records.format(task=task, rank=rank)

    def record_files(self, task: str = "*") -> list[Path]:
        """Every rank's record file of `task` (a sweep: its one file, if written)."""
        return sorted(self.path.glob(self.layout.records.format(task=task, rank="*")))

    def records(self, task: str = "*") -> tuple[list[dict[str, Any]], list[BadLine]]:
        """(complete records, malformed lines) of `task`'s record files. A
        last line still being written, or cut short by a crash, is neither."""
        fields = self.layout.record_fields
        kind = "sweep record" if self.layout.kind == "sweep" else "prediction record"

        def problem(record: dict[str, Any]) -> Optional[str]:
            missing = [name for name in fields if name not in record]
            return f"not a {kind} (missing {', '.join(missing)})" if missing else None

        return read_record_files(self.record_files(task), problem, terminated_only=True)

    def completed(self, key: Callable[[dict[str, Any]], Any], task: str = "*") -> set[Any]:
        """`key(record)` of every complete record of `task`: what a resumed
        run skips. Each malformed line is a warning (its work is redone)."""
        records, bad = self.records(task)
        for line in bad:
            print(f"warning: {line} (it will be redone if it was a record)", file=sys.stderr)
        return {key(record) for record in records}

    def open_records(self, task: str = "", rank: int = 0) -> IO[str]:
        """The record file of `task` and `rank`, opened to append, after
        cutting a last line a crash left without its newline."""
        path = self.record_file(task, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(path)
        return open(path, "a", encoding="utf-8")

    # -- report ---------------------------------------------------------------

    def write_report(self, report: dict[str, Any], rank: int = 0, world: int = 1) -> None:
        write_json_atomic(self.path / ("report.json" if world == 1 else f"report.rank{rank}.json"), report)

    def reports(self) -> Iterator[dict[str, Any]]:
        """Every readable report of the directory (one per rank when sharded)."""
        for path in sorted(self.path.glob("report*.json")):
            try:
                yield json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue


def read_record_files(
    paths: list[Path], problem: Callable[[dict[str, Any]], Optional[str]], terminated_only: bool
) -> tuple[list[dict[str, Any]], list[BadLine]]:
    """(records, malformed lines) of JSONL record files: `problem(record)`
    says why a JSON object is not a record (None: it is one)."""
    records: list[dict[str, Any]] = []
    bad: list[BadLine] = []
    for path in paths:
        for number, record, error in read_jsonl(path, terminated_only=terminated_only):
            if error is None:
                why = problem(record)
                error = None if why is None else BadLine(str(path), number, why)
            if error is None:
                records.append(record)
            else:
                bad.append(error)
    return records, bad


def read_records(output_dir: str | Path) -> tuple[list[dict[str, Any]], list[BadLine]]:
    """(the complete records of a sweep, its malformed lines)."""
    return RunDir(output_dir, SWEEP).records()


def write_record(handle: IO[str], record: dict[str, Any]) -> None:
    """Appends one record and forces it to disk before the next one."""
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _repair_tail(path: Path) -> None:
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


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """{"options": {"budget": 0.5}} -> {"options.budget": 0.5}, for messages."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def check_output_dir(path: Path) -> None:
    """Raises UsageError unless `path` is a folder this process may write
    in, or one it may create. Checked, not created: a refused run leaves
    nothing behind."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path.absolute() else f"cannot be created: {existing} is a file"
        raise UsageError(f"--output-dir {path} {where}; expected a folder (existing or to be created)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir {path}: no permission to write in {existing}; expected a folder this user can write in")


def shard_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad RANK={rank} / WORLD_SIZE={world}")
    return rank, world, local


def environment() -> dict[str, Any]:
    """The versions that made a run, stored beside its configuration (they
    may change the records slightly, but do not block a resume)."""
    import torch
    import transformers

    import refreekv

    return {
        "refreekv": refreekv.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }
