"""The run machinery of `refreekv-longbench run` and `sweep`, and `run`
itself: a LongBench run is a sweep with one grid point (the method and its
options), on the benchmark's task files, sharded over ranks.

Both make a `Plan` (`plan`: every check that needs no model, writing
nothing), load the model (`load`), pin their configuration to the run
directory and append fsynced records to it (`refreekv.eval.rundir`). What
`run` keeps of its own is its generation: one patched `generate` per
sample (`refreekv.eval.generation.predict`), where a sweep batches samples
and branches one prefill into every point.

`run`'s output directory:

    config.json                          what makes the predictions what they are
    report.json                          (report.rank{r}.json per rank when sharded)
    <task>/predictions.rank{r}.jsonl     one record per sample, appended and fsynced

Resuming: a restarted run reads every rank file of a task and skips the ids
already there; a last line cut short by a crash is removed first. Sharding:
under torchrun (or accelerate launch) RANK and WORLD_SIZE are set and rank r
takes the samples whose index in the task file is r modulo WORLD_SIZE;
`score` merges the rank files, so a crashed rank is resumed on its own.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from refreekv.compression.checks import check_int
from refreekv.eval.data import BadLine, Sample, needs_classes, read_samples, task_file
from refreekv.eval.errors import ConfigMismatch, UsageError, usage_errors
from refreekv.eval.generation import predict
from refreekv.eval.grid import GridPoint
from refreekv.eval.models import BUNDLED_MODEL, ModelSettings, check_model, layer_count, load_model, resolve_device, resolve_dtype
from refreekv.eval.options import parse_options
from refreekv.eval.rundir import LONGBENCH, Layout, RunConfig, RunDir, environment, shard_info, write_record
from refreekv.eval.tasks import TASKS, resolve_tasks

__all__ = [
    "Plan",
    "RunRequest",
    "load",
    "plan",
    "prepare",
    "read_task",
    "run",
    # defined in their own modules; kept importable from here for callers of `run`
    "BUNDLED_MODEL",
    "ConfigMismatch",
    "UsageError",
    "parse_options",
]


@dataclass
class RunRequest:
    model: str
    data_dir: str
    output_dir: str
    max_input_length: int
    method: str = "refreekv"
    options: dict[str, Any] = field(default_factory=dict)
    tasks: Optional[list[str]] = None  # None: the default set
    longbench_e: bool = False
    limit: Optional[int] = None
    device_map: Optional[str] = None
    settings: ModelSettings = field(default_factory=ModelSettings)


@dataclass
class Plan:
    """A checked request: the model and how it runs, the grid points, the
    run directory and the configuration pinned to it, the tasks; what this
    rank does (`todo`: samples per task, a sweep's per (length, task)) and
    its report, both filled by the command."""

    model: str  # as pinned: the bundled name, or a local folder's absolute path
    settings: ModelSettings
    dtype: str
    device: str
    points: list[GridPoint]
    run_dir: RunDir
    config: dict[str, Any]
    pinned: Optional[dict[str, Any]]  # the pin file as found (None: a new directory)
    tasks: list[str]
    rank: int = 0
    world: int = 1
    todo: dict[Any, list[Sample]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def plan(
    model: str,
    settings: ModelSettings,
    points: list[GridPoint],
    output_dir: str | Path,
    layout: Layout,
    config: Callable[[str, str], dict[str, Any]],
    tasks: list[str],
    *,
    pin_keys: tuple[str, ...] = ("config",),
    name_points: bool = True,
    sharded: bool = True,
) -> Plan:
    """The checks both commands share, once theirs are done: the model,
    the points' layer options against its layer count, the shard (when
    `sharded`: the launcher's ranks) and device, the output directory and
    the configuration pinned there (`config(model, dtype)`; `pin_keys`: the
    keys its pin file must hold)."""
    model = check_model(model)
    layers = layer_count(model)
    if layers is not None:
        check_layers(points, layers, name_points)
    rank, world, local_rank = shard_info() if sharded else (0, 1, 0)
    device = resolve_device(settings.device, local_rank, world)
    dtype = resolve_dtype(settings.dtype, settings.device)
    run_dir = RunDir(output_dir, layout)
    run_dir.check_writable()
    wanted = config(model, dtype)
    stored = run_dir.check_config(wanted, pin_keys)
    return Plan(model, settings, dtype, device, points, run_dir, wanted, stored, tasks, rank, world)


def check_layers(points: list[GridPoint], layers: int, name_points: bool = True) -> None:
    """Refuses points whose options name layers a model of `layers` lacks."""
    for point in points:
        try:
            point.check_layers(layers)
        except ValueError as error:
            raise UsageError(f"grid point {point.label}: {error}" if name_points else str(error)) from None


def load(plan: Plan, device_map: Optional[str] = None):
    """(model, tokenizer) as the plan says, with torch's threads set."""
    plan.settings.set_threads(plan.device, plan.world)
    return load_model(plan.model, plan.dtype, plan.device, device_map, plan.settings.attn_implementation)


def read_task(path: Path, task: str, limit: Optional[int]) -> tuple[list[Sample], list[BadLine]]:
    """(samples, malformed lines) of a task file, the first `limit`
    samples; each malformed line is a warning."""
    samples, bad = read_samples(path, limit, needs_classes(TASKS[task]))
    for line in bad:
        print(f"warning: skipped {line}", file=sys.stderr)
    return samples, bad


# -- `refreekv-longbench run` -----------------------------------------------


def prepare(request: RunRequest) -> Plan:
    """Every check (tasks, data files, method and options, also against the
    model's layer count, model folder, device, the output directory's
    configuration and permissions) and this rank's to-do list, before the
    model is loaded. Writes nothing. Problems raise UsageError."""
    with usage_errors():
        return _prepare(request)


def _prepare(request: RunRequest) -> Plan:
    settings = request.settings
    settings.check(longbench_e=request.longbench_e)
    tasks = resolve_tasks(request.tasks, request.longbench_e)
    data_dir = Path(request.data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"data directory {request.data_dir} not found")
    if not data_dir.is_dir():
        raise ValueError(f"data directory {request.data_dir} is a file; expected a folder holding <task>.jsonl files")
    files = {task: task_file(data_dir, task, request.longbench_e) for task in tasks}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"task file(s) not found: {', '.join(missing)}")
    check_int("--max-input-length", request.max_input_length, minimum=2)
    if request.limit is not None:
        check_int("--limit", request.limit, minimum=1)
    if request.device_map not in (None, "auto"):
        raise ValueError(f"--device-map takes 'auto', got {request.device_map!r}")
    if request.device_map and shard_info()[1] > 1:
        raise ValueError("--device-map auto spreads one model over all GPUs; it cannot be combined with data-parallel ranks")
    point = GridPoint.of(request.method, request.options)  # rejects unknown options and bad values

    def config(model: str, dtype: str) -> dict[str, Any]:
        return RunConfig(
            model=model, method=point.method, options=point.all_options, max_input_length=request.max_input_length,
            dtype=dtype, longbench_e=request.longbench_e, chat_template=settings.chat_template,
            attn_implementation=settings.attn_implementation,
        ).to_json()  # fmt: skip

    read = {task: read_task(files[task], task, request.limit) for task in tasks}
    result = plan(request.model, settings, [point], request.output_dir, LONGBENCH, config, tasks, name_points=False)
    result.report = report = {
        "rank": result.rank,
        "world_size": result.world,
        "label": RunConfig(**result.config).label(),
        "tasks": {},
        "samples_done": 0,
        "samples_done_now": 0,
        "skipped_lines": [],
        "skipped_line_count": 0,
        "finished": False,
    }
    for task in tasks:
        samples, bad = read[task]
        done = result.run_dir.completed(lambda record: str(record["_id"]), task)
        mine = [s for s in samples if s.index % result.world == result.rank]
        result.todo[task] = [s for s in mine if s.id not in done]
        report["tasks"][task] = {
            "file": str(files[task]),
            "samples": len(samples),
            "assigned": len(mine),
            "done_before": len(mine) - len(result.todo[task]),
            "done_now": 0,
            "done": len(mine) - len(result.todo[task]),
            "skipped_lines": [line.to_json() for line in bad],
            "seconds": 0.0,
        }
        report["skipped_lines"] += [line.to_json() for line in bad]
    report["skipped_line_count"] = len(report["skipped_lines"])
    return result


