"""StreamingLLM: the attention sinks plus a recent window, in a fixed budget."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from refreekv.compression.base import LayerInputs, PositionalMethod
from refreekv.compression.checks import check_budget

__all__ = ["StreamingLLM"]


class StreamingLLM(PositionalMethod):
    """The first `num_sinks` tokens plus the most recent `budget - num_sinks`."""

    name = "streamingllm"
    fixed_budget = True

    def __init__(self, *, budget: float | int = 0.5, num_sinks: int = 4, protected_layers: Optional[Sequence[int]] = None):
        super().__init__(num_sinks=num_sinks, protected_layers=protected_layers)
        self.budget = check_budget(budget)

    def recent_count(self, inputs: LayerInputs, sinks: torch.Tensor) -> torch.Tensor:
        budget = inputs.budget_tokens(self.budget)
        return torch.minimum((budget - sinks).clamp(min=0), inputs.real_len - sinks)
