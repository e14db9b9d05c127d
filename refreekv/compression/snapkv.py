"""SnapKV: the observation window's pooled attention, in a fixed budget."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from refreekv.compression.base import LayerInputs, ScoredMethod
from refreekv.compression.checks import check_choice, check_kernel

__all__ = ["SnapKV"]


class SnapKV(ScoredMethod):
    """Attention of the last `window` queries, summed, pooled along the keys
    (kernel `kernel`, max or average), top-k per KV head, plus the window."""

    name = "snapkv"

    def __init__(
        self,
        *,
        budget: float | int = 0.5,
        window: int = 8,
        kernel: int = 7,
        pooling: str = "max",
        protected_layers: Optional[Sequence[int]] = None,
    ):
        super().__init__(budget=budget, window=window, protected_layers=protected_layers)
        self.kernel = check_kernel(kernel)
        self.pooling = check_choice("pooling", pooling, ("max", "avg"))

    def scores(self, inputs: LayerInputs) -> torch.Tensor:
        scores = inputs.importance(self.window, normalize=False)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(scores, self.kernel, stride=1, padding=self.kernel // 2)
        batch, heads, n = pooled.shape
        kv_heads = inputs.key.shape[1]
        return pooled.view(batch, kv_heads, heads // kv_heads, n).mean(dim=2)
