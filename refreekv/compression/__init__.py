"""Compression methods: ReFreeKV, Coverage and the fixed-budget baselines
(SPEC 2, 3; docs/coverage.md)."""

from __future__ import annotations

from typing import Any

from refreekv.compression.adakv import AdaKV
from refreekv.compression.base import CompressionMethod, KeepPlan, LayerInputs, PositionalMethod, ScoredMethod
from refreekv.compression.coverage import Coverage
from refreekv.compression.fullkv import FullKV
from refreekv.compression.h2o import H2O
from refreekv.compression.pyramidkv import PyramidKV
from refreekv.compression.refreekv import ReFreeKV
from refreekv.compression.snapkv import SnapKV
from refreekv.compression.streamingllm import StreamingLLM

__all__ = [
    "AdaKV",
    "CompressionMethod",
    "Coverage",
    "FullKV",
    "H2O",
    "KeepPlan",
    "LayerInputs",
    "PositionalMethod",
    "PyramidKV",
    "ReFreeKV",
    "ScoredMethod",
    "SnapKV",
    "StreamingLLM",
    "available_methods",
    "fixed_budget_methods",
    "make_method",
]


_METHODS: dict[str, type[CompressionMethod]] = {
    cls.name: cls for cls in (ReFreeKV, Coverage, FullKV, StreamingLLM, H2O, SnapKV, PyramidKV, AdaKV)
}


def available_methods() -> dict[str, dict[str, Any]]:
    """Every method's name with its options and their defaults."""
    return {name: cls.option_defaults() for name, cls in _METHODS.items()}


def fixed_budget_methods() -> tuple[str, ...]:
    """The methods that keep a fixed budget (and so take `max_cache_tokens`
    while decoding), in the order of `available_methods`."""
    return tuple(name for name, cls in _METHODS.items() if cls.fixed_budget)


def make_method(name: str, **options: Any) -> CompressionMethod:
    """Builds a method by name, rejecting unknown names and options."""
    if not isinstance(name, str):
        raise TypeError(
            f"method must be a name from refreekv.methods() or a CompressionMethod instance, "
            f"got {name!r} of type {type(name).__name__}"
        )
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(_METHODS)}")
    cls = _METHODS[name]
    known = cls.option_defaults()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(known) or 'none'}")
    return cls(**options)
