"""Quality map of a budget sweep: task score against the KV-cache budget
actually kept, per compression method.

A sweep writes one record per (grid point, context length, task, sample).
`summarize` turns those records into mean scores and measured kept budgets,
the full-cache reference and each method's "safe budget"; `write_report`
writes the summary as quality.{json,csv,md} and draws:

* frontier.png: overall score against mean kept budget, one curve per
  method, one panel per context length, full cache as a reference line;
* frontier_<task>.png: the same for each task (one file per task keeps every
  panel large enough to read, where a task x length grid would not);
* needle_heatmap.png: score by needle depth and context length, one panel
  per grid point (records with a depth only, mean over the needle tasks);
* layer_budgets.png: kept fraction of the prompt per layer, one line per grid
  point whose kept fraction varies by layer (refreekv, pyramidkv: a flat
  line would only repeat the budget, and the flat lines of uniform methods
  hide each other), one panel per context length.

Budgets are the measured kept fractions (not the requested ones): methods
with a threshold instead of a budget land where they land, and only the
measured value makes methods comparable.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence

from refreekv.eval.metrics import sample_score
from refreekv.eval.tasks import TASKS

__all__ = [
    "FULL_CACHE_METHOD", "OVERALL", "SAFE_FRACTION", "format_markdown", "markdown_table", "summarize", "write_report",
]  # fmt: skip

# The task name of rows that average over tasks (no benchmark task has it).
OVERALL = "overall"
# The method whose points are the reference every other method is held to.
FULL_CACHE_METHOD = "fullkv"
# A budget is "safe" when the score stays at or above this share of full cache.
SAFE_FRACTION = 0.95


# -- summary -----------------------------------------------------------------


def summarize(records: Iterable[dict[str, Any]], points: Optional[Sequence[dict[str, Any]]] = None) -> dict[str, Any]:
    """Means per grid point, length and task, from sweep records.

    `points` (the sweep's `points`: label, method, options) fixes the row
    order; points seen only in the records follow in order of appearance.
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
    * reference: length x task -> the full-cache score (mean over the fullkv
      points) and which points gave it;
    * safe_budgets: method x length x task -> the lowest measured budget
      from which every point of the method scores at least SAFE_FRACTION of
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
    score = sample_score(task.metric, record["pred"], record["answers"], record.get("all_classes"), task.first_line_only)
    return 100 * score


def _point_list(records: list[dict[str, Any]], points: Optional[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    listed = [{"label": p["label"], "method": p["method"], "options": p.get("options", {})} for p in points or ()]
    known = {point["label"] for point in listed}
    for record in records:
        if record["point"] not in known:
            known.add(record["point"])
            listed.append({"label": record["point"], "method": record["method"], "options": record.get("options", {})})
    return listed


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _group(items: Iterable[Any], key: Callable[[Any], Hashable]) -> dict[Hashable, list[Any]]:
    groups: dict[Hashable, list[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _cells(scored, point_list, lengths, tasks) -> list[dict[str, Any]]:
    groups = _group(scored, lambda pair: (pair[0]["point"], pair[0]["length"], pair[0]["task"]))
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
                             score=_mean(score for _, score in members),
                             kept_budget=_mean(record.get("budget") for record, _ in members),
                             held_budget=_mean(record.get("held_budget") for record, _ in members),
                             samples=len(members),
                             complete=len(members) == most_samples[length, task])
                    )  # fmt: skip
            if task_cells:
                overall = _row(point, length, OVERALL,
                               score=_mean(cell["score"] for cell in task_cells),
                               kept_budget=_mean(cell["kept_budget"] for cell in task_cells),
                               held_budget=_mean(cell["held_budget"] for cell in task_cells),
                               samples=sum(cell["samples"] for cell in task_cells),
                               complete=all(cell["complete"] for cell in task_cells)
                               and len(task_cells) == tasks_per_length[length])  # fmt: skip
                cells += task_cells + [overall]
    return cells


def _row(point: dict[str, Any], length: int, task: str, **values: Any) -> dict[str, Any]:
    return {"point": point["label"], "method": point["method"], "length": length, "task": task, **values}


def _needle_rows(scored, point_list) -> list[dict[str, Any]]:
    """Per depth (rounded, so that 0.1 + 0.2 and 0.3 share a row), then the
    mean over needle tasks: a heatmap of several needle tasks should not
    favour the one with most samples."""
    needles = [(record, score) for record, score in scored if record.get("depth") is not None]
    groups = _group(
        needles, lambda pair: (pair[0]["point"], pair[0]["length"], pair[0]["task"], round(pair[0]["depth"], 6))
    )
    rows = []
    for point in point_list:
        lengths = sorted({length for label, length, _, _ in groups if label == point["label"]})
        for length in lengths:
            task_rows = [
                _row(point, length, task, depth=depth, score=_mean(score for _, score in members), samples=len(members))
                for (label, group_length, task, depth), members in sorted(groups.items())
                if (label, group_length) == (point["label"], length)
            ]
            by_depth = _group(task_rows, lambda row: row["depth"])
            overall = [
                _row(point, length, OVERALL, depth=depth, score=_mean(row["score"] for row in members),
                     samples=sum(row["samples"] for row in members))
                for depth, members in sorted(by_depth.items())
            ]  # fmt: skip
            rows += task_rows + overall
    return rows


def _layer_rows(records, point_list) -> list[dict[str, Any]]:
    measured = [r for r in records if r.get("kept_per_layer") and r.get("input_tokens")]
    groups = _group(measured, lambda record: (record["point"], record["length"]))
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
            kept_fraction = [_mean(layer) for layer in zip(*fractions)]
            rows.append({"point": point["label"], "method": point["method"], "length": length,
                         "kept_fraction": kept_fraction, "samples": len(members)})  # fmt: skip
    return rows


def _reference(cells) -> list[dict[str, Any]]:
    full_cache = [cell for cell in cells if cell["method"] == FULL_CACHE_METHOD]
    groups = _group(full_cache, lambda cell: (cell["length"], cell["task"]))
    return [
        {"length": length, "task": task, "score": _mean(cell["score"] for cell in members),
         "points": [cell["point"] for cell in members]}
        for (length, task), members in groups.items()
    ]  # fmt: skip


def _safe_budgets(cells, reference, point_list) -> list[dict[str, Any]]:
    reference_scores = {(row["length"], row["task"]): row["score"] for row in reference}
    methods = list(dict.fromkeys(p["method"] for p in point_list if p["method"] != FULL_CACHE_METHOD))
    measured = [cell for cell in cells if cell["kept_budget"] is not None and cell["method"] in methods]
    groups = _group(measured, lambda cell: (cell["method"], cell["length"], cell["task"]))
    return [
        {"method": method, "length": length, "task": task,
         "safe_budget": _safe_budget([(cell["kept_budget"], cell["score"]) for cell in members],
                                     reference_scores.get((length, task)))}
        for method in methods
        for (group_method, length, task), members in groups.items()
        if group_method == method
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


# -- tables ------------------------------------------------------------------


def write_report(summary: dict[str, Any], output_dir: str | Path, title: Optional[str] = None) -> list[Path]:
    """Writes quality.{json,csv,md} and the figures into `output_dir`;
    returns the paths written (figures without data to show are left out)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, md_path = (output_dir / f"quality.{suffix}" for suffix in ("json", "csv", "md"))
    json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _write_csv(summary, csv_path)
    md_path.write_text(format_markdown(summary, title), encoding="utf-8")
    return [json_path, csv_path, md_path] + _write_figures(summary, output_dir)


CSV_COLUMNS = ("point", "method", "options", "length", "task", "score", "kept_budget", "held_budget", "samples", "complete")


def _write_csv(summary: dict[str, Any], path: Path) -> None:
    options = {point["label"]: json.dumps(point["options"], sort_keys=True) for point in summary["points"]}
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for cell in summary["cells"]:
            writer.writerow([
                cell["point"], cell["method"], options[cell["point"]], cell["length"], cell["task"],
                _csv_number(cell["score"], 4), _csv_number(cell["kept_budget"], 6), _csv_number(cell["held_budget"], 6),
                cell["samples"], cell["complete"],
            ])  # fmt: skip


def _csv_number(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, columns padded; the first left-aligned, the rest right-aligned (numbers)."""
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    separator = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), separator] + [line(row) for row in rows])


def format_markdown(summary: dict[str, Any], title: Optional[str] = None) -> str:
    """quality.md: the score table, the safe-budget table, and how to read them."""
    tasks, lengths = summary["tasks"], summary["lengths"]
    columns = [(length, task) for length in lengths for task in [OVERALL] + tasks]
    header = ["point"] + [f"{length} {task}" for length, task in columns]
    cells = {(c["point"], c["length"], c["task"]): c for c in summary["cells"]}
    score_rows = [
        [point["label"]] + [_score_text(cells.get((point["label"], *column))) for column in columns]
        for point in summary["points"]
    ]
    percent = f"{100 * summary['safe_fraction']:g}%"
    parts = [
        f"# {title or 'Quality map'}",
        "Score (x100, each task's metric) per grid point and context length; `overall` is the mean over the tasks "
        "(each weighted equally) with the measured mean kept fraction of the prompt KV cache in brackets. "
        "`*`: incomplete (fewer samples than another point at the same length and task, or tasks missing).",
        markdown_table(header, score_rows),
        "## Safe budget",
        f"The lowest measured kept budget from which every point of the method scores at least {percent} of full "
        f"cache ({_reference_text(summary)}). `never`: even its largest budget falls below; `-`: nothing to compare. "
        "How to read it: down to its safe budget a method is as good as full cache; "
        "the lower, the more memory it saves.",
    ]
    safe_rows = _safe_budget_rows(summary, columns)
    parts.append(markdown_table(["method"] + header[1:], safe_rows) if safe_rows else "No compressed point to compare.")
    if summary.get("duplicates"):
        parts.append(f"{summary['duplicates']} repeated record(s) counted once.")
    if summary.get("skipped_lines"):
        lines = [f"- {bad['file']}:{bad['line']}: {bad['error']}" for bad in summary["skipped_lines"]]
        parts.append("Skipped malformed lines:\n" + "\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _score_text(cell: Optional[dict[str, Any]]) -> str:
    if cell is None:
        return "-"
    text = f"{cell['score']:.2f}"
    if cell["task"] == OVERALL and cell["kept_budget"] is not None:
        text += f" ({100 * cell['kept_budget']:.1f}%)"
    return text if cell["complete"] else text + "*"


def _reference_text(summary: dict[str, Any]) -> str:
    overall = [row for row in summary["reference"] if row["task"] == OVERALL]
    if not overall:
        return "no full-cache point in the sweep"
    return "full cache overall: " + ", ".join(f"{row['score']:.2f} at {row['length']}" for row in overall)


def _safe_budget_rows(summary: dict[str, Any], columns: list[tuple[int, str]]) -> list[list[str]]:
    safe = {(row["method"], row["length"], row["task"]): row["safe_budget"] for row in summary["safe_budgets"]}
    with_reference = {(row["length"], row["task"]) for row in summary["reference"]}
    methods = list(dict.fromkeys(method for method, _, _ in safe))

    def text(method, length, task):
        if (method, length, task) not in safe or (length, task) not in with_reference:
            return "-"
        budget = safe[method, length, task]
        return "never" if budget is None else f"{100 * budget:.1f}%"

    return [[method] + [text(method, *column) for column in columns] for method in methods]


# -- figures -----------------------------------------------------------------

FULL_CACHE_COLOR = "black"
LINE_STYLES = ("-", "--", ":", "-.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_figures(summary: dict[str, Any], output_dir: Path) -> list[Path]:
    if not summary["lengths"]:
        return []
    colors = _method_colors(summary["points"])
    paths = [_plot_frontier(summary, OVERALL, output_dir / "frontier.png", colors)]
    paths += [_plot_frontier(summary, task, output_dir / f"frontier_{task}.png", colors) for task in summary["tasks"]]
    if summary["needle"]:
        paths.append(_plot_needle_heatmap(summary, output_dir / "needle_heatmap.png"))
    if any(_varies_by_layer(row) for row in summary["layers"]):
        paths.append(_plot_layer_budgets(summary, output_dir / "layer_budgets.png", colors))
    return paths


def _method_colors(points: list[dict[str, Any]]) -> dict[str, str]:
    """One color per method, the same in every figure."""
    palette = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    methods = [m for m in dict.fromkeys(p["method"] for p in points) if m != FULL_CACHE_METHOD]
    colors = {method: palette[i % len(palette)] for i, method in enumerate(methods)}
    return {**colors, FULL_CACHE_METHOD: FULL_CACHE_COLOR}


def _panels(count: int, columns: int, panel_size: tuple[float, float]):
    """A figure of `count` panels in rows of `columns`; unused ones hidden."""
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure, axes = _pyplot().subplots(
        rows, columns, figsize=(panel_size[0] * columns + 2.5, panel_size[1] * rows), squeeze=False, layout="constrained"
    )
    flat = list(axes.flat)
    for unused in flat[count:]:
        unused.set_visible(False)
    return figure, flat[:count]


def _save(figure, path: Path, title: str) -> Path:
    figure.suptitle(title)
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
    return path


def _figure_legend(figure, axes) -> None:
    """One legend for all panels (the same methods everywhere), outside them."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        figure.legend(entries.values(), entries.keys(), loc="outside right upper", fontsize=8)


def _setting(label: str, method: str) -> str:
    """The options part of a point label such as 'snapkv(budget=0.5)'."""
    return label.removeprefix(method).removeprefix("(").removesuffix(")") if label.startswith(method) else label


def _plot_frontier(summary: dict[str, Any], task: str, path: Path, colors: dict[str, str]) -> Path:
    lengths = summary["lengths"]
    figure, axes = _panels(len(lengths), columns=3, panel_size=(4.5, 3.6))
    for ax, length in zip(axes, lengths):
        cells = [
            c for c in summary["cells"] if (c["length"], c["task"]) == (length, task) and c["kept_budget"] is not None
        ]
        compressed = [c for c in cells if c["method"] != FULL_CACHE_METHOD]
        for method, members in _group(compressed, lambda cell: cell["method"]).items():
            _draw_method_curve(ax, method, sorted(members, key=lambda cell: cell["kept_budget"]), colors)
        _draw_full_cache(ax, summary, length, task, [c for c in cells if c["method"] == FULL_CACHE_METHOD])
        # Fixed axes: panels of different lengths and tasks compare at a glance.
        ax.set(title=f"{length} tokens", xlabel="mean kept KV cache (% of prompt)", ylabel="score",
               xlim=(0, 105), ylim=(0, 105))  # fmt: skip
        ax.grid(alpha=0.3)
    _figure_legend(figure, axes)
    name = "overall score (mean over tasks)" if task == OVERALL else task
    return _save(figure, path, f"{name} against kept budget")


def _draw_method_curve(ax, method: str, cells: list[dict[str, Any]], colors: dict[str, str]) -> None:
    budgets = [100 * cell["kept_budget"] for cell in cells]
    scores = [cell["score"] for cell in cells]
    ax.plot(budgets, scores, marker="o", color=colors[method], label=method)
    for budget, score, cell in zip(budgets, scores, cells):
        ax.annotate(_setting(cell["point"], method), (budget, score), textcoords="offset points", xytext=(3, 3),
                    fontsize=6, color=colors[method])  # fmt: skip


def _draw_full_cache(
    ax, summary: dict[str, Any], length: int, task: str, full_cache_cells: list[dict[str, Any]]
) -> None:
    """Full cache as a line across the panel (what every budget is measured
    against), its 95% line (the safe-budget bar) and a marker where it is."""
    reference = next((r for r in summary["reference"] if (r["length"], r["task"]) == (length, task)), None)
    if reference is None:
        return
    ax.axhline(reference["score"], color=FULL_CACHE_COLOR, linestyle="--", linewidth=1, label="full cache")
    ax.axhline(summary["safe_fraction"] * reference["score"], color="grey", linestyle=":", linewidth=1,
               label=f"{100 * summary['safe_fraction']:g}% of full cache")  # fmt: skip
    ax.scatter([100 * c["kept_budget"] for c in full_cache_cells], [c["score"] for c in full_cache_cells],
               color=FULL_CACHE_COLOR, marker="*", s=80, zorder=3)  # fmt: skip


def _plot_needle_heatmap(summary: dict[str, Any], path: Path) -> Path:
    overall = [row for row in summary["needle"] if row["task"] == OVERALL]
    labels = list(dict.fromkeys(row["point"] for row in overall))
    # The same axes in every panel, so that a cell means the same everywhere.
    lengths = sorted({row["length"] for row in overall})
    depths = sorted({row["depth"] for row in overall})
    figure, axes = _panels(len(labels), columns=4, panel_size=(3.2, 3.0))
    for ax, label in zip(axes, labels):
        scores = {(row["depth"], row["length"]): row["score"] for row in overall if row["point"] == label}
        image = _draw_heatmap(ax, scores, depths, lengths)
        ax.set_title(label, fontsize=9)
    figure.colorbar(image, ax=axes, label="score", shrink=0.8)
    return _save(figure, path, "Needle retrieval by depth and context length (mean over needle tasks)")


def _draw_heatmap(ax, scores: dict[tuple[float, int], float], depths: list[float], lengths: list[int]):
    """Depths down, lengths across, the score written in each cell ('-': not measured)."""
    grid = [[scores.get((depth, length), math.nan) for length in lengths] for depth in depths]
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for y, depth in enumerate(depths):
        for x, length in enumerate(lengths):
            value = scores.get((depth, length))
            text = "-" if value is None else f"{value:.0f}"
            ax.text(x, y, text, ha="center", va="center", fontsize=8, color=_text_color(value))
    ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * depth:g}%" for depth in depths])
    ax.set(xlabel="context length (tokens)", ylabel="needle depth")
    return image


def _text_color(score: Optional[float]) -> str:
    """White on the dark ends of the red-to-green scale, black in between."""
    return "white" if score is not None and (score < 15 or score > 85) else "black"


def _varies_by_layer(layer_row: dict[str, Any]) -> bool:
    """More than half a percent between its layers (rounding of kept counts is less)."""
    return max(layer_row["kept_fraction"]) - min(layer_row["kept_fraction"]) > 0.005


def _plot_layer_budgets(summary: dict[str, Any], path: Path, colors: dict[str, str]) -> Path:
    rows = [row for row in summary["layers"] if _varies_by_layer(row)]
    lengths = sorted({row["length"] for row in rows})
    styles = _line_styles(summary["points"])
    figure, axes = _panels(len(lengths), columns=2, panel_size=(5.0, 3.6))
    for ax, length in zip(axes, lengths):
        for row in (r for r in rows if r["length"] == length):
            ax.plot([100 * fraction for fraction in row["kept_fraction"]], color=colors[row["method"]],
                    linestyle=styles[row["point"]], marker=".", label=row["point"])  # fmt: skip
        ax.set(title=f"{length} tokens", xlabel="layer", ylabel="kept KV cache (% of prompt)", ylim=(0, 105))
        ax.grid(alpha=0.3)
    _figure_legend(figure, axes)
    return _save(figure, path, "Kept budget per layer (mean over samples; points whose budget varies by layer)")


def _line_styles(points: list[dict[str, Any]]) -> dict[str, str]:
    """Points of one method share its color; the line style tells them apart."""
    styles = {}
    for members in _group(points, lambda point: point["method"]).values():
        styles.update({point["label"]: LINE_STYLES[i % len(LINE_STYLES)] for i, point in enumerate(members)})
    return styles
