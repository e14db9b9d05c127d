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
per point, to measure the difference.

Resuming: a restarted sweep skips every (point, length, task, sample) with
a record; a last line cut short by a crash is removed first. Points,
lengths, tasks and samples may be added; what changes the records (model,
dtype, attention, chat template, suite seed, input cut, a point's options
under the same label) may not. The batch size may change: a sequence's
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from refreekv.compression.checks import check_int
from refreekv.eval.config import check_output_dir, config_mismatch, environment
from refreekv.eval.data import BadLine, Sample, needs_classes, read_jsonl, read_samples
from refreekv.eval.errors import ConfigMismatch, UsageError
from refreekv.eval.generation import eos_ids, pad_id, sample_record
from refreekv.eval.grid import GridPoint, load_grid
from refreekv.eval.models import check_model, check_settings, layer_count, load_model, resolve_device, resolve_dtype
from refreekv.eval.prompting import ModelInput, build_input
from refreekv.eval.records import repair_tail, write_json_atomic, write_record
from refreekv.eval.tasks import RULER_TASKS, TASKS, resolve_tasks

__all__ = ["SweepRequest", "read_records", "run_sweep"]

SWEEP_FILE = "sweep.json"
RECORDS_FILE = "records.jsonl"
RECORD_FIELDS = ("point", "method", "length", "task", "_id", "pred", "answers")
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
    dtype: str = "auto"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    chat_template: bool = True
    threads: Optional[int] = None
    progress: bool = True
    plain: bool = False


@dataclass
class _Plan:
    request: SweepRequest
    points: list[GridPoint]
    tasks: list[str]
    output_dir: Path
    config: dict[str, Any]


def _check(request: SweepRequest) -> _Plan:
    """Every check that needs no model: grid, tasks, lengths, data, output."""
    try:
        return _check_request(request)
    except (TypeError, ValueError) as error:  # UsageError included
        raise error if isinstance(error, UsageError) else UsageError(str(error)) from None


def _check_request(request: SweepRequest) -> _Plan:
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
    check_int("--samples", request.samples, minimum=1)
    check_int("--batch-size", request.batch_size, minimum=1)
    if request.max_input_length is not None:
        check_int("--max-input-length", request.max_input_length, minimum=2)
    check_settings(
        request.attn_implementation, request.threads,
        chat_template=request.chat_template, progress=request.progress, plain=request.plain,
    )  # fmt: skip
    resolve_device(request.device, 0, 1)
    if request.data_dir is not None:
        for length in request.lengths:
            for task in tasks:
                path = Path(request.data_dir) / str(length) / f"{task}.jsonl"
                if not path.is_file():
                    raise UsageError(f"task file {path} not found (--data-dir holds <length>/<task>.jsonl)")
    try:
        model = check_model(request.model)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    layers = layer_count(model)
    if layers is not None:
        _check_layers(points, layers)
    dtype = resolve_dtype(request.dtype, request.device)
    config = {
        "model": model,
        "dtype": dtype,
        "attn_implementation": request.attn_implementation,
        "chat_template": request.chat_template,
        "max_input_length": request.max_input_length,
        "suite": request.suite,
        "seed": request.seed if request.suite else None,
        "data_dir": None if request.data_dir is None else str(Path(request.data_dir).resolve()),
    }
    output_dir = Path(request.output_dir)
    check_output_dir(output_dir)
    _check_stored_config(output_dir, config, points)
    return _Plan(request, points, tasks, output_dir, config)


def _check_layers(points: list[GridPoint], layers: int) -> None:
    """Refuses grid points whose options name layers the model lacks."""
    for point in points:
        try:
            point.make().check_model(layers)
        except ValueError as error:
            raise UsageError(f"grid point {point.label}: {error}") from None


