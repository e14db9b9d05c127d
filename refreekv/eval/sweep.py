"""`refreekv-longbench sweep`: methods x settings x tasks x context lengths,
resumable, with one prefill per sample for the whole grid.

    refreekv-longbench sweep --model bundled:smollm2 --suite ruler \\
        --lengths 1024,2048 --grid sweeps/default.toml --output-dir runs/sweep

Output directory:

    sweep.json        what makes the records what they are, the request, versions
    data/<length>/<task>.jsonl   the generated suite (with --suite)
    records.jsonl     one record per (point, length, task, sample), appended and fsynced
    report.json       progress and throughput of the last session
    quality.{md,csv,json}, *.png  the report (also: `refreekv-longbench compare DIR`)

How it runs: samples are batched (left-padded), across the tasks that
generate alike (same answer length and end tokens); each batch is
prefilled once (`refreekv.integration.branch`), every grid point branches
that prefill into its own compressed cache and decodes from it. A branched
point gives exactly the tokens and kept counts of a plain `refreekv.patch`
run (tests prove it), and `plain=True` runs that way instead, one prefill
per point, to measure the difference. Points in the question-after or
streaming prefill modes (the grid's `prefill` key, refreekv.eval.prefill)
always run plainly, one patched call per point and group of sequences
(`Decoder.mode_point`); a question-after point needs every task's prompt
split where its context ends (refreekv.eval.prompting.split_input), so a
task whose question comes before its context is refused before the model
loads.

Resuming: a restarted sweep skips every (point, length, task, sample) with
a record; a last line cut short by a crash is removed first. Points,
lengths, tasks and samples may be added; what changes the records (model,
dtype, attention, chat template, suite seed, input cut, a point's options
under the same label) may not, nor may a recorded point come back under
another label. The batch size may change: a sequence's
tokens do not depend on its batch (SPEC 5). The suite is regenerated from
its seed with the model's tokenizer, so a resumed sweep should run with the
same transformers version (sweep.json records the versions).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from refreekv.compression.checks import check_int
from refreekv.eval.data import Sample
from refreekv.eval.errors import UsageError, usage_errors
from refreekv.eval.generation import Decoder, decode_groups, left_pad, sample_record, until_end
from refreekv.eval.grid import GridPoint, load_grid
from refreekv.eval.models import ModelSettings
from refreekv.eval.prefill import ONE_FORWARD, PREFILL_KEY, QUESTION_AFTER
from refreekv.eval.prompting import build_input, split_input, split_refusal
from refreekv.eval.rundir import SWEEP, SWEEP_FILE, environment, read_records, write_record
from refreekv.eval.runner import Plan, check_layers, load, plan, read_task
from refreekv.eval.tasks import RULER_TASKS, TASKS, resolve_tasks

__all__ = ["SweepRequest", "run_sweep", "write_sweep_report"]

SUITES = ("ruler",)


@dataclass
class SweepRequest:
    """A sweep. `suite="ruler"` generates the suite into the output
    directory; `data_dir` reads `<data_dir>/<length>/<task>.jsonl` instead
    (e.g. written by `python -m refreekv.eval.ruler`)."""

    model: str
    output_dir: str
    grid: str | list[GridPoint]
    lengths: list[int]
    suite: Optional[str] = None
    data_dir: Optional[str] = None
    tasks: Optional[list[str]] = None  # None: every task of the suite
    samples: int = 10  # per task and length
    seed: int = 0
    batch_size: int = 8
    max_input_length: Optional[int] = None  # None: never cut the input
    plain: bool = False
    settings: ModelSettings = field(default_factory=ModelSettings)


def _check(request: SweepRequest) -> Plan:
    """Every check that needs no model: grid, tasks, lengths, data, output."""
    with usage_errors():
        return _check_request(request)


def _check_request(request: SweepRequest) -> Plan:
    points = load_grid(request.grid) if isinstance(request.grid, (str, Path)) else list(request.grid)
    if not points:
        raise UsageError("the grid names no point")
    if not request.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 16 for n in request.lengths):
        raise UsageError(f"--lengths takes context lengths in tokens, each >= 16; got {request.lengths}")
    if len(set(request.lengths)) != len(request.lengths):
        raise UsageError(f"--lengths names a length twice: {request.lengths}")
    if (request.suite is None) == (request.data_dir is None):
        raise UsageError("give either --suite (generated) or --data-dir (<dir>/<length>/<task>.jsonl), not both or neither")
    if request.suite is not None and request.suite not in SUITES:
        raise UsageError(f"unknown suite {request.suite!r}; available: {', '.join(SUITES)}")
    tasks = list(RULER_TASKS) if request.tasks is None else resolve_tasks(request.tasks)
    if not tasks:
        raise UsageError("the sweep has no task")
    if request.suite == "ruler":
        foreign = [t for t in tasks if t not in RULER_TASKS]
        if foreign:
            raise UsageError(f"task(s) {', '.join(foreign)} are not in the ruler suite ({', '.join(RULER_TASKS)})")
    asking_after = [p.label for p in points if p.prefill.kind == QUESTION_AFTER]
    unsplit = {t: split_refusal(TASKS[t]) for t in tasks if asking_after and split_refusal(TASKS[t])}
    if unsplit:
        raise UsageError(
            f"the question-after point(s) {', '.join(asking_after)} need each prompt split where its context ends; "
            + "; ".join(f"task {t} cannot be: {why}" for t, why in unsplit.items())
        )
    check_int("--samples", request.samples, minimum=1)
    check_int("--batch-size", request.batch_size, minimum=1)
    if request.max_input_length is not None:
        check_int("--max-input-length", request.max_input_length, minimum=2)
    settings = request.settings
    settings.check(plain=request.plain)
    if request.data_dir is not None:
        for length in request.lengths:
            for task in tasks:
                path = Path(request.data_dir) / str(length) / f"{task}.jsonl"
                if not path.is_file():
                    raise UsageError(f"task file {path} not found (--data-dir holds <length>/<task>.jsonl)")

    def config(model: str, dtype: str) -> dict[str, Any]:
        return {
            "model": model,
            "dtype": dtype,
            "attn_implementation": settings.attn_implementation,
            "chat_template": settings.chat_template,
            "max_input_length": request.max_input_length,
            "suite": request.suite,
            "seed": request.seed if request.suite else None,
            "data_dir": None if request.data_dir is None else str(Path(request.data_dir).resolve()),
        }

    checked = plan(
        request.model, settings, points, request.output_dir, SWEEP, config, tasks, pin_keys=("config", "points"), sharded=False
    )
    # Records are keyed by label; a label must keep meaning the same options
    # (a method default that changed between versions would otherwise pass).
    before = {p["label"]: p for p in (checked.pinned or {}).get("points", [])}
    for point in points:
        if point.label in before and before[point.label]["options"] != point.all_options:
            raise checked.run_dir.mismatch(
                f"the point {point.label}", {"options": before[point.label]["options"]}, {"options": point.all_options}
            )
    # ...and a recorded point renamed in the grid (an option spelled out that
    # was the default) would run again, beside its records, under the new label.
    def identity(point: dict[str, Any]) -> str:
        return json.dumps([point["method"], point["options"], point.get(PREFILL_KEY, ONE_FORWARD)], sort_keys=True)

    recorded = {identity(p): label for label, p in before.items()}
    for point in points:
        twin = recorded.get(identity(point.to_json()))
        if point.label not in before and twin is not None:
            raise UsageError(
                f"{checked.run_dir.path} holds the point {twin} with the options of the point {point.label}: "
                "records are keyed by label, so it would run again beside them; write the grid so that its label "
                f"is {twin!r}, or relabel the point in sweep.json and records.jsonl (its options are recorded in full), "
                "or use another --output-dir"
            )
    return checked


def _write_sweep_file(plan: Plan, request: SweepRequest) -> None:
    """sweep.json: the configuration, and the points, lengths and tasks of
    every session so far (a resumed sweep may add some)."""
    previous = plan.run_dir.pinned() or {}
    points = {p["label"]: p for p in previous.get("points", [])}
    points.update({p.label: p.to_json() for p in plan.points})
    document = {
        "config": plan.config,
        "points": list(points.values()),
        "lengths": sorted(set(previous.get("lengths", [])) | set(request.lengths)),
        "tasks": list(dict.fromkeys(previous.get("tasks", []) + plan.tasks)),
        "samples": max(previous.get("samples", 0), request.samples),
        "seed": request.seed,
        "model": plan.model,
        "environment": {**environment(), "machine": _machine()},
    }
    plan.run_dir.pin(document)


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def _record_key(point: str, length: int, task: str, sample_id: str) -> tuple[str, int, str, str]:
    return point, int(length), task, str(sample_id)


def _task_files(plan: Plan, request: SweepRequest) -> dict[tuple[int, str], Path]:
    """Every (length, task) file of the sweep; a generated suite is written
    first, counted in the tokens of the model's tokenizer."""
    if request.data_dir is not None:
        root = Path(request.data_dir)
        return {(n, t): root / str(n) / f"{t}.jsonl" for n in request.lengths for t in plan.tasks}
    from refreekv.eval.ruler import generate_suite, load_tokenizer

    tokenizer = load_tokenizer(plan.model)
    try:
        return generate_suite(
            plan.run_dir.path / "data", tokenizer, request.lengths, request.samples, seed=request.seed, tasks=tuple(plan.tasks)
        )
    except ValueError as error:  # e.g. a length too short for a task's instructions
        raise UsageError(f"cannot generate the {request.suite} suite: {error}") from None


