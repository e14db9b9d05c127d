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

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from refreekv.eval.data import Sample, read_jsonl, read_samples, task_file
from refreekv.eval.prompting import build_input
from refreekv.eval.tasks import TASKS, Task, resolve_tasks

__all__ = [
    "BUNDLED_MODEL",
    "ConfigMismatch",
    "RunConfig",
    "RunRequest",
    "completed_ids",
    "UsageError",
    "parse_options",
    "predict",
    "prediction_files",
    "prepare",
    "run",
    "shard_info",
]

BUNDLED_MODEL = "bundled:smollm2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CONFIG_FILE = "config.json"


class UsageError(ValueError):
    """A request that cannot run: found before any work starts."""


class ConfigMismatch(UsageError):
    """The output directory holds a run made with another configuration."""


# -- options -------------------------------------------------------------------


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _parse_number(text: str) -> int | float:
    """Python literal rules: "512" is an int (a token count for budgets),
    "0.5" or "1e-3" a float."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _parse_tuple(text: str) -> tuple[int, ...]:
    stripped = text.strip().strip("()[]")
    if stripped.lower() in ("", "none"):
        return ()
    return tuple(int(part) for part in stripped.split(",") if part.strip())


def parse_options(method: str, items: list[str]) -> dict[str, Any]:
    """`key=value` strings to typed options, each value read by the type of
    the option's default in `refreekv.methods()` (bool: true/false; number:
    int if it is an integer literal, else float; tuple: comma-separated ints,
    "" or "none" for empty; str as is). Unknown methods or keys raise."""
    import refreekv

    methods = refreekv.methods()
    if method not in methods:
        raise UsageError(f"unknown method {method!r}; available: {', '.join(methods)}")
    defaults = methods[method]
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--option expects key=value, got {item!r}")
        if key not in defaults:
            raise UsageError(
                f"method {method!r} has no option {key!r}; its options: {', '.join(defaults) or 'none'}"
            )
        default = defaults[key]
        try:
            if isinstance(default, bool):
                options[key] = _parse_bool(value)
            elif isinstance(default, (int, float)):
                options[key] = _parse_number(value)
            elif isinstance(default, tuple):
                options[key] = _parse_tuple(value)
            else:
                options[key] = value
        except ValueError as error:
            raise UsageError(f"option {key}={value!r}: {error}") from None
    return options


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


# -- configuration -------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """Everything that changes the predictions. Tasks, the sample limit, the
    data directory, devices and sharding do not, so a run can be resumed
    with more tasks, a larger limit or another number of processes."""

    model: str
    method: str
    options: dict[str, Any]  # every option of the method, defaults included
    max_input_length: int
    dtype: str
    longbench_e: bool
    chat_template: bool
    attn_implementation: str

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def label(self) -> str:
        """The method with the options that differ from its defaults."""
        import refreekv

        defaults = {k: _jsonable(v) for k, v in refreekv.methods().get(self.method, {}).items()}
        changed = [f"{k}={_format_value(v)}" for k, v in self.options.items() if defaults.get(k) != v]
        return f"{self.method}({', '.join(changed)})" if changed else self.method


def _format_value(value: Any) -> str:
    if isinstance(value, list):
        return "(" + ",".join(map(str, value)) + ")"
    return str(value)


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a LongBench run directory (no {CONFIG_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """{"options": {"budget": 0.5}} -> {"options.budget": 0.5}, for messages."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def check_or_write_config(run_dir: Path, config: RunConfig, environment: dict[str, Any]) -> None:
    """Writes config.json into a new run directory, or checks that an
    existing one was made with the same configuration."""
    wanted = config.to_json()
    path = run_dir / CONFIG_FILE
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8")).get("config")
        except (json.JSONDecodeError, AttributeError) as error:
            raise ConfigMismatch(f"{path} is unreadable ({error}); use another --output-dir") from None
        if stored != wanted:
            there, now = _flatten(stored or {}), _flatten(wanted)
            lines = [
                f"  {key}: {json.dumps(there.get(key))} there, {json.dumps(now.get(key))} now"
                for key in sorted(set(there) | set(now))
                if there.get(key) != now.get(key)
            ]
            raise ConfigMismatch(
                f"{run_dir} holds a run made with a different configuration:\n"
                + "\n".join(lines)
                + "\nuse another --output-dir (or the same settings to resume it)"
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{CONFIG_FILE}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"config": wanted, "environment": environment}, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)  # atomic: ranks racing here write the same content


