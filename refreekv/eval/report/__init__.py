"""Reporting, in one place: summaries (`summary`), markdown and CSV tables
(`tables`) and figures (`figures`), for the quality map of sweeps,
`refreekv-longbench compare` of runs and the stopping-rule study; and the
two writers that put a report's files together. Nothing here imports torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from refreekv.eval.report.figures import comparison_figure, write_quality_figures
from refreekv.eval.report.summary import FULL_CACHE_METHOD, OVERALL, SAFE_FRACTION, summarize, task_averages
from refreekv.eval.report.tables import (
    comparison_cell,
    comparison_markdown,
    markdown_table,
    quality_markdown,
    write_comparison_csv,
    write_quality_csv,
)
from refreekv.eval.tasks import TASKS

__all__ = [
    "FULL_CACHE_METHOD", "OVERALL", "SAFE_FRACTION", "markdown_table", "quality_markdown", "summarize",
    "write_comparison", "write_quality_report",
]  # fmt: skip


def write_quality_report(summary: dict[str, Any], output_dir: str | Path, title: Optional[str] = None) -> list[Path]:
    """Writes quality.{json,csv,md} and the figures into `output_dir`;
    returns the paths written (figures without data to show are left out)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, md_path = (output_dir / f"quality.{suffix}" for suffix in ("json", "csv", "md"))
    json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_quality_csv(summary, csv_path)
    md_path.write_text(quality_markdown(summary, title), encoding="utf-8")
    return [json_path, csv_path, md_path] + write_quality_figures(summary, output_dir)


def write_comparison(
    output_dir: str | Path, run_dirs: Sequence[Path], labels: list[str], results: list[dict[str, Any]]
) -> dict[str, Any]:
    """comparison.{md,csv,png,json} of scored runs (`score_run` results)
    labelled `labels`: rows are the tasks any run has, in registry order,
    then the average over the tasks every run scored. Returns {"markdown",
    "header", "rows", "files"}."""
    tasks = [t for t in TASKS if any(t in r["tasks"] for r in results)]
    common = [t for t in tasks if all(t in r["tasks"] and r["tasks"][t]["score"] is not None for r in results)]
    averages = task_averages(results, common)
    average_name = "average" if common == tasks else f"average ({len(common)} common tasks)"
    entries = [(task, [r["tasks"].get(task) for r in results]) for task in tasks] + [(average_name, averages)]

    header = ["task"] + labels
    rows = [[task] + [comparison_cell(entry) for entry in row] for task, row in entries]
    incomplete = [
        f"{label}: {task}" for label, r in zip(labels, results) for task, e in r["tasks"].items() if not e["complete"]
    ]
    text = comparison_markdown(header, rows, incomplete)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path, png_path = output_dir / "comparison.md", output_dir / "comparison.csv", output_dir / "comparison.png"
    md_path.write_text(text, encoding="utf-8")
    write_comparison_csv(csv_path, labels, entries)
    comparison_figure(labels, results, averages, common, png_path)
    (output_dir / "comparison.json").write_text(
        json.dumps({"runs": [str(d) for d in run_dirs], "labels": labels, "tasks": tasks, "common": common,
                    "averages": averages}, indent=2) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    return {"markdown": text, "header": header, "rows": rows, "files": [md_path, csv_path, png_path]}