def _save_report(plan: Plan) -> None:
    report = plan.report
    report["samples_done"] = sum(t["done"] for t in report["tasks"].values())
    report["samples_done_now"] = sum(t["done_now"] for t in report["tasks"].values())
    plan.run_dir.write_report(report, plan.rank, plan.world)


def _pin(plan: Plan) -> None:
    """config.json, written once the run is sure to start (an existing one
    holds the same configuration: `plan` checked it)."""
    if not plan.run_dir.pin_path.exists():
        plan.run_dir.pin({"config": plan.config, "environment": environment()})


def run(request: RunRequest, *, after_sample: Optional[Callable[[str, dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Runs (or resumes) the predictions; returns this rank's report
    (also written to report.json, or report.rank{r}.json when sharded).

    `after_sample(task, record)` is called after each record is on disk."""
    import refreekv

    plan = prepare(request)
    report = plan.report
    if not any(plan.todo.values()):
        _pin(plan)
        report["finished"] = True
        _save_report(plan)
        return report

    # The model, patched once; each generate's prefill refreshes the stats.
    model, tokenizer = load(plan, request.device_map)
    (point,) = plan.points
    try:
        handle = refreekv.patch(model, point.instance)
    except (TypeError, ValueError) as error:
        # What only the loaded model shows (an unsupported architecture, the
        # bundled model's layer count); the run directory is still untouched.
        raise UsageError(f"cannot patch {plan.model} with {report['label']}: {error}") from None
    with handle:
        _pin(plan)
        try:
            _predict_tasks(plan, request, model, tokenizer, handle, after_sample)
            report["finished"] = True
        finally:
            _save_report(plan)
    return report


def _predict_tasks(
    plan: Plan, request: RunRequest, model, tokenizer, handle, after_sample: Optional[Callable[[str, dict[str, Any]], None]]
) -> None:
    """Predicts this rank's samples task by task, each record appended and
    fsynced as it comes, the report saved after each task."""
    from tqdm.auto import tqdm

    report = plan.report
    for task in plan.tasks:
        todo = plan.todo[task]
        entry = report["tasks"][task]
        if not todo:
            continue
        bar = tqdm(
            total=entry["assigned"],
            initial=entry["done_before"],
            desc=task if plan.world == 1 else f"{task} [rank {plan.rank}]",
            unit="sample",
            position=plan.rank if plan.world > 1 else None,
            disable=not plan.settings.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        with plan.run_dir.open_records(task, plan.rank) as out:
            try:
                for sample in todo:
                    record = predict(
                        model, tokenizer, handle, TASKS[task], sample, request.max_input_length, plan.settings.chat_template
                    )
                    write_record(out, record)
                    entry["done_now"] += 1
                    entry["done"] += 1
                    bar.update(1)
                    if after_sample is not None:
                        after_sample(task, record)
            finally:
                entry["seconds"] = round(entry["seconds"] + time.perf_counter() - start, 3)
                bar.close()
                _save_report(plan)
