"""Compression methods: ReFreeKV, Coverage and the fixed-budget baselines
(SPEC 2, 3; docs/coverage.md)."""

from __future__ import annotations

from typing import Any

from refreekv.compression.base import CompressionMethod, KeepPlan, LayerInputs, PositionalMethod, ScoredMethod
from refreekv.compression.coverage import Coverage
from refreekv.compression.positional import ReFreeKV, StreamingLLM
from refreekv.compression.scored import H2O, PyramidKV, SnapKV

__all__ = [
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
    "make_method",
]


class FullKV(CompressionMethod):
    """No compression: the reference every other method is compared with."""

    name = "fullkv"

    def __init__(self):
        super().__init__(protected_layers=())

    def plan(self, inputs: LayerInputs) -> None:
        return None

    def recompression_refusal(self) -> str:
        return "fullkv never cuts, so re-cutting while decoding would only add work"


_METHODS: dict[str, type[CompressionMethod]] = {
    cls.name: cls for cls in (ReFreeKV, Coverage, FullKV, StreamingLLM, H2O, SnapKV, PyramidKV)
}


def available_methods() -> dict[str, dict[str, Any]]:
    """Every method's name with its options and their defaults."""
    return {name: cls.option_defaults() for name, cls in _METHODS.items()}


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
