"""A run's configuration (what makes its predictions what they are) and the
`config.json` that pins it to its output directory, so a resumed run or a
second process can never mix predictions of two configurations."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from refreekv.eval.errors import ConfigMismatch, UsageError
from refreekv.eval.options import method_label
from refreekv.eval.records import write_json_atomic

__all__ = [
    "CONFIG_FILE", "RunConfig", "check_config", "check_output_dir", "config_mismatch", "environment", "flatten_config",
    "read_config", "write_config",
]  # fmt: skip

CONFIG_FILE = "config.json"


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
        return method_label(self.method, self.options)


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a LongBench run directory (no {CONFIG_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def flatten_config(config: dict[str, Any]) -> dict[str, Any]:
    """{"options": {"budget": 0.5}} -> {"options.budget": 0.5}, for messages."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def check_output_dir(path: Path) -> None:
    """Raises UsageError unless `path` is a folder this process may write
    in, or one it may create. Checked, not created: a refused run leaves
    nothing behind."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path.absolute() else f"cannot be created: {existing} is a file"
        raise UsageError(f"--output-dir {path} {where}; expected a folder (existing or to be created)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir {path}: no permission to write in {existing}; expected a folder this user can write in")


def check_config(run_dir: Path, config: RunConfig) -> None:
    """Raises ConfigMismatch if `run_dir` holds a run made with another
    configuration (or an unreadable config.json)."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8")).get("config")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ConfigMismatch(f"{path} is unreadable ({error}); use another --output-dir") from None
    wanted = config.to_json()
    if stored != wanted:
        raise config_mismatch(run_dir, "a run", stored or {}, wanted)


def write_config(run_dir: Path, config: RunConfig, versions: dict[str, Any]) -> None:
    """Writes config.json (with `versions`, from `environment()`) into a run
    directory that has none, once the run is sure to start (`check_config`
    has passed: an existing one holds the same configuration)."""
    path = run_dir / CONFIG_FILE
    if path.exists():
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # atomic: ranks racing here write the same content
        write_json_atomic(path, {"config": config.to_json(), "environment": versions})
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None


def config_mismatch(directory: Path, what: str, stored: dict[str, Any], wanted: dict[str, Any]) -> ConfigMismatch:
    """The error for resuming `directory` with another configuration: every
    setting that differs, as stored there and as asked now."""
    there, now = flatten_config(stored), flatten_config(wanted)
    lines = [
        f"  {key}: {json.dumps(there.get(key))} there, {json.dumps(now.get(key))} now"
        for key in sorted(set(there) | set(now))
        if there.get(key) != now.get(key)
    ]
    return ConfigMismatch(
        f"{directory} holds {what} made with a different configuration:\n"
        + "\n".join(lines)
        + "\nuse another --output-dir (or the same settings to resume it)"
    )


def environment() -> dict[str, Any]:
    """The versions that made a run, stored beside its configuration (they
    may change the predictions slightly, but do not block a resume)."""
    import torch
    import transformers

    import refreekv

    return {
        "refreekv": refreekv.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }
