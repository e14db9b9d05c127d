"""Tables: markdown and CSV text of the quality map, of `compare`'s run
table and of the stopping-rule study. Markdown tables pad their columns and
right-align numbers; CSV numbers carry fixed digits, empty when unmeasured."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from refreekv.eval.prefill import ONE_FORWARD
from refreekv.eval.report.summary import OVERALL

__all__ = [
    "comparison_cell", "comparison_markdown", "csv_number", "family_table", "markdown_table", "quality_markdown", "study_table",
    "write_comparison_csv", "write_quality_csv",
]  # fmt: skip

CSV_COLUMNS = (
    "point", "method", "options", "length", "task", "score", "kept_budget", "held_budget", "samples", "complete", "prefill",
)  # fmt: skip


def write_quality_csv(summary: dict[str, Any], path: Path) -> None:
    options = {point["label"]: json.dumps(point["options"], sort_keys=True) for point in summary["points"]}
    prefill = {point["label"]: point.get("prefill", ONE_FORWARD) for point in summary["points"]}
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for cell in summary["cells"]:
            writer.writerow([
                cell["point"], cell["method"], options[cell["point"]], cell["length"], cell["task"],
                csv_number(cell["score"], 4), csv_number(cell["kept_budget"], 6), csv_number(cell["held_budget"], 6),
                cell["samples"], cell["complete"], prefill[cell["point"]],
            ])  # fmt: skip


def csv_number(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, columns padded; the first left-aligned, the rest right-aligned (numbers)."""
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    separator = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), separator] + [line(row) for row in rows])


def quality_markdown(summary: dict[str, Any], title: Optional[str] = None) -> str:
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
        "(each weighted equally) with the measured mean kept fraction of the prompt KV cache in brackets, and the "
        "fraction of its rows held in memory where that is more (a per-head budget held in blocks). "
        "`*`: incomplete (fewer samples than another point at the same length and task, or tasks missing).",
        markdown_table(header, score_rows),
        "## Safe budget",
        f"The lowest measured kept budget from which every point of the method scores at least {percent} of full "
        f"cache ({_reference_text(summary)}). `never`: even its largest budget falls below; `-`: nothing to compare. "
        "How to read it: down to its safe budget a method is as good as full cache; "
        "the lower, the more memory it saves.",
    ]
    if any(point.get("prefill", ONE_FORWARD) != ONE_FORWARD for point in summary["points"]):
        parts[-1] += (
            " A method in another prefill mode than one forward is a row of its own: `[question after]`, the context "
            "cut alone and the question fed after it (the budget counts the question's rows, all kept); "
            "`[streaming N]`, the prompt in pieces of N tokens, re-cut after each."
        )
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
        kept, held = f"{100 * cell['kept_budget']:.1f}", cell.get("held_budget")
        # memory is what holds, not what attends: a point that holds more than it keeps says so
        held = None if held is None or held <= cell["kept_budget"] or f"{100 * held:.1f}" == kept else f"{100 * held:.1f}"
        text += f" ({kept}%)" if held is None else f" ({kept}%, held {held}%)"
    return text if cell["complete"] else text + "*"


def _reference_text(summary: dict[str, Any]) -> str:
    overall = [row for row in summary["reference"] if row["task"] == OVERALL]
    if not overall:
        return "no full-cache point in the sweep"
    return "full cache overall: " + ", ".join(f"{row['score']:.2f} at {row['length']}" for row in overall)


def _safe_budget_rows(summary: dict[str, Any], columns: list[tuple[int, str]]) -> list[list[str]]:
    # a method in one prefill mode (older summaries: the method alone)
    safe = {(row.get("series", row["method"]), row["length"], row["task"]): row["safe_budget"] for row in summary["safe_budgets"]}
    with_reference = {(row["length"], row["task"]) for row in summary["reference"]}
    methods = list(dict.fromkeys(method for method, _, _ in safe))

    def text(method, length, task):
        if (method, length, task) not in safe or (length, task) not in with_reference:
            return "-"
        budget = safe[method, length, task]
        return "never" if budget is None else f"{100 * budget:.1f}%"

    return [[method] + [text(method, *column) for column in columns] for method in methods]



