"""H2O: heavy hitters by accumulated attention, in a fixed budget."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from refreekv.compression.base import LayerInputs, ScoredMethod
from refreekv.compression.checks import check_choice

__all__ = ["H2O"]


class H2O(ScoredMethod):
    """Heavy hitters: keys ranked by accumulated attention, plus the last
    `window` tokens. `observation="window"` accumulates over the last
    `window` queries (as the SnapKV-lineage code), `"all"` over every prompt
    query (the original heavy-hitter score, in O(n) memory)."""

    name = "h2o"

    def __init__(
        self,
        *,
        budget: float | int = 0.5,
        observation: str = "window",
        window: int = 8,
        protected_layers: Optional[Sequence[int]] = None,
    ):
        super().__init__(budget=budget, window=window, protected_layers=protected_layers)
        self.observation = check_choice("observation", observation, ("window", "all"))

    def decode_query_rows(self, recompress_every: int) -> int:
        # "all": every query since the last event, the ones sure to be held.
        return recompress_every if self.observation == "all" else self.window

    @property
    def sums_every_query(self) -> bool:
        return self.observation == "all"

    def scores(self, inputs: LayerInputs) -> torch.Tensor:
        if self.sums_every_query and inputs.summed_importance is not None:
            return inputs.summed_importance  # a prompt that arrived in pieces
        rows = inputs.query_rows if self.observation == "all" else self.window
        return inputs.importance(rows, normalize=False, group_reduce="mean")