def _check_stored_config(output_dir: Path, config: dict[str, Any], points: list[GridPoint]) -> None:
    path = output_dir / SWEEP_FILE
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        stored_config, stored_points = stored["config"], stored["points"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConfigMismatch(f"{path} is unreadable ({error}); use another --output-dir") from None
    if stored_config != config:
        raise config_mismatch(output_dir, "a sweep", stored_config, config)
    # Records are keyed by label; a label must keep meaning the same options
    # (a method default that changed between versions would otherwise pass).
    before = {p["label"]: p for p in stored_points}
    for point in points:
        if point.label in before and before[point.label]["options"] != point.all_options:
            raise config_mismatch(
                output_dir, f"the point {point.label}", {"options": before[point.label]["options"]}, {"options": point.all_options}
            )


def _write_sweep_file(plan: _Plan) -> None:
    """sweep.json: the configuration, and the points, lengths and tasks of
    every session so far (a resumed sweep may add some)."""
    path = plan.output_dir / SWEEP_FILE
    previous = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    points = {p["label"]: p for p in previous.get("points", [])}
    points.update({p.label: p.to_json() for p in plan.points})
    request = plan.request
    document = {
        "config": plan.config,
        "points": list(points.values()),
        "lengths": sorted(set(previous.get("lengths", [])) | set(request.lengths)),
        "tasks": list(dict.fromkeys(previous.get("tasks", []) + plan.tasks)),
        "samples": max(previous.get("samples", 0), request.samples),
        "seed": request.seed,
        "model": plan.config["model"],
        "environment": {**environment(), "machine": _machine()},
    }
    write_json_atomic(path, document)


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


def read_records(output_dir: str | Path) -> tuple[list[dict[str, Any]], list[BadLine]]:
    """(the complete records of a sweep, its malformed lines). A last line
    still being written, or cut short by a crash, is neither."""
    path = Path(output_dir) / RECORDS_FILE
    records: list[dict[str, Any]] = []
    bad: list[BadLine] = []
    if not path.exists():
        return records, bad
    for number, record, problem in read_jsonl(path, terminated_only=True):
        missing = [name for name in RECORD_FIELDS if problem is None and name not in record]
        if missing:
            problem = BadLine(str(path), number, f"not a sweep record (missing {', '.join(missing)})")
        if problem is None:
            records.append(record)
        else:
            bad.append(problem)
    return records, bad


def _record_key(point: str, length: int, task: str, sample_id: str) -> tuple[str, int, str, str]:
    return point, int(length), task, str(sample_id)


def _task_files(plan: _Plan) -> dict[tuple[int, str], Path]:
    """Every (length, task) file of the sweep; a generated suite is written
    first, counted in the tokens of the model's tokenizer."""
    request = plan.request
    if request.data_dir is not None:
        root = Path(request.data_dir)
        return {(n, t): root / str(n) / f"{t}.jsonl" for n in request.lengths for t in plan.tasks}
    from refreekv.eval.ruler import generate_suite, load_tokenizer

    tokenizer = load_tokenizer(plan.config["model"])
    try:
        return generate_suite(
            plan.output_dir / "data", tokenizer, request.lengths, request.samples, seed=request.seed, tasks=tuple(plan.tasks)
        )
    except ValueError as error:  # e.g. a length too short for a task's instructions
        raise UsageError(f"cannot generate the {request.suite} suite: {error}") from None


def _load_samples(path: Path, task: str, limit: int) -> list[Sample]:
    """The first `limit` samples of a task file; a file without a single
    valid sample is an error (its cells would silently be missing)."""
    try:
        samples, bad = read_samples(path, limit, classes_required=needs_classes(TASKS[task]))
    except ValueError as error:
        raise UsageError(str(error)) from None
    for line in bad:
        print(f"warning: skipped {line}", file=sys.stderr)
    if not samples:
        raise UsageError(f"{path} has no valid sample ({len(bad)} malformed line(s)); expected up to {limit}")
    if len(samples) < limit:
        print(f"warning: {path} has {len(samples)} valid sample(s), fewer than the {limit} asked for", file=sys.stderr)
    return samples


def _left_pad(inputs: list[ModelInput], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(item.input_ids.shape[1] for item in inputs)
    input_ids = torch.full((len(inputs), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(inputs), longest, dtype=torch.long)
    for row, item in enumerate(inputs):
        n = item.input_ids.shape[1]
        input_ids[row, longest - n :] = item.input_ids[0]
        attention_mask[row, longest - n :] = 1
    return input_ids.to(device), attention_mask.to(device)


@dataclass(frozen=True)
class _DecodeSettings:
    """How a task's answers are generated; tasks that share them share batches."""

    max_new_tokens: int
    eos: tuple[int, ...]
    pad: int
    min_new_tokens: int

    @property
    def options(self) -> dict[str, Any]:
        return {"eos_token_id": list(self.eos), "pad_token_id": self.pad, "min_new_tokens": self.min_new_tokens}


def _decode_groups(work: dict[tuple[int, str], list[Sample]], model, tokenizer):
    """(length, settings, [(task, sample), ...]) per context length and
    decode settings, tasks in sweep order. Batching across the tasks of a
    group (the needle tasks share theirs) reads the model's weights once per
    decoding step for more sequences, which is most of a step's cost on a
    CPU; a sequence's tokens do not depend on its batch (SPEC 5)."""
    groups: dict[tuple[int, _DecodeSettings], list[tuple[str, Sample]]] = {}
    for (length, task_name), samples in work.items():
        task = TASKS[task_name]
        eos = eos_ids(model, tokenizer, task.stop_at_newline)
        settings = _DecodeSettings(task.max_new_tokens, tuple(eos), pad_id(tokenizer, eos), 1 if task.stop_at_newline else 0)
        groups.setdefault((length, settings), []).extend((task_name, s) for s in samples)
    return [(length, settings, items) for (length, settings), items in groups.items()]


def _until_end(tokens: torch.Tensor, eos: list[int]) -> list[int]:
    """A row's generated tokens up to and including its first end token
    (what a batch-of-one `generate` returns for it)."""
    row = tokens.tolist()
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


class _Decoder:
    """Decodes every grid point for one batch: branched from one prefill,
    or (plain) one patched `generate` per point."""

    def __init__(self, model, plain: bool):
        self.model = model
        self.plain = plain

    def points(self, points: list[GridPoint], input_ids, attention_mask, max_new_tokens: int, options: dict[str, Any]):
        """Yields (point, tokens [b, <= max_new_tokens], stats) per point."""
        import refreekv
        from refreekv.integration.branch import prefill

        if self.plain:
            for point in points:
                with refreekv.patch(self.model, point.make()) as handle:
                    output = self.model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                        do_sample=False, num_beams=1, **options,
                    )  # fmt: skip
                yield point, output[:, input_ids.shape[1] :], handle.stats
            return
        prefilled = prefill(self.model, input_ids, attention_mask, **options)
        for point in points:
            method = point.make()
            cache, stats = prefilled.branch(method)
            with refreekv.patch(self.model, method):
                tokens = prefilled.generate(cache, max_new_tokens)
            yield point, tokens, stats
            del cache


def run_sweep(
    request: SweepRequest, *, after_record: Optional[Callable[[dict[str, Any]], None]] = None
) -> dict[str, Any]:
    """Runs (or resumes) a sweep; writes the report; returns report.json's
    content. `after_record(record)` is called after each record is on disk."""
    plan = _check(request)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    work = {key: _load_samples(path, key[1], request.samples) for key, path in _task_files(plan).items()}
    device = resolve_device(request.device, 0, 1)
    if request.threads:
        torch.set_num_threads(request.threads)
    model, tokenizer = load_model(plan.config["model"], plan.config["dtype"], device, None, request.attn_implementation)
    _check_layers(plan.points, model.config.num_hidden_layers)  # the bundled model's count is known only now
    _write_sweep_file(plan)

    records_path = plan.output_dir / RECORDS_FILE
    repair_tail(records_path)
    records, bad = read_records(plan.output_dir)
    for line in bad:
        print(f"warning: {line} (it will be redone if it was a record)", file=sys.stderr)
    done = {_record_key(r["point"], r["length"], r["task"], r["_id"]) for r in records}
    total = sum(len(samples) for samples in work.values()) * len(plan.points)
    todo = sum(
        1
        for (length, task), samples in work.items()
        for s in samples
        for p in plan.points
        if _record_key(p.label, length, task, s.id) not in done
    )
    report = {
        "sample_points": total,
        "done_before": total - todo,
        "done_now": 0,
        "plain": request.plain,
        "batch_size": request.batch_size,
        "seconds": 0.0,
        "finished": False,
    }
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=total - todo, unit="point", desc="sweep", disable=not request.progress,
               file=sys.stderr, dynamic_ncols=True)  # fmt: skip
    decoder = _Decoder(model, request.plain)
    start = time.perf_counter()
    try:
        with open(records_path, "a", encoding="utf-8") as out, torch.no_grad():
            for length, settings, items in _decode_groups(work, model, tokenizer):
                pending = [(t, s) for t, s in items if any(_record_key(p.label, length, t, s.id) not in done for p in plan.points)]
                for first in range(0, len(pending), request.batch_size):
                    batch = pending[first : first + request.batch_size]
                    inputs = [
                        build_input(tokenizer, TASKS[t], s, request.max_input_length or sys.maxsize, request.chat_template)
                        for t, s in batch
                    ]
                    input_ids, attention_mask = _left_pad(inputs, settings.pad, device)
                    missing = [
                        p for p in plan.points
                        if any(_record_key(p.label, length, t, s.id) not in done for t, s in batch)
                    ]  # fmt: skip
                    decoded = decoder.points(missing, input_ids, attention_mask, settings.max_new_tokens, settings.options)
                    for point, tokens, stats in decoded:
                        for row, (task_name, sample) in enumerate(batch):
                            key = _record_key(point.label, length, task_name, sample.id)
                            if key in done:
                                continue
                            new_tokens = _until_end(tokens[row], settings.eos)
                            record = {
                                **sample_record(sample, inputs[row], new_tokens, tokenizer, stats, row),
                                # the suite's length in tokens, not the sample's words
                                "length": int(length),
                                "point": point.label,
                                "method": point.method,
                                "options": point.all_options,
                                "task": task_name,
                            }
                            write_record(out, record)
                            done.add(key)
                            report["done_now"] += 1
                            bar.update(1)
                            if after_record is not None:
                                after_record(record)
        report["finished"] = True
    finally:
        bar.close()
        report["seconds"] = round(time.perf_counter() - start, 3)
        report["sample_points_per_second"] = round(report["done_now"] / report["seconds"], 4) if report["seconds"] else None
        write_json_atomic(plan.output_dir / "report.json", report)
    write_sweep_report(plan.output_dir)
    return report


def write_sweep_report(output_dir: str | Path) -> list[Path]:
    """The tables and pictures of a sweep directory, written into it."""
    from refreekv.eval.quality import summarize, write_report

    output_dir = Path(output_dir)
    sweep = json.loads((output_dir / SWEEP_FILE).read_text(encoding="utf-8"))
    return write_report(summarize(read_records(output_dir)[0], sweep["points"]), output_dir)
