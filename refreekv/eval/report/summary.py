"""Summaries: the numbers every report is drawn from.

A sweep writes one record per (grid point, context length, task, sample);
`summarize` turns those records into mean scores and measured kept budgets,
the full-cache reference and each method's "safe budget". `task_averages`
does the same for the per-task scores of `refreekv-longbench score` runs.

Budgets are the measured kept fractions (not the requested ones): methods
with a threshold instead of a budget land where they land, and only the
measured value makes methods comparable.

Prefill modes (refreekv.eval.prefill): a point in the question-after or a
streaming mode is a point of its own, and a method in one mode a series of
its own ("snapkv [streaming 512]"): its own curve on the frontier plot, its
own safe budget. The full-cache reference is the one-forward fullkv points
(the others, e.g. `fullkv [streaming 512]`, are points beside it; they are
the reference only where no one-forward fullkv point was run). Records and
points of older sweeps name no mode: they are one-forward.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, Optional, Sequence

from refreekv.eval.metrics import record_score
from refreekv.eval.prefill import ONE_FORWARD, PREFILL_KEY, PrefillMode
from refreekv.eval.tasks import TASKS

__all__ = [
    "FULL_CACHE_METHOD", "OVERALL", "SAFE_FRACTION", "group_by", "mean", "summarize", "task_averages",
]  # fmt: skip

# The task name of rows that average over tasks (no benchmark task has it).
OVERALL = "overall"
# The method whose points are the reference every other method is held to.
FULL_CACHE_METHOD = "fullkv"
# A budget is "safe" when the score stays at or above this share of full cache.
SAFE_FRACTION = 0.95


def summarize(records: Iterable[dict[str, Any]], points: Optional[Sequence[dict[str, Any]]] = None) -> dict[str, Any]:
    """Means per grid point, length and task, from sweep records.

    `points` (the sweep's `points`: label, method, options, prefill) fixes
    the row order; points seen only in the records follow in order of
    appearance. Each point, cell and safe-budget row names its `prefill`
    mode and `series` (the method, and the mode unless one-forward).
    Every part of the result is a flat list of rows, so that it is JSON as
    it stands and each row can be found by its fields:

    * cells: point x length x task (and task "overall": the mean over the
      tasks present, each weighted equally) -> score (x100), kept_budget
      (mean measured kept fraction), held_budget (mean fraction held in
      memory; above kept_budget when heads keep different counts; None for
      records without it), samples, complete (as many samples as
      the best-covered point at that length and task; an overall cell also
      needs every task of its length);
    * needle: point x length x task x depth -> score, samples (records with
      a depth), plus task "overall": the mean over the needle tasks;
    * layers: point x length -> kept_fraction per layer (kept_per_layer /
      input_tokens, averaged over samples);
    * reference: length x task -> the full-cache score (mean over the
      one-forward fullkv points, or every fullkv point if none is) and
      which points gave it;
    * safe_budgets: series x length x task -> the lowest measured budget
      from which every point of the series scores at least SAFE_FRACTION of
      full cache, or None (never, or no full cache to compare with).
      Incomplete cells count as they are: the tables mark them.

    A record repeated with the same point, length, task, _id, index and
    depth (a resumed sweep) counts once; `duplicates` says how many were
    dropped.
    """
    unique, duplicates = _drop_duplicates(records)
    scored = [(record, _record_score(record)) for record in unique]
    point_list = _point_list(unique, points)
    lengths = sorted({record["length"] for record in unique})
    tasks = list(dict.fromkeys(record["task"] for record in unique))
    cells = _cells(scored, point_list, lengths, tasks)
    reference = _reference(cells)
    return {
        "points": point_list,
        "lengths": lengths,
        "tasks": tasks,
        "cells": cells,
        "needle": _needle_rows(scored, point_list),
        "layers": _layer_rows(unique, point_list),
        "reference": reference,
        "safe_fraction": SAFE_FRACTION,
        "safe_budgets": _safe_budgets(cells, reference, point_list),
        "duplicates": duplicates,
    }


def _drop_duplicates(records: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    seen: set[tuple] = set()
    unique, duplicates = [], 0
    for record in records:
        key = (record["point"], record["length"], record["task"], str(record.get("_id")), record.get("index"),
               record.get("depth"))  # fmt: skip
        if key in seen:
            duplicates += 1
        else:
            seen.add(key)
            unique.append(record)
    return unique, duplicates


def _record_score(record: dict[str, Any]) -> float:
    task = TASKS.get(record["task"])
    if task is None:
        raise ValueError(f"point {record['point']!r}: unknown task {record['task']!r} (not in refreekv.eval.tasks)")
    return 100 * record_score(task, record)


def _point(label: str, method: str, options: dict[str, Any], prefill: Any) -> dict[str, Any]:
    mode = PrefillMode.parse(prefill)
    return {"label": label, "method": method, "options": options, PREFILL_KEY: mode.name, "series": method + mode.suffix()}


def _point_list(records: list[dict[str, Any]], points: Optional[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    listed = [_point(p["label"], p["method"], p.get("options", {}), p.get(PREFILL_KEY)) for p in points or ()]
    known = {point["label"] for point in listed}
    for record in records:
        if record["point"] not in known:
            known.add(record["point"])
            listed.append(_point(record["point"], record["method"], record.get("options", {}), record.get(PREFILL_KEY)))
    return listed


def mean(values: Iterable[Optional[float]]) -> Optional[float]:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def group_by(items: Iterable[Any], key: Callable[[Any], Hashable]) -> dict[Hashable, list[Any]]:
    groups: dict[Hashable, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _cells(scored, point_list, lengths, tasks) -> list[dict[str, Any]]:
    groups = group_by(scored, lambda pair: (pair[0]["point"], pair[0]["length"], pair[0]["task"]))
    most_samples = {}
    for (_, length, task), members in groups.items():
        most_samples[length, task] = max(most_samples.get((length, task), 0), len(members))
    tasks_per_length = {length: sum(1 for task in tasks if (length, task) in most_samples) for length in lengths}
    cells = []
    for point in point_list:
        for length in lengths:
            task_cells = []
            for task in tasks:
                members = groups.get((point["label"], length, task))
                if members:
                    task_cells.append(
                        _row(point, length, task,
                             score=mean(score for _, score in members),
                             kept_budget=mean(record.get("budget") for record, _ in members),
                             held_budget=mean(record.get("held_budget") for record, _ in members),
                             samples=len(members),
                             complete=len(members) == most_samples[length, task])
                    )  # fmt: skip
            if task_cells:
                overall = _row(point, length, OVERALL,
                               score=mean(cell["score"] for cell in task_cells),
                               kept_budget=mean(cell["kept_budget"] for cell in task_cells),
                               held_budget=mean(cell["held_budget"] for cell in task_cells),
                               samples=sum(cell["samples"] for cell in task_cells),
                               complete=all(cell["complete"] for cell in task_cells)
                               and len(task_cells) == tasks_per_length[length])  # fmt: skip
                cells += task_cells + [overall]
    return cells


def _row(point: dict[str, Any], length: int, task: str, **values: Any) -> dict[str, Any]:
    return {"point": point["label"], "method": point["method"], PREFILL_KEY: point[PREFILL_KEY], "series": point["series"],
            "length": length, "task": task, **values}  # fmt: skip


def _needle_rows(scored, point_list) -> list[dict[str, Any]]:
    """Per depth (rounded, so that 0.1 + 0.2 and 0.3 share a row), then the
    mean over needle tasks: a heatmap of several needle tasks should not
    favour the one with most samples."""
    needles = [(record, score) for record, score in scored if record.get("depth") is not None]
    groups = group_by(
        needles, lambda pair: (pair[0]["point"], pair[0]["length"], pair[0]["task"], round(pair[0]["depth"], 6))
    )
    rows = []
    for point in point_list:
        lengths = sorted({length for label, length, _, _ in groups if label == point["label"]})
        for length in lengths:
            task_rows = [
                _row(point, length, task, depth=depth, score=mean(score for _, score in members), samples=len(members))
                for (label, group_length, task, depth), members in sorted(groups.items())
                if (label, group_length) == (point["label"], length)
            ]
            by_depth = group_by(task_rows, lambda row: row["depth"])
            overall = [
                _row(point, length, OVERALL, depth=depth, score=mean(row["score"] for row in members),
                     samples=sum(row["samples"] for row in members))
                for depth, members in sorted(by_depth.items())
            ]  # fmt: skip
            rows += task_rows + overall
    return rows


def _layer_rows(records, point_list) -> list[dict[str, Any]]:
    measured = [r for r in records if r.get("kept_per_layer") and r.get("input_tokens")]
    groups = group_by(measured, lambda record: (record["point"], record["length"]))
    rows = []
    for point in point_list:
        for length in sorted(length for label, length in groups if label == point["label"]):
            members = groups[point["label"], length]
            layer_counts = {len(record["kept_per_layer"]) for record in members}
            if len(layer_counts) > 1:
                raise ValueError(
                    f"point {point['label']!r} at length {length}: records with {sorted(layer_counts)} layers"
                )
            fractions = [[kept / record["input_tokens"] for kept in record["kept_per_layer"]] for record in members]
            kept_fraction = [mean(layer) for layer in zip(*fractions)]
            rows.append({"point": point["label"], "method": point["method"], "length": length,
                         "kept_fraction": kept_fraction, "samples": len(members)})  # fmt: skip
    return rows


def _reference(cells) -> list[dict[str, Any]]:
    full_cache = [cell for cell in cells if cell["method"] == FULL_CACHE_METHOD]
    groups = group_by(full_cache, lambda cell: (cell["length"], cell["task"]))
    rows = []
    for (length, task), members in groups.items():
        one_forward = [cell for cell in members if cell[PREFILL_KEY] == ONE_FORWARD]
        members = one_forward or members
        rows.append({"length": length, "task": task, "score": mean(cell["score"] for cell in members),
                     "points": [cell["point"] for cell in members]})  # fmt: skip
    return rows


def _safe_budgets(cells, reference, point_list) -> list[dict[str, Any]]:
    reference_scores = {(row["length"], row["task"]): row["score"] for row in reference}
    series = {p["series"]: p for p in point_list if p["method"] != FULL_CACHE_METHOD}
    measured = [cell for cell in cells if cell["kept_budget"] is not None and cell["series"] in series]
    groups = group_by(measured, lambda cell: (cell["series"], cell["length"], cell["task"]))
    return [
        {"method": first["method"], PREFILL_KEY: first[PREFILL_KEY], "series": name, "length": length, "task": task,
         "safe_budget": _safe_budget([(cell["kept_budget"], cell["score"]) for cell in members],
                                     reference_scores.get((length, task)))}
        for name, first in series.items()
        for (group_series, length, task), members in groups.items()
        if group_series == name
    ]  # fmt: skip


def _safe_budget(budget_scores: list[tuple[float, float]], reference_score: Optional[float]) -> Optional[float]:
    """The lowest budget b such that every (budget >= b, score) pair keeps
    SAFE_FRACTION of the reference: a single lucky low-budget point does not
    make a method safe if a larger budget of it falls below."""
    if reference_score is None:
        return None
    threshold = SAFE_FRACTION * reference_score
    safe = [b for b, _ in budget_scores if all(score >= threshold for other, score in budget_scores if other >= b)]
    return min(safe, default=None)


def task_averages(results: Sequence[dict[str, Any]], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """Per scored run (`score_run` output): the mean score over `tasks`
    (rounded as the scores are) and the mean kept budget of those of them
    that measured one."""
    averages = []
    for result in results:
        entries = [result["tasks"][t] for t in tasks]
        kept = [e["kept_budget"] for e in entries if e["kept_budget"] is not None]
        averages.append(
            {
                "score": round(sum(e["score"] for e in entries) / len(entries), 2) if entries else None,
                "kept_budget": sum(kept) / len(kept) if kept else None,
            }
        )
    return averages