# -- prediction files ----------------------------------------------------------


def shard_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad RANK={rank} / WORLD_SIZE={world}")
    return rank, world, local


def prediction_files(run_dir: str | Path, task: str) -> list[Path]:
    return sorted((Path(run_dir) / task).glob("predictions.rank*.jsonl"))


def completed_ids(run_dir: str | Path, task: str) -> set[str]:
    """Ids with a complete record in any rank's file of `task` (a last line
    without its newline is not complete: the resumed run cuts and redoes it)."""
    done = set()
    for path in prediction_files(run_dir, task):
        for _, record, _ in read_jsonl(path, terminated_only=True):
            if record is not None and "_id" in record:
                done.add(str(record["_id"]))
    return done


def _repair_tail(path: Path) -> None:
    """Cuts a last line that a crash left without its newline."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data.endswith(b"\n"):
            return
        handle.truncate(data.rfind(b"\n") + 1)
        handle.flush()
        os.fsync(handle.fileno())


# -- the run -------------------------------------------------------------------


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


def _resolve_device(request: RunRequest, local_rank: int, world: int) -> str:
    device = request.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    return device


def _resolve_dtype(request: RunRequest) -> str:
    if request.dtype == "auto":
        return "bfloat16" if torch.cuda.is_available() and request.device != "cpu" else "float32"
    if request.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {request.dtype!r}; choose auto, {', '.join(DTYPES)}")
    return request.dtype


def _check_model(model: str) -> str:
    if model == BUNDLED_MODEL:
        return model
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {model} not found (give a local model folder or {BUNDLED_MODEL})")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model} has no config.json: not a transformers model folder")
    return str(path.resolve())


def load_model(model: str, dtype: str, device: str, device_map: Optional[str], attn_implementation: str):
    """(model, tokenizer) from a local folder, or the bundled SmolLM2."""
    torch_dtype = DTYPES[dtype]
    if model == BUNDLED_MODEL:
        from refreekv.assets import load_bundled_model

        loaded, tokenizer = load_bundled_model(dtype=torch_dtype, attn_implementation=attn_implementation)
        return loaded.to(device), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if device_map:
        kwargs["device_map"] = device_map
    loaded = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    if not device_map:
        loaded = loaded.to(device)
    return loaded.eval(), tokenizer


def _eos_ids(model, tokenizer, stop_at_newline: bool) -> list[int]:
    ids: list[int] = []
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    if stop_at_newline:
        newline = tokenizer.encode("\n", add_special_tokens=False)
        if newline and newline[-1] not in ids:
            ids.append(int(newline[-1]))
    return ids


@torch.no_grad()
def predict(model, tokenizer, handle, task: Task, sample: Sample, max_input_length: int, chat_template: bool) -> dict[str, Any]:
    """One sample's record: greedy generation with the task's length."""
    built = build_input(tokenizer, task, sample, max_input_length, chat_template)
    device = model.get_input_embeddings().weight.device
    input_ids = built.input_ids.to(device)
    eos = _eos_ids(model, tokenizer, task.stop_at_newline)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0] if eos else 0
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=task.max_new_tokens,
        # samsum: at least one token before a newline may stop it
        min_new_tokens=1 if task.stop_at_newline else 0,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    new_tokens = output[0, input_ids.shape[1] :]
    stats = handle.stats
    kept = stats.kept[:, 0].tolist()
    return {
        "_id": sample.id,
        "index": sample.index,
        "pred": tokenizer.decode(new_tokens, skip_special_tokens=True),
        "answers": sample.answers,
        "all_classes": sample.all_classes,
        "length": sample.length,
        "input_tokens": int(input_ids.shape[1]),
        "truncated": built.truncated,
        "chat_template": built.chat,
        "new_tokens": int(new_tokens.numel()),
        "budget": float(stats.per_sequence[0]),
        "kept_per_layer": [int(k) for k in kept],
    }


def _write_record(handle, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _environment() -> dict[str, Any]:
    import transformers

    import refreekv

    return {
        "refreekv": refreekv.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }


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
    local_rank: int


def prepare(request: RunRequest) -> _Plan:
    """Every check (tasks, data files, method and options, model folder, the
    output directory's configuration) and this rank's to-do list, before the
    model is loaded. Problems raise UsageError."""
    try:
        return _prepare(request)
    except UsageError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error


def _prepare(request: RunRequest) -> _Plan:
    import refreekv
    from refreekv.compression import make_method

    tasks = resolve_tasks(request.tasks, request.longbench_e)
    data_dir = Path(request.data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {request.data_dir} not found")
    files = {task: task_file(data_dir, task, request.longbench_e) for task in tasks}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"task file(s) not found: {', '.join(missing)}")
    if request.max_input_length < 2:
        raise ValueError(f"--max-input-length must be >= 2, got {request.max_input_length}")
    if request.limit is not None and request.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {request.limit}")
    if request.device_map not in (None, "auto"):
        raise ValueError(f"--device-map takes 'auto', got {request.device_map!r}")
    method_defaults = refreekv.methods().get(request.method)
    if method_defaults is None:
        raise ValueError(f"unknown method {request.method!r}; available: {', '.join(refreekv.methods())}")
    make_method(request.method, **request.options)  # rejects unknown options and bad values
    rank, world, local_rank = shard_info()
    if request.device_map and world > 1:
        raise ValueError("--device-map auto spreads one model over all GPUs; it cannot be combined with data-parallel ranks")
    config = RunConfig(
        model=_check_model(request.model),
        method=request.method,
        options={k: _jsonable(v) for k, v in {**method_defaults, **request.options}.items()},
        max_input_length=request.max_input_length,
        dtype=_resolve_dtype(request),
        longbench_e=request.longbench_e,
        chat_template=request.chat_template,
        attn_implementation=request.attn_implementation,
    )
    run_dir = Path(request.output_dir)
    check_or_write_config(run_dir, config, _environment())

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
        samples, bad = read_samples(files[task], request.limit)
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
    return _Plan(request, config, run_dir, tasks, todo, report, report_path, rank, world, local_rank)


def _save_report(plan: _Plan) -> None:
    report = plan.report
    report["samples_done"] = sum(t["done"] for t in report["tasks"].values())
    report["samples_done_now"] = sum(t["done_now"] for t in report["tasks"].values())
    temporary = plan.report_path.with_name(plan.report_path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, plan.report_path)


def run(request: RunRequest, *, after_sample: Optional[Callable[[str, dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Runs (or resumes) the predictions; returns this rank's report
    (also written to report.json, or report.rank{r}.json when sharded).

    `after_sample(task, record)` is called after each record is on disk."""
    import refreekv

    plan = prepare(request)
    report = plan.report
    if not any(plan.todo.values()):
        report["finished"] = True
        _save_report(plan)
        return report

    # The model, patched once; each generate's prefill refreshes the stats.
    device = _resolve_device(request, plan.local_rank, plan.world)
    if request.threads:
        torch.set_num_threads(request.threads)
    elif plan.world > 1 and device == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(plan.world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    model, tokenizer = load_model(
        plan.config.model, plan.config.dtype, device, request.device_map, request.attn_implementation
    )
    from tqdm.auto import tqdm

    try:
        with refreekv.patch(model, request.method, **request.options) as handle:
            for task in plan.tasks:
                todo = plan.todo[task]
                entry = report["tasks"][task]
                if not todo:
                    continue
                out_path = plan.run_dir / task / f"predictions.rank{plan.rank}.jsonl"
                out_path.parent.mkdir(parents=True, exist_ok=True)
                _repair_tail(out_path)
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
                            _write_record(out, record)
                            entry["done_now"] += 1
                            entry["done"] += 1
                            bar.update(1)
                            if after_sample is not None:
                                after_sample(task, record)
                    finally:
                        entry["seconds"] = round(entry["seconds"] + time.perf_counter() - start, 3)
                        bar.close()
                        _save_report(plan)
        report["finished"] = True
    finally:
        _save_report(plan)
    return report
