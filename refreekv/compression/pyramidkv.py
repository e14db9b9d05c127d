"""PyramidKV: SnapKV with budgets that shrink from the bottom layer up."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from refreekv.compression.base import LayerInputs
from refreekv.compression.checks import check_real
from refreekv.compression.snapkv import SnapKV

__all__ = ["PyramidKV"]


class PyramidKV(SnapKV):
    """SnapKV scoring with budgets that shrink linearly from the bottom layer
    to the top one around the same mean; `beta` sets the ratio of the
    largest to the smallest share (the top layer keeps 1/beta of the mean
    share beyond the window)."""

    name = "pyramidkv"

    def __init__(
        self,
        *,
        budget: float | int = 0.5,
        window: int = 8,
        kernel: int = 7,
        pooling: str = "max",
        beta: float = 20.0,
        protected_layers: Optional[Sequence[int]] = None,
    ):
        super().__init__(budget=budget, window=window, kernel=kernel, pooling=pooling, protected_layers=protected_layers)
        self.beta = check_real("beta", beta, minimum=1.0)

    def layer_budget(self, inputs: LayerInputs) -> torch.Tensor:
        if inputs.max_tokens is not None:
            return super().layer_budget(inputs)  # a decode-time cap is the same hard cap in every layer
        w = self.window_len(inputs)
        share = (super().layer_budget(inputs) - w).clamp(min=0).double()  # mean share beyond the window
        smallest = share / self.beta
        largest = 2 * share - smallest
        depth = inputs.layer_idx / max(inputs.num_layers - 1, 1)
        layer_share = torch.round(largest - (largest - smallest) * depth).long()
        return torch.minimum(layer_share + w, inputs.real_len)