# -- `compare` of run directories ----------------------------------------------


def comparison_cell(entry: Optional[dict[str, Any]]) -> str:
    """A run's task entry: its score and, in brackets, its mean kept fraction."""
    if entry is None or entry.get("score") is None:
        return "-"
    kept = entry.get("kept_budget")
    kept_text = f" ({100 * kept:.1f}%)" if kept is not None else ""
    return f"{entry['score']:.2f}{kept_text}"


def comparison_markdown(header: list[str], rows: list[list[str]], incomplete: list[str]) -> str:
    """comparison.md: the table, how to read a cell, and the incomplete tasks."""
    text = markdown_table(header, rows) + "\n\nEach cell: score (mean kept fraction of the prompt KV cache).\n"
    if incomplete:
        text += "\nIncomplete tasks (fewer predictions than samples): " + ", ".join(incomplete) + ".\n"
    return text


def write_comparison_csv(path: Path, labels: Sequence[str], rows: list[tuple[str, list[Optional[dict[str, Any]]]]]) -> None:
    """comparison.csv: per row (task, one entry per run), score and kept budget of each run."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task"] + [f"{label} {column}" for label in labels for column in ("score", "kept_budget")])
        for task, entries in rows:
            values = []
            for entry in entries:
                scored = entry is not None and entry.get("score") is not None
                values += [csv_number(entry["score"], 2), csv_number(entry.get("kept_budget"), 6)] if scored else ["", ""]
            writer.writerow([task] + values)


# -- the stopping-rule study -------------------------------------------------


def study_table(rows: list[dict[str, Any]], baselines: Sequence[str], *, at_held: bool = False) -> str:
    """One line per judged point and length (`refreekv.eval.report.frontier.judge_point`
    rows), by length then budget, with the score of each of `baselines` at
    the point's kept budget, or with `at_held` at the rows it holds (equal
    memory)."""
    where = "held" if at_held else "budget"
    header = ["point", "length", "kept %", "held %", "score", "full", "worst family (drop)", "lossless",
              *[f"{m} @ {where}" for m in baselines], "on frontier", "at held"]  # fmt: skip
    body = []
    for r in sorted(rows, key=lambda r: (r["length"], r["budget"])):
        compared = (r.get("baselines_at_held") or {}) if at_held else r["baselines"]
        at_budget = [("-" if compared.get(m) is None else f"{compared[m]:.1f}") for m in baselines]
        frontier, frontier_at_held = (
            "-" if v is None else ("yes" if v else "no") for v in (r["on_frontier"], r["on_frontier_at_held"])
        )
        body.append([
            r["point"], str(r["length"]), f"{100 * r['budget']:.1f}",
            "-" if r["held_budget"] is None else f"{100 * r['held_budget']:.1f}", f"{r['score']:.1f}", f"{r['full_score']:.1f}",
            f"{r['worst_family']} ({r['worst_drop']:+.1f})", "yes" if r["lossless"] else "no", *at_budget, frontier, frontier_at_held,
        ])  # fmt: skip
    return markdown_table(header, body)


def family_table(rows: list[dict[str, Any]], point: str) -> str:
    """Per task family: kept budget (and score drop) of one point, per length."""
    mine = sorted((r for r in rows if r["point"] == point), key=lambda r: r["length"])
    tasks = sorted({t for r in mine for t in r["families"]})
    header = ["task", *[f"{r['length']}: kept % (drop)" for r in mine]]
    body = [
        [task, *[f"{100 * r['families'][task]['budget']:.1f} ({r['families'][task]['drop']:+.1f})" for r in mine]]
        for task in tasks
    ]
    return markdown_table(header, body)
