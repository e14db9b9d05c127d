"""`make coverage-axes`: new axes of Coverage's threshold-free rule, chosen
on one part of the data and reported on another (docs/coverage.md C.9).

The tuning part: suite seed 0, the eight task families the stopping-rule
study saw (`refreekv.eval.ruler.STUDIED_TASKS`), 2k and 4k tokens, 5
samples per cell; the grid sweeps/coverage_axes_tune.toml varies one axis
at a time (value-aware signal, expected attention, one tolerance for the
whole model, a floor per head) around the current default, with SnapKV
bracketing the budgets.

The choice, fixed before any record is read: among the Coverage settings,
one lossless (every family within 2 points of the full cache) at every
tuning length with the smallest mean held budget; none being lossless, the
one with the smallest worst family drop (ties: smaller held budget). The
current default competes with the new axes, so "keep the default" is a
possible outcome.

The report part: suite seed 1 (other essays, positions and values), every
task family, the two held-out ones (`HELD_OUT_TASKS`: multi-hop and
two-place retrieval) included, 1k, 2k and 4k tokens, 10 samples per cell;
the grid sweeps/coverage_axes_report.toml (the full cache, the previous
default, SnapKV, PyramidKV and AdaKV at three budgets) plus the choice.
Baselines are compared at equal memory: each interpolated on its curve of
rows held at the rows the setting holds (`refreekv.eval.report.frontier`).

Then the cost: prefill time of the choice and of the previous default
against unpatched at 1k, 4k and 8k tokens (median of 5 rounds, each timing
the unpatched model and every setting once, in an order that turns every
round, in this process), the target being <= 1.03.

Writes benchmarks/results/coverage_axes/: study.md (the tables, each naming
its part), study.json, run.json and each part's quality report. It
measures; it asserts nothing.

    python benchmarks/coverage_axes.py [--tune-samples 5] [--report-samples 10] [--report-only] [--overhead-only]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from refreekv.eval.grid import GridPoint, load_grid
from refreekv.eval.report import summarize, write_quality_report
from refreekv.eval.report.frontier import FIXED_BUDGET_METHODS, judge_point
from refreekv.eval.report.tables import family_table, markdown_table, study_table
from refreekv.eval.rundir import read_records
from refreekv.eval.ruler import HELD_OUT_TASKS, RULER_TASKS, STUDIED_TASKS
from refreekv.eval.sweep import SweepRequest, run_sweep

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = ROOT / "sweeps"
RESULTS = ROOT / "benchmarks" / "results" / "coverage_axes"
COMPARED = ("snapkv", "pyramidkv", "adakv")
PARTS = {
    "tune": {"grid": SWEEPS / "coverage_axes_tune.toml", "seed": 0, "tasks": STUDIED_TASKS, "lengths": [2048, 4096],
             "title": "tuning part: suite seed 0, the 8 studied families"},
    "report": {"grid": SWEEPS / "coverage_axes_report.toml", "seed": 1, "tasks": RULER_TASKS, "lengths": [1024, 2048, 4096],
               "title": "report part: suite seed 1, all 10 families (multi_hop and two_place held out)"},
}  # fmt: skip


def run_part(output: Path, points: list[GridPoint], part: dict[str, Any], samples: int, batch_size: int) -> dict:
    start = time.perf_counter()
    report = run_sweep(SweepRequest(
        model="bundled:smollm2", suite="ruler", grid=points, lengths=part["lengths"], tasks=list(part["tasks"]),
        samples=samples, batch_size=batch_size, seed=part["seed"], output_dir=str(output),
    ))  # fmt: skip
    return {"lengths": part["lengths"], "seed": part["seed"], "tasks": list(part["tasks"]), "samples_per_cell": samples,
            "points": [p.label for p in points], "sample_points_done": report["done_now"],
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def part_summary(output: Path, tasks: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The summary of the points the grid holds now, over `tasks` (None: all)."""
    sweep = json.loads((output / "sweep.json").read_text(encoding="utf-8"))
    labels = {point["label"] for point in sweep["points"]}
    records = [r for r in read_records(output)[0] if r["point"] in labels and (tasks is None or r["task"] in tasks)]
    return summarize(records, sweep["points"])


