"""FullKV: no compression, the reference every other method is compared with."""

from __future__ import annotations

from refreekv.compression.base import CompressionMethod, LayerInputs

__all__ = ["FullKV"]


class FullKV(CompressionMethod):
    """No compression: the reference every other method is compared with."""

    name = "fullkv"

    def __init__(self):
        super().__init__(protected_layers=())

    def plan(self, inputs: LayerInputs) -> None:
        return None

    def prefill_query_rows(self, prompt_len: int) -> int:
        return min(1, prompt_len)

    def recompression_refusal(self) -> str:
        return "fullkv never cuts, so re-cutting while decoding would only add work"
