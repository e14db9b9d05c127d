"""`refreekv-longbench run`: predictions for LongBench tasks with a patched model.

Output directory layout:

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

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from refreekv.compression.checks import check_int
from refreekv.eval.config import RunConfig, check_config, check_output_dir, environment, write_config
from refreekv.eval.data import Sample, needs_classes, read_samples, task_file
from refreekv.eval.errors import ConfigMismatch, UsageError
from refreekv.eval.generation import predict
from refreekv.eval.models import (
    BUNDLED_MODEL, check_model, check_settings, layer_count, load_model, resolve_device, resolve_dtype,
)  # fmt: skip
from refreekv.eval.options import jsonable, method_defaults, parse_options
from refreekv.eval.records import completed_ids, repair_tail, shard_info, write_json_atomic, write_record
from refreekv.eval.tasks import TASKS, resolve_tasks

__all__ = [
    "RunRequest",
    "prepare",
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
    dtype: str = "auto"
    device: str = "auto"
    device_map: Optional[str] = None
    attn_implementation: str = "sdpa"
    chat_template: bool = True
    threads: Optional[int] = None
    progress: bool = True


@dataclass
class _Plan:
    """A checked request: what this rank does, and where."""

    request: RunRequest
    config: RunConfig
    run_dir: Path
    tasks: list[str]
    todo: dict[str, list[Sample]]
    report: dict[str, Any]
    report_path: Path
    rank: int
    world: int
    device: str


def prepare(request: RunRequest) -> _Plan:
    """Every check (tasks, data files, method and options, also against the
    model's layer count, model folder, device, the output directory's
    configuration and permissions) and this rank's to-do list, before the
    model is loaded. Writes nothing. Problems raise UsageError."""
    try:
        return _prepare(request)
    except UsageError:
        raise
    except (ValueError, TypeError, OSError) as error:  # OSError: a file or folder that cannot be read
        raise UsageError(str(error)) from error


def _prepare(request: RunRequest) -> _Plan:
    from refreekv.compression import make_method

    check_settings(
        request.attn_implementation, request.threads,
        longbench_e=request.longbench_e, chat_template=request.chat_template, progress=request.progress,
    )  # fmt: skip
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
    defaults = method_defaults(request.method)
    method = make_method(request.method, **request.options)  # rejects unknown options and bad values
    model = check_model(request.model)
    layers = layer_count(model)
    if layers is not None:
        method.check_model(layers)
    rank, world, local_rank = shard_info()
    if request.device_map and world > 1:
        raise ValueError("--device-map auto spreads one model over all GPUs; it cannot be combined with data-parallel ranks")
    device = resolve_device(request.device, local_rank, world)
    config = RunConfig(
        model=model,
        method=request.method,
        options={k: jsonable(v) for k, v in {**defaults, **request.options}.items()},
        max_input_length=request.max_input_length,
        dtype=resolve_dtype(request.dtype, request.device),
        longbench_e=request.longbench_e,
        chat_template=request.chat_template,
        attn_implementation=request.attn_implementation,
    )
    read = {task: read_samples(files[task], request.limit, needs_classes(TASKS[task])) for task in tasks}
    run_dir = Path(request.output_dir)
    check_output_dir(run_dir)
    check_config(run_dir, config)

    report: dict[str, Any] = {
        "rank": rank,
        "world_size": world,
        "label": config.label(),
        "tasks": {},
        "samples_done": 0,
        "samples_done_now": 0,
        "skipped_lines": [],
        "skipped_line_count": 0,
        "finished": False,
    }
    todo: dict[str, list[Sample]] = {}
    for task in tasks:
        samples, bad = read[task]
        for line in bad:
            print(f"warning: skipped {line}", file=sys.stderr)
        done = completed_ids(run_dir, task)
        mine = [s for s in samples if s.index % world == rank]
        todo[task] = [s for s in mine if s.id not in done]
        report["tasks"][task] = {
            "file": str(files[task]),
            "samples": len(samples),
            "assigned": len(mine),
            "done_before": len(mine) - len(todo[task]),
            "done_now": 0,
            "done": len(mine) - len(todo[task]),
            "skipped_lines": [line.to_json() for line in bad],
            "seconds": 0.0,
        }
        report["skipped_lines"] += [line.to_json() for line in bad]
    report["skipped_line_count"] = len(report["skipped_lines"])
    report_path = run_dir / ("report.json" if world == 1 else f"report.rank{rank}.json")
    return _Plan(request, config, run_dir, tasks, todo, report, report_path, rank, world, device)


def _save_report(plan: _Plan) -> None:
    report = plan.report
    report["samples_done"] = sum(t["done"] for t in report["tasks"].values())
    report["samples_done_now"] = sum(t["done_now"] for t in report["tasks"].values())
    write_json_atomic(plan.report_path, report)


def run(request: RunRequest, *, after_sample: Optional[Callable[[str, dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Runs (or resumes) the predictions; returns this rank's report
    (also written to report.json, or report.rank{r}.json when sharded).

    `after_sample(task, record)` is called after each record is on disk."""
    import refreekv

    plan = prepare(request)
    report = plan.report
    if not any(plan.todo.values()):
        write_config(plan.run_dir, plan.config, environment())
        report["finished"] = True
        _save_report(plan)
        return report

    # The model, patched once; each generate's prefill refreshes the stats.
    if request.threads is not None:
        torch.set_num_threads(request.threads)
    elif plan.world > 1 and plan.device == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(plan.world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    model, tokenizer = load_model(
        plan.config.model, plan.config.dtype, plan.device, request.device_map, request.attn_implementation
    )
    try:
        handle = refreekv.patch(model, request.method, **request.options)
    except (TypeError, ValueError) as error:
        # What only the loaded model shows (an unsupported architecture, the
        # bundled model's layer count); the run directory is still untouched.
        raise UsageError(f"cannot patch {plan.config.model} with {plan.config.label()}: {error}") from None
    with handle:
        write_config(plan.run_dir, plan.config, environment())
        try:
            _predict_tasks(plan, model, tokenizer, handle, after_sample)
            report["finished"] = True
        finally:
            _save_report(plan)
    return report


def _predict_tasks(
    plan: _Plan, model, tokenizer, handle, after_sample: Optional[Callable[[str, dict[str, Any]], None]]
) -> None:
    """Predicts this rank's samples task by task, each record appended and
    fsynced as it comes, the report saved after each task."""
    from tqdm.auto import tqdm

    request, report = plan.request, plan.report
    for task in plan.tasks:
        todo = plan.todo[task]
        entry = report["tasks"][task]
        if not todo:
            continue
        out_path = plan.run_dir / task / f"predictions.rank{plan.rank}.jsonl"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(out_path)
        bar = tqdm(
            total=entry["assigned"],
            initial=entry["done_before"],
            desc=task if plan.world == 1 else f"{task} [rank {plan.rank}]",
            unit="sample",
            position=plan.rank if plan.world > 1 else None,
            disable=not request.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        with open(out_path, "a", encoding="utf-8") as out:
            try:
                for sample in todo:
                    record = predict(
                        model, tokenizer, handle, TASKS[task], sample, request.max_input_length, request.chat_template
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