def coverage_rows(summary: dict[str, Any], tasks: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    """The Coverage points judged at every length where each of `tasks`
    (None: any) has its cells (a length cut short has only some)."""
    rows = [judge_point(summary, p["label"], n) for p in summary["points"] if p["method"] == "coverage" for n in summary["lengths"]]
    return [row for row in rows if row is not None and (tasks is None or set(tasks) <= set(row["families"]))]


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rule of the module docstring, on held budgets."""
    by_point: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_point.setdefault(row["point"], []).append(row)
    held = {p: sum(r["held_budget"] for r in rs) / len(rs) for p, rs in by_point.items()}
    worst = {p: max(r["worst_drop"] for r in rs) for p, rs in by_point.items()}
    lossless = [p for p, rs in by_point.items() if all(r["lossless"] for r in rs)]
    if lossless:
        best = min(lossless, key=lambda p: held[p])
    else:
        best = min(worst, key=lambda p: (worst[p], held[p]))
    return {"point": best, "lossless_everywhere": bool(lossless), "mean_held": held[best], "worst_drop": worst[best]}


def report_points(choice: str, tune_points: list[GridPoint]) -> tuple[list[GridPoint], GridPoint]:
    """The report grid with the choice added (unless a point of it has the
    same options already), and the report's point of the choice."""
    points = load_grid(PARTS["report"]["grid"])
    chosen = next(p for p in tune_points if p.label == choice)
    same = [p for p in points if (p.method, p.all_options) == (chosen.method, chosen.all_options)]
    if not same:
        points.append(chosen)
    return points, (same or [chosen])[0]


def family_split_table(report_dir: Path) -> str:
    """Each Coverage setting of the report part on the studied and on the
    held-out families alone, against the baselines at its held budget."""
    lines = []
    for name, tasks in (("studied families", STUDIED_TASKS), ("held-out families", HELD_OUT_TASKS)):
        summary = part_summary(report_dir, tasks)
        lines.append(f"Report part, {name} only ({', '.join(tasks)}):\n\n" + study_table(coverage_rows(summary, tasks), COMPARED, at_held=True))
    return "\n\n".join(lines)


def prefill_overhead(settings: dict[str, dict[str, Any]], sizes: Sequence[int], repeats: int) -> dict[str, Any]:
    """Per prompt size, each setting's prefill time / unpatched, timed in
    rounds (`bench_e2e.paired_prefill`)."""
    import bench_e2e  # benchmarks/ is on the path when this file runs as a script
    from refreekv.assets import load_bundled_model

    model, tokenizer = load_bundled_model()
    results = {}
    for tokens in sizes:
        ids = bench_e2e.prompt_ids(tokenizer, tokens)
        bench_e2e.prefill(model, ids[:, :64])
        timed = bench_e2e.paired_prefill(model, ids, repeats, {n: ("coverage", o) for n, o in settings.items()})
        row = {"unpatched_s": round(timed["unpatched_s"], 4)}
        row |= {n: {"seconds": round(timed[n]["seconds"], 4), "ratio": round(timed[n]["ratio"], 4)} for n in settings}
        results[str(tokens)] = row
        print(f"prefill overhead at {tokens} tokens: " + ", ".join(f"{n} {row[n]['ratio']:.3f}" for n in settings))
    return results


def overhead_table(overhead: dict[str, Any]) -> str:
    names = [k for k in next(iter(overhead.values())) if k != "unpatched_s"]
    rows = [[name, *[f"{overhead[size][name]['ratio']:.3f}" for size in overhead]] for name in names]
    return markdown_table(["setting", *[f"{size} tokens" for size in overhead]], rows)


def shared_samples_table(report_dir: Path, length: int) -> Optional[str]:
    """A length whose cells are not all complete (a study cut short),
    judged on the samples every point has finished: the families done so
    far, each on the samples all points share. None when every cell is
    complete or no family is shared."""
    sweep = json.loads((report_dir / "sweep.json").read_text(encoding="utf-8"))
    records = [r for r in read_records(report_dir)[0] if r["length"] == length]
    per_point: dict[str, int] = {}
    for record in records:
        per_point[record["point"]] = per_point.get(record["point"], 0) + 1
    # points left out of a resumed run (fewer records than the rest) would narrow the shared families to theirs
    labels = sorted(p for p, count in per_point.items() if count == max(per_point.values()))
    done: dict[tuple[str, str], set] = {}
    for record in records:
        done.setdefault((record["point"], record["task"]), set()).add(record["_id"])
    tasks = sorted({r["task"] for r in records})
    shared = {t: set.intersection(*[done.get((p, t), set()) for p in labels]) for t in tasks}
    shared = {t: ids for t, ids in shared.items() if ids}
    sizes = {len(ids) for ids in done.values()}
    finished = len(sizes) == 1 and all((p, t) in done for p in labels for t in RULER_TASKS)
    if finished or not shared:
        return None
    kept = [r for r in records if r["_id"] in shared.get(r["task"], ())]
    summary = summarize(kept, [p for p in sweep["points"] if p["label"] in labels])
    rows = [row for row in coverage_rows(summary) if row["length"] == length]
    counts = ", ".join(f"{t} {len(ids)}" for t, ids in sorted(shared.items()))
    return (f"{length} tokens, cut short: only the families every point finished, on the samples they share "
            f"({counts}):\n\n" + study_table(rows, COMPARED, at_held=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tune-samples", type=int, default=5)
    parser.add_argument("--report-samples", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--work-dir", default=str(ROOT / "build" / "coverage_axes"))
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the sweeps in --work-dir")
    parser.add_argument("--overhead-only", action="store_true", help="measure the prefill overhead again, keep the sweeps' results")
    parser.add_argument("--overhead-repeats", type=int, default=5)
    args = parser.parse_args()
    work, output = Path(args.work_dir), Path(args.output)
    tune_dir, report_dir = work / "tune", work / "report"
    started = time.perf_counter()
    tune_points = load_grid(PARTS["tune"]["grid"])

    stages, overhead = {}, None
    reuse = args.report_only or args.overhead_only
    if reuse and (output / "run.json").exists():  # the timings stay those of the runs
        previous = json.loads((output / "run.json").read_text(encoding="utf-8"))
        stages, overhead = previous["stages"], previous.get("prefill_overhead")
    if not reuse:
        stages["tune"] = run_part(tune_dir, tune_points, PARTS["tune"], args.tune_samples, args.batch_size)
    tune_summary = part_summary(tune_dir)
    tune_rows = coverage_rows(tune_summary, PARTS["tune"]["tasks"])
    choice = choose(tune_rows)
    points, chosen = report_points(choice["point"], tune_points)
    if not reuse:
        stages["report"] = run_part(report_dir, points, PARTS["report"], args.report_samples, args.batch_size)
    report_summary = part_summary(report_dir)
    report_rows = coverage_rows(report_summary, PARTS["report"]["tasks"])
    if not args.report_only:
        settings = {p.label: dict(p.options) for p in points if p.method == "coverage"}
        overhead = prefill_overhead(settings, [1024, 4096, 8192], args.overhead_repeats)

    output.mkdir(parents=True, exist_ok=True)
    write_quality_report(tune_summary, output / "tune", title=f"Coverage axes, {PARTS['tune']['title']}")
    write_quality_report(report_summary, output / "report", title=f"Coverage axes, {PARTS['report']['title']}")
    markdown = "\n\n".join([
        "# Coverage's axes on SmolLM2-135M-Instruct, chosen on one part, reported on another",
        "Kept % is the measured mean budget (tokens attended, averaged over KV heads); held % the prompt rows held "
        "in memory (paged storage: each KV head at its own count, in blocks); worst family is the task family with "
        "the largest drop below the full cache (lossless: every drop <= 2 points); each baseline is its overall "
        "score interpolated on its curve of held rows at the rows the setting holds (equal memory; - below its "
        "lowest measured budget); on frontier / at held: at or above every baseline at the kept / held budget.",
        f"## Tuning part ({PARTS['tune']['title']}, {args.tune_samples} samples per cell)",
        study_table(tune_rows, ("snapkv",), at_held=True),
        f"Choice (the rule fixed in benchmarks/coverage_axes.py): `{choice['point']}` "
        f"({'lossless at every tuning length' if choice['lossless_everywhere'] else 'smallest worst family drop'}, "
        f"worst drop {choice['worst_drop']:+.1f}, mean held {100 * choice['mean_held']:.1f}%).",
        f"## Report part ({PARTS['report']['title']}, {args.report_samples} samples per cell)",
        study_table(report_rows, COMPARED, at_held=True),
        family_split_table(report_dir),
        *[table for n in PARTS["report"]["lengths"] if (table := shared_samples_table(report_dir, n)) is not None],
        f"Per task family, report part, `{chosen.label}`:",
        family_table(report_rows, chosen.label),
        *([] if overhead is None else [
            f"Prefill time / unpatched (median of {args.overhead_repeats} rounds, each timing unpatched and every setting once, the order turning every round; target <= 1.03):",
            overhead_table(overhead),
        ]),
    ])  # fmt: skip
    (output / "study.md").write_text(markdown + "\n", encoding="utf-8")
    run = {
        "command": "make coverage-axes",
        "stages": stages,
        "choice": choice,
        "prefill_overhead": overhead,
        "total_seconds": round(time.perf_counter() - started, 1),
        "environment": json.loads((tune_dir / "sweep.json").read_text(encoding="utf-8"))["environment"],
    }
    (output / "run.json").write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    study = {"run": run, "tune_rows": tune_rows, "report_rows": report_rows}
    (output / "study.json").write_text(json.dumps(study, indent=2) + "\n", encoding="utf-8")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    (output / f"{stamp}.json").write_text(json.dumps(study, indent=2) + "\n", encoding="utf-8")
    print(markdown)
    print(f"written to {output}")


if __name__ == "__main__":
    main()
