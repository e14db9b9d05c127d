"""The model an evaluation runs: which one, on which device, in which dtype,
how (`ModelSettings`, the settings `run` and `sweep` share), and loading it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from refreekv.compression.checks import check_bool, check_choice, check_int

__all__ = [
    "ATTENTION", "BUNDLED_MODEL", "DTYPES", "ModelSettings", "check_model", "layer_count", "load_model", "resolve_device",
    "resolve_dtype",
]  # fmt: skip

BUNDLED_MODEL = "bundled:smollm2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ATTENTION = ("sdpa", "eager")


def check_model(model: str) -> str:
    """The model as a run's configuration records it: the bundled name, or
    the absolute path of a local transformers folder (checked to be one)."""
    if model == BUNDLED_MODEL:
        return model
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {model} not found (give a local model folder or {BUNDLED_MODEL})")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model} has no config.json: not a transformers model folder")
    return str(path.resolve())


def resolve_device(device: str, local_rank: int, world: int) -> str:
    """"auto" is cuda when a GPU is there, else cpu; with several ranks each
    takes the GPU of its local rank. A device this torch cannot use (a typo,
    cuda on a CPU-only build, a GPU index past the last) is a ValueError,
    found before the model loads."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:N, auto): {error}") from None
    if parsed.type == "cpu":
        return device
    backend = getattr(torch, parsed.type, None)
    if not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"--device {device}: no {parsed.type} device is available to this torch ({torch.__version__}); use cpu")
    if parsed.index is not None and parsed.index >= backend.device_count():
        raise ValueError(f"--device {device}: this machine has {backend.device_count()} {parsed.type} device(s), numbered from 0")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """"auto" is bfloat16 on a GPU and float32 on the CPU (`device` as
    requested, "auto" included)."""
    if dtype == "auto":
        return "bfloat16" if torch.cuda.is_available() and device != "cpu" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return dtype


@dataclass(frozen=True)
class ModelSettings:
    """How the model runs, the same for `run` and `sweep` (the CLI's
    --dtype, --device, --attn-implementation, --no-chat-template, --threads
    and --no-progress)."""

    dtype: str = "auto"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    chat_template: bool = True
    threads: Optional[int] = None
    progress: bool = True

    def check(self, **switches: Any) -> None:
        """The attention, the thread count, and the on/off settings with the
        caller's own `switches` (plain=..., longbench_e=...), which must be
        booleans: a truthy "no" would turn them on."""
        check_choice("--attn-implementation", self.attn_implementation, ATTENTION)
        if self.threads is not None:
            check_int("--threads", self.threads, minimum=1)
        for name, value in {"chat_template": self.chat_template, **switches, "progress": self.progress}.items():
            check_bool(name, value)

    def set_threads(self, device: str, world: int) -> None:
        """torch's CPU threads: --threads, else (several ranks on the CPU)
        the cores split between the ranks of this machine."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        elif world > 1 and device == "cpu":
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def layer_count(model: str) -> Optional[int]:
    """The decoder layers of a local model folder, read from its config.json
    (no weights loaded), so options that name layers are checked first.
    None for the bundled model: its configuration is inside the GGUF
    weights file, and reading it there takes seconds, most of a load."""
    if model == BUNDLED_MODEL:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the configuration of model {model}: {error}") from None
    return config.get_text_config().num_hidden_layers


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
