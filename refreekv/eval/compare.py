"""`refreekv-longbench compare`: several runs side by side, or the quality
map of budget sweeps.

Run directories: writes `comparison.md` and `comparison.csv` (rows: tasks,
then the average over the tasks every run has; columns: runs; a cell is the
score and, in brackets, the mean kept fraction of the prompt KV cache) and
`comparison.png` (average score against average kept budget, one marker
per run, small markers per task).

Sweep directories (holding `sweep.json` and `records.jsonl`): their records
go through `refreekv.eval.quality` (quality.{json,csv,md} and figures).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from refreekv.eval.config import check_output_dir
from refreekv.eval.data import BadLine
from refreekv.eval.quality import format_markdown, markdown_table, summarize, write_report
from refreekv.eval.scoring import score_run
from refreekv.eval.sweep import RECORDS_FILE, SWEEP_FILE, read_records
from refreekv.eval.tasks import TASKS

__all__ = ["compare_runs", "compare_sweeps"]

# The fields a sweep record needs to be scored and placed in the map.


def _load_scores(run_dir: Path) -> dict[str, Any]:
    # Always rescored: cheap, and never stale after a resumed run.
    return score_run(run_dir, write=True)


def _label(result: dict[str, Any], run_dir: Path) -> str:
    from refreekv.eval.config import RunConfig

    try:
        return RunConfig(**result["config"]).label()
    except TypeError:
        return run_dir.name


def _cell(entry: Optional[dict[str, Any]]) -> str:
    if entry is None or entry.get("score") is None:
        return "-"
    kept = entry.get("kept_budget")
    kept_text = f" ({100 * kept:.1f}%)" if kept is not None else ""
    return f"{entry['score']:.2f}{kept_text}"


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
    tasks = [t for t in TASKS if any(t in r["tasks"] for r in results)]
    common = [t for t in tasks if all(t in r["tasks"] and r["tasks"][t]["score"] is not None for r in results)]

    averages = []
    for result in results:
        entries = [result["tasks"][t] for t in common]
        kept = [e["kept_budget"] for e in entries if e["kept_budget"] is not None]
        averages.append(
            {
                "score": round(sum(e["score"] for e in entries) / len(entries), 2) if entries else None,
                "kept_budget": sum(kept) / len(kept) if kept else None,
            }
        )

    header = ["task"] + labels
    rows = [[task] + [_cell(r["tasks"].get(task)) for r in results] for task in tasks]
    average_name = "average" if common == tasks else f"average ({len(common)} common tasks)"
    rows.append([average_name] + [_cell(a) for a in averages])
    markdown = markdown_table(header, rows)
    notes = []
    incomplete = [
        f"{label}: {task}" for label, r in zip(labels, results) for task, e in r["tasks"].items() if not e["complete"]
    ]
    if incomplete:
        notes.append("Incomplete tasks (fewer predictions than samples): " + ", ".join(incomplete) + ".")
    text = markdown + "\n\nEach cell: score (mean kept fraction of the prompt KV cache).\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path, png_path = output_dir / "comparison.md", output_dir / "comparison.csv", output_dir / "comparison.png"
    md_path.write_text(text, encoding="utf-8")
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task"] + [f"{label} {column}" for label in labels for column in ("score", "kept_budget")])
        for task in tasks + [average_name]:
            values = []
            for result, average in zip(results, averages):
                entry = average if task == average_name else result["tasks"].get(task)
                values += _csv_pair(entry)
            writer.writerow([task] + values)
    _plot(labels, results, averages, common, png_path)
    (output_dir / "comparison.json").write_text(
        json.dumps({"runs": [str(d) for d in dirs], "labels": labels, "tasks": tasks, "common": common,
                    "averages": averages}, indent=2) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    return {"markdown": text, "header": header, "rows": rows, "files": [md_path, csv_path, png_path]}


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
    files = write_report(summary, output_dir, title)
    return {"markdown": format_markdown(summary, title), "summary": summary, "files": files}


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


def _csv_pair(entry: Optional[dict[str, Any]]) -> list[str]:
    if entry is None or entry.get("score") is None:
        return ["", ""]
    kept = entry.get("kept_budget")
    return [f"{entry['score']:.2f}", "" if kept is None else f"{kept:.6f}"]


def _plot(labels, results, averages, common, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, result, average) in enumerate(zip(labels, results, averages)):
        color = colors[i % len(colors)]
        points = [
            (100 * result["tasks"][t]["kept_budget"], result["tasks"][t]["score"])
            for t in common
            if result["tasks"][t]["kept_budget"] is not None
        ]
        if points:
            axes.scatter(*zip(*points), color=color, alpha=0.35, s=18)
        if average["score"] is not None and average["kept_budget"] is not None:
            axes.scatter([100 * average["kept_budget"]], [average["score"]], color=color, s=90, marker="D",
                         edgecolor="black", label=f"{label}: {average['score']:.2f} at {100 * average['kept_budget']:.1f}%")  # fmt: skip
    axes.set_xlabel("mean kept fraction of the prompt KV cache (%)")
    axes.set_ylabel("LongBench score")
    axes.set_xlim(0, 105)
    axes.set_title(f"Score against kept budget ({len(common)} task(s); diamonds: average)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