def _load_samples(path: Path, task: str, limit: int) -> list[Sample]:
    """The first `limit` samples of a task file; a file without a single
    valid sample is an error (its cells would silently be missing)."""
    try:
        samples, bad = read_task(path, task, limit)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not samples:
        raise UsageError(f"{path} has no valid sample ({len(bad)} malformed line(s)); expected up to {limit}")
    if len(samples) < limit:
        print(f"warning: {path} has {len(samples)} valid sample(s), fewer than the {limit} asked for", file=sys.stderr)
    return samples


def run_sweep(
    request: SweepRequest, *, after_record: Optional[Callable[[dict[str, Any]], None]] = None
) -> dict[str, Any]:
    """Runs (or resumes) a sweep; writes the report; returns report.json's
    content. `after_record(record)` is called after each record is on disk."""
    plan = _check(request)
    plan.run_dir.path.mkdir(parents=True, exist_ok=True)
    files = _task_files(plan, request)
    plan.todo = work = {key: _load_samples(path, key[1], request.samples) for key, path in files.items()}
    model, tokenizer = load(plan)
    check_layers(plan.points, model.config.num_hidden_layers)  # the bundled model's count is known only now
    _write_sweep_file(plan, request)

    done = plan.run_dir.completed(lambda r: _record_key(r["point"], r["length"], r["task"], r["_id"]))
    total = sum(len(samples) for samples in work.values()) * len(plan.points)
    todo = sum(
        1
        for (length, task), samples in work.items()
        for s in samples
        for p in plan.points
        if _record_key(p.label, length, task, s.id) not in done
    )
    plan.report = report = {
        "sample_points": total,
        "done_before": total - todo,
        "done_now": 0,
        "plain": request.plain,
        "batch_size": request.batch_size,
        "seconds": 0.0,
        "finished": False,
    }
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=total - todo, unit="point", desc="sweep", disable=not plan.settings.progress,
               file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    decoder = Decoder(model, request.plain)
    start = time.perf_counter()
    try:
        with plan.run_dir.open_records() as out, torch.no_grad():
            for length, settings, items in decode_groups(work, model, tokenizer):
                pending = [(t, s) for t, s in items if any(_record_key(p.label, length, t, s.id) not in done for p in plan.points)]
                for first in range(0, len(pending), request.batch_size):
                    batch = pending[first : first + request.batch_size]
                    missing = [
                        p for p in plan.points
                        if any(_record_key(p.label, length, t, s.id) not in done for t, s in batch)
                    ]  # fmt: skip
                    max_length = request.max_input_length or sys.maxsize
                    chat = plan.settings.chat_template
                    if any(p.prefill.kind == QUESTION_AFTER for p in missing):
                        try:
                            split = [split_input(tokenizer, TASKS[t], s, max_length, chat) for t, s in batch]
                        except ValueError as error:
                            raise UsageError(f"a question-after point cannot run: {error}") from None
                        inputs = [item.built for item in split]
                    else:
                        split, inputs = None, [build_input(tokenizer, TASKS[t], s, max_length, chat) for t, s in batch]

                    def write(point: GridPoint, row: int, tokens, stats, stats_row: int) -> None:
                        task_name, sample = batch[row]
                        key = _record_key(point.label, length, task_name, sample.id)
                        if key in done:
                            return
                        new_tokens = until_end(tokens, settings.eos)
                        record = {
                            **sample_record(sample, inputs[row], new_tokens, tokenizer, stats, stats_row),
                            # the suite's length in tokens, not the sample's words
                            "length": int(length),
                            "point": point.label,
                            "method": point.method,
                            "options": point.all_options,
                            PREFILL_KEY: point.prefill.name,
                            "task": task_name,
                        }
                        write_record(out, record)
                        done.add(key)
                        report["done_now"] += 1
                        bar.update(1)
                        if after_record is not None:
                            after_record(record)

                    one_forward = [p for p in missing if p.prefill.one_forward]
                    if one_forward:
                        input_ids, attention_mask = left_pad(inputs, settings.pad, plan.device)
                        for point, tokens, stats in decoder.points(one_forward, input_ids, attention_mask, settings):
                            for row in range(len(batch)):
                                write(point, row, tokens[row], stats, row)
                    for point in (p for p in missing if not p.prefill.one_forward):
                        # Only the sequences this point still lacks.
                        rows = [r for r, (t, s) in enumerate(batch) if _record_key(point.label, length, t, s.id) not in done]
                        items = [(split or inputs)[r] for r in rows]
                        for row, (tokens, kept) in zip(rows, decoder.mode_point(point, items, settings, plan.device)):
                            write(point, row, tokens, kept, 0)
        report["finished"] = True
    finally:
        bar.close()
        report["seconds"] = round(time.perf_counter() - start, 3)
        report["sample_points_per_second"] = round(report["done_now"] / report["seconds"], 4) if report["seconds"] else None
        plan.run_dir.write_report(report)
    write_sweep_report(plan.run_dir.path)
    return report


def write_sweep_report(output_dir: str | Path) -> list[Path]:
    """The tables and pictures of a sweep directory, written into it."""
    from refreekv.eval.report import summarize, write_quality_report

    output_dir = Path(output_dir)
    sweep = json.loads((output_dir / SWEEP_FILE).read_text(encoding="utf-8"))
    return write_quality_report(summarize(read_records(output_dir)[0], sweep["points"]), output_dir)
