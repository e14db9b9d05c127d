"""The model an evaluation runs: which one, on which device, in which dtype,
and loading it. Plain values in and out, so `run` and a sweep that loads
one model for many configurations resolve them the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["BUNDLED_MODEL", "DTYPES", "check_model", "load_model", "resolve_device", "resolve_dtype"]

BUNDLED_MODEL = "bundled:smollm2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    takes the GPU of its local rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """"auto" is bfloat16 on a GPU and float32 on the CPU (`device` as
    requested, "auto" included)."""
    if dtype == "auto":
        return "bfloat16" if torch.cuda.is_available() and device != "cpu" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return dtype


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
