"""`refreekv-longbench score`: per-task and average scores of a run directory.

The rank files of each task are merged (a record per `_id`, in the task
file's order); every record scores the max over its gold answers of the
task's metric, a task the mean times 100 (rounded to 2 decimals as the
benchmark reports it). LongBench-E runs are also scored per length band.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from refreekv.eval.data import needs_classes, prediction_problem
from refreekv.eval.metrics import record_score
from refreekv.eval.report.summary import mean
from refreekv.eval.rundir import LONGBENCH, RunDir, read_record_files, write_json_atomic
from refreekv.eval.tasks import LENGTH_BANDS, TASKS, length_band

__all__ = ["format_scores", "merged_predictions", "score_run"]

SCORES_FILE = "scores.json"


def merged_predictions(run_dir: str | Path, task: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(records ordered by sample index, bad lines, duplicate records dropped).
    Records that cannot be scored are bad lines, checked like the task's
    samples (answers a list of strings, all_classes for classification); so
    is a last line cut short by a crash."""
    classes_required = needs_classes(TASKS[task])

    def problem(record: dict[str, Any]) -> str | None:
        error = prediction_problem(record, classes_required)
        return None if error is None else f"not a prediction record: {error}"

    found, bad = read_record_files(RunDir(run_dir, LONGBENCH).record_files(task), problem, terminated_only=False)
    by_id: dict[str, dict[str, Any]] = {}
    for record in found:
        by_id.setdefault(str(record["_id"]), record)
    records = sorted(by_id.values(), key=lambda r: (r.get("index", math.inf), str(r["_id"])))
    return records, [line.to_json() for line in bad], len(found) - len(by_id)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def score_run(run_dir: str | Path, write: bool = True) -> dict[str, Any]:
    """Scores every task with predictions in `run_dir`; writes scores.json."""
    run_dir = Path(run_dir)
    directory = RunDir(run_dir, LONGBENCH)
    stored = directory.pinned(required=())
    if stored is None:
        raise FileNotFoundError(f"{run_dir} is not a LongBench run directory (no {directory.layout.pin_file})")
    config = stored.get("config", {})
    longbench_e = bool(config.get("longbench_e"))
    present = [task for task in TASKS if directory.record_files(task)]  # registry order, RULER tasks too
    expected = _expected_counts(directory)
    tasks: dict[str, Any] = {}
    skipped: list[dict[str, Any]] = []
    for name in present:
        task = TASKS[name]
        records, bad, duplicates = merged_predictions(run_dir, name)
        skipped += bad
        scores, budgets, lengths, bands = [], [], [], {band: [] for band, _, _ in LENGTH_BANDS}
        for record in records:
            score = record_score(task, record)
            scores.append(score)
            if record.get("budget") is not None:
                budgets.append(float(record["budget"]))
            if record.get("input_tokens") is not None:
                lengths.append(float(record["input_tokens"]))
            # Bands use the data's `length` (words; characters for Chinese);
            # a record without it falls back to its input tokens.
            length = record.get("length")
            bands[length_band(length if length is not None else record.get("input_tokens", 0))].append(score)
        entry: dict[str, Any] = {
            "score": _round(100 * mean(scores)) if scores else None,
            "samples": len(records),
            "expected": expected.get(name),
            "complete": expected.get(name) is not None and len(records) >= expected[name],
            "kept_budget": _round(mean(budgets), 6),
            "mean_input_tokens": _round(mean(lengths), 1),
            "metric": task.metric,
            "skipped_lines": len(bad),
            "duplicates_dropped": duplicates,
        }
        if longbench_e:
            entry["bands"] = {band: _round(100 * mean(v)) if v else None for band, v in bands.items()}
            entry["band_samples"] = {band: len(v) for band, v in bands.items()}
        tasks[name] = entry
    scored = [entry for entry in tasks.values() if entry["score"] is not None]
    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "config": config,
        "longbench_e": longbench_e,
        "tasks": tasks,
        "average": {
            "score": _round(mean([e["score"] for e in scored])),
            "kept_budget": _round(mean([e["kept_budget"] for e in scored if e["kept_budget"] is not None]), 6),
            "tasks": len(scored),
            "samples": sum(e["samples"] for e in tasks.values()),
        },
        "skipped_lines": skipped,
    }
    if longbench_e:
        result["average"]["bands"] = {
            band: _round(mean([e["bands"][band] for e in scored if e["bands"][band] is not None]))
            for band, _, _ in LENGTH_BANDS
        }
    if write:
        write_json_atomic(run_dir / SCORES_FILE, result)
    return result


def _expected_counts(directory: RunDir) -> dict[str, int]:
    """Samples per task as the run's reports saw them (after the limit)."""
    counts: dict[str, int] = {}
    for report in directory.reports():
        for task, entry in report.get("tasks", {}).items():
            counts[task] = max(counts.get(task, 0), int(entry.get("samples", 0)))
    return counts


def format_scores(result: dict[str, Any]) -> str:
    """A plain-text table of a `score_run` result."""
    bands = result["longbench_e"]
    header = f"{'task':<22}{'score':>8}{'samples':>9}{'kept':>9}{'tokens':>9}"
    if bands:
        header += "".join(f"{band:>8}" for band, _, _ in LENGTH_BANDS)
    lines = [header, "-" * len(header)]

    def row(name, entry, samples):
        kept = entry.get("kept_budget")
        text = (
            f"{name:<22}{_fmt(entry.get('score')):>8}{samples:>9}"
            f"{(f'{100 * kept:.1f}%' if kept is not None else '-'):>9}"
            f"{_fmt(entry.get('mean_input_tokens'), 0):>9}"
        )
        if bands:
            text += "".join(f"{_fmt(entry.get('bands', {}).get(band)):>8}" for band, _, _ in LENGTH_BANDS)
        return text

    for name, entry in result["tasks"].items():
        mark = "" if entry["complete"] else " *"
        lines.append(row(name + mark, entry, f"{entry['samples']}"))
    lines.append("-" * len(header))
    lines.append(row("average", result["average"], f"{result['average']['samples']}"))
    if any(not e["complete"] for e in result["tasks"].values()):
        lines.append("* incomplete: fewer predictions than samples in the task file (resume the run)")
    if result["skipped_lines"]:
        lines.append(f"{len(result['skipped_lines'])} malformed prediction line(s) skipped")
    return "\n".join(lines)


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
