"""`make quality`: the quality map of every method on the bundled model.

A reduced sweep (sweeps/quality.toml: the full cache, ReFreeKV at three
thresholds, Coverage at its default, StreamingLLM, H2O, SnapKV, PyramidKV
and AdaKV at three budgets) over the RULER-style suite's ten task families
at 1k and 2k tokens, 10 samples per cell, suite seed 1 (the report part of
docs/coverage.md C.9: no setting was chosen on it), on
SmolLM2-135M-Instruct; then the harness's own speed: the same
small slice swept plainly (one prefill per point) and branched (one
prefill per sample), in this process, with the records of both compared.

Writes benchmarks/results/quality/: quality.{md,csv,json}, frontier*.png,
needle_heatmap.png, layer_budgets.png, run.json (machine, versions, seeds,
timings, harness speed) and a dated copy of run.json plus the summary. It
measures; it asserts nothing.

    python benchmarks/quality_map.py [--lengths 1024,2048] [--samples 10] [--resume]

`make quality-prefill` runs it on sweeps/prefill_modes.toml instead (the
full cache, Coverage and SnapKV at 50%, each with the whole prompt in one
forward, the question after a question-agnostic context cut, and a
streaming prefill in pieces of 512 and 1024 tokens; SPEC 11), at 2k
tokens, suite seed 0 (`--seed 0`, the seed of its committed results), into
benchmarks/results/quality_prefill/, without the harness-speed slice
(`--speed-samples 0`): its modes run plainly, never branched.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from refreekv.eval.rundir import read_records
from refreekv.eval.sweep import SweepRequest, run_sweep

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "quality"
DEFAULT_GRID = ROOT / "sweeps" / "quality.toml"
COMPARED = ("pred", "new_tokens", "budget", "kept_per_layer")


def _sweep(output: Path, fresh: bool, **options) -> tuple[dict, float]:
    if fresh and output.exists():
        shutil.rmtree(output)
    start = time.perf_counter()
    report = run_sweep(SweepRequest(model="bundled:smollm2", suite="ruler", **options, output_dir=str(output)))
    return report, time.perf_counter() - start


def harness_speed(work: Path, grid: Path, length: int, tasks: list[str], samples: int, batch_size: int) -> dict:
    """Sample-points per second, plain and branched, on the same slice."""
    common = dict(grid=str(grid), lengths=[length], tasks=tasks, samples=samples, batch_size=batch_size)
    plain, plain_seconds = _sweep(work / "speed-plain", True, plain=True, **common)
    branched, branched_seconds = _sweep(work / "speed-branched", True, **common)
    key = lambda r: (r["point"], r["task"], r["_id"])  # noqa: E731
    plain_records = {key(r): r for r in read_records(work / "speed-plain")[0]}
    branched_records = {key(r): r for r in read_records(work / "speed-branched")[0]}
    same = sum(
        all(plain_records[k].get(f) == branched_records[k].get(f) for f in COMPARED) for k in plain_records
    )
    plain_rate = plain["done_now"] / plain["seconds"]
    branched_rate = branched["done_now"] / branched["seconds"]
    return {
        "slice": {"length": length, "tasks": tasks, "samples": samples, "batch_size": batch_size,
                  "sample_points": plain["done_now"]},  # fmt: skip
        "plain_sample_points_per_second": round(plain_rate, 3),
        "branched_sample_points_per_second": round(branched_rate, 3),
        "speedup": round(branched_rate / plain_rate, 2),
        "plain_seconds": round(plain_seconds, 1),
        "branched_seconds": round(branched_seconds, 1),
        "records_identical": f"{same}/{len(plain_records)}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--samples", type=int, default=10, help="samples per task and length")
    parser.add_argument("--grid", default=str(DEFAULT_GRID))
    parser.add_argument("--batch-size", type=int, default=40, help="the four needle tasks (10 samples each) decode as one batch")
    parser.add_argument("--seed", type=int, default=1,
                        help="suite seed; 1, the report part: Coverage's default was chosen on seed 0 (docs/coverage.md C.9)")  # fmt: skip
    parser.add_argument("--work-dir", default=str(ROOT / "build" / "quality"), help="sweep directories (not kept in git)")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--resume", action="store_true", help="continue the sweep in --work-dir instead of starting afresh")
    parser.add_argument("--speed-samples", type=int, default=2,
                        help="samples per task of the plain-vs-branched slice (0: no slice)")  # fmt: skip
    args = parser.parse_args()
    work, output = Path(args.work_dir), Path(args.output)
    lengths = [int(n) for n in args.lengths.split(",")]

    started = time.perf_counter()
    report, sweep_seconds = _sweep(
        work / "sweep", not args.resume, grid=args.grid, lengths=lengths, samples=args.samples,
        batch_size=args.batch_size, seed=args.seed,
    )  # fmt: skip
    speed = None
    if args.speed_samples > 0:
        speed = harness_speed(work, Path(args.grid), lengths[0], ["qa_planted"], args.speed_samples, args.batch_size)

    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob("*.png"):  # a figure this run does not draw must not linger
        stale.unlink()
    for path in (work / "sweep").iterdir():
        if path.suffix in (".md", ".csv", ".json", ".png") and path.name not in ("report.json",):
            shutil.copy2(path, output / path.name)
    sweep = json.loads((work / "sweep" / "sweep.json").read_text(encoding="utf-8"))
    run = {
        "command": "make quality" if Path(args.grid).resolve() == DEFAULT_GRID and args.seed == 1 else " ".join(["benchmarks/quality_map.py", *sys.argv[1:]]),
        "grid": str(args.grid),
        "model": sweep["model"],
        "lengths": lengths,
        "samples_per_cell": args.samples,
        "suite_seed": args.seed,
        "batch_size": args.batch_size,
        "points": [p["label"] for p in sweep["points"]],
        "environment": sweep["environment"],
        "sweep": {"sample_points": report["sample_points"], "seconds": round(sweep_seconds, 1),
                  "sample_points_per_second": report["sample_points_per_second"]},  # fmt: skip
        "harness_speed": speed,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (output / "run.json").write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    summary = json.loads((output / "quality.json").read_text(encoding="utf-8"))
    (output / f"{stamp}.json").write_text(json.dumps({"run": run, "summary": summary}, indent=2) + "\n", encoding="utf-8")
    print((output / "quality.md").read_text(encoding="utf-8"))
    print(json.dumps({"sweep": run["sweep"], "harness_speed": speed, "total_seconds": run["total_seconds"]}, indent=2))
    print(f"written to {output}")


if __name__ == "__main__":
    main()
