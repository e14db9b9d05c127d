"""`refreekv-longbench compare`: several runs side by side, or the quality
map of budget sweeps.

Run directories: writes `comparison.md` and `comparison.csv` (rows: tasks,
then the average over the tasks every run has; columns: runs; a cell is the
score and, in brackets, the mean kept fraction of the prompt KV cache) and
`comparison.png` (average score against average kept budget, one marker
per run, small markers per task).

Sweep directories (holding `sweep.json` and `records.jsonl`): their records
go through `refreekv.eval.report` (quality.{json,csv,md} and figures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from refreekv.eval.data import BadLine
from refreekv.eval.report import quality_markdown, summarize, write_comparison, write_quality_report
from refreekv.eval.rundir import RECORDS_FILE, SWEEP_FILE, RunConfig, check_output_dir, read_records
from refreekv.eval.scoring import score_run

__all__ = ["compare_runs", "compare_sweeps"]


def _load_scores(run_dir: Path) -> dict[str, Any]:
    # Always rescored: cheap, and never stale after a resumed run.
    return score_run(run_dir, write=True)


def _label(result: dict[str, Any], run_dir: Path) -> str:
    try:
        return RunConfig(**result["config"]).label()
    except TypeError:
        return run_dir.name


def compare_runs(run_dirs: Sequence[str | Path], output_dir: str | Path, names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Builds the table and plot; returns {"markdown", "rows", "files"}.
    Sweep directories go to `compare_sweeps` instead."""
    from refreekv.eval.errors import UsageError

    if not run_dirs:
        raise UsageError("compare needs at least one run directory")
    check_output_dir(Path(output_dir))
    dirs = [Path(d) for d in run_dirs]
    sweeps = [d for d in dirs if (d / SWEEP_FILE).is_file()]
    if sweeps:
        if len(sweeps) != len(dirs):
            runs = [str(d) for d in dirs if d not in sweeps]
            raise UsageError(
                f"cannot mix sweep directories ({', '.join(map(str, sweeps))}) with run directories "
                f"({', '.join(runs)}): compare one kind at a time"
            )
        if names is not None:
            raise UsageError("--names renames run directories; the points of a sweep keep their labels")
        return compare_sweeps(dirs, output_dir)
    if names is not None and len(names) != len(run_dirs):
        raise UsageError(f"{len(names)} names for {len(run_dirs)} run directories")
    results = [_load_scores(d) for d in dirs]
    labels = list(names) if names is not None else [_label(r, d) for r, d in zip(results, dirs)]
    # Same label twice (e.g. two models, one method): add the folder name.
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = f"{label} [{dirs[i].name}]"
    return write_comparison(output_dir, dirs, labels, results)


def compare_sweeps(sweep_dirs: Sequence[str | Path], output_dir: str | Path) -> dict[str, Any]:
    """The quality map of one or more sweeps (records concatenated; a point
    label found in several sweeps gets its directory's name in front, so
    that their records stay apart). Returns {"markdown", "summary", "files"}."""
    from refreekv.eval.errors import UsageError

    dirs = [Path(d) for d in sweep_dirs]
    loaded = [_read_sweep(d) for d in dirs]
    clashing = _clashing_labels(
        [{p["label"] for p in points} | {r["point"] for r in records} for points, records, _ in loaded]
    )
    prefixes = [d.name for d in dirs] if len({d.name for d in dirs}) == len(dirs) else [str(d) for d in dirs]
    points, records, skipped = [], [], []
    for prefix, (sweep_points, sweep_records, bad) in zip(prefixes, loaded):
        points += [{**point, "label": _unique_label(point["label"], prefix, clashing)} for point in sweep_points]
        records += [{**record, "point": _unique_label(record["point"], prefix, clashing)} for record in sweep_records]
        skipped += bad
    if not records:
        raise UsageError(f"no records in {', '.join(str(d / RECORDS_FILE) for d in dirs)}")
    try:
        summary = summarize(records, points)
    except ValueError as error:
        raise UsageError(str(error)) from error
    summary["skipped_lines"] = [line.to_json() for line in skipped]
    title = "Quality map: " + ", ".join(prefixes)
    files = write_quality_report(summary, output_dir, title)
    return {"markdown": quality_markdown(summary, title), "summary": summary, "files": files}


def _read_sweep(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[BadLine]]:
    """(points of sweep.json, records, malformed lines). A last line without
    its newline is a record still being written (or cut by a crash): left out."""
    from refreekv.eval.errors import UsageError

    try:
        request = json.loads((sweep_dir / SWEEP_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UsageError(f"{sweep_dir / SWEEP_FILE}: not valid JSON ({error.msg} at line {error.lineno})") from error
    path = sweep_dir / RECORDS_FILE
    if not path.is_file():
        raise UsageError(f"{path} not found: the sweep has written no records yet")
    records, bad = read_records(sweep_dir)
    return request.get("points", []), records, bad


def _unique_label(label: str, prefix: str, clashing: set[str]) -> str:
    return f"{prefix}/{label}" if label in clashing else label


def _clashing_labels(label_sets: list[set[str]]) -> set[str]:
    """Labels found in more than one sweep."""
    seen: set[str] = set()
    clashing: set[str] = set()
    for labels in label_sets:
        clashing |= seen & labels
        seen |= labels
    return clashing
