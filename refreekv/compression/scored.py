"""Fixed-budget methods that keep the best-scored keys per KV head."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from refreekv.compression.base import KeepPlan, LayerInputs, ScoredMethod
from refreekv.compression.checks import check_choice, check_int, check_real

__all__ = ["H2O", "PyramidKV", "SnapKV"]


def _window_split(inputs: LayerInputs, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w [b], forced [b, n], candidates [b, n]): each sequence's last w real
    tokens are forced, its earlier real tokens are candidates."""
    w = inputs.real_len.clamp(max=window)
    positions = inputs.positions()[None, :]
    forced = positions >= (inputs.prompt_len - w)[:, None]
    return w, forced, inputs.prompt_valid & ~forced


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
        super().__init__(budget=budget, protected_layers=protected_layers)
        self.observation = check_choice("observation", observation, ("window", "all"))
        self.window = check_int("window", window, minimum=1)

    def decode_query_rows(self, recompress_every: int) -> int:
        # "all": every query since the last event, the ones sure to be held.
        return recompress_every if self.observation == "all" else self.window

    def fewest_kept(self) -> int:
        return self.window  # the forced window, the newest token included

    def plan(self, inputs: LayerInputs) -> KeepPlan:
        rows = inputs.query_rows if self.observation == "all" else self.window
        scores = inputs.importance(rows, normalize=False, group_reduce="mean")
        w, forced, candidates = _window_split(inputs, self.window)
        counts = (inputs.budget_tokens(self.budget) - w).clamp(min=0)
        return self.keep_top(scores, torch.minimum(counts, candidates.sum(-1)), candidates, forced)


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
        super().__init__(budget=budget, protected_layers=protected_layers)
        self.window = check_int("window", window, minimum=1)
        self.kernel = check_int("kernel", kernel, minimum=1, odd=True)
        self.pooling = check_choice("pooling", pooling, ("max", "avg"))

    def decode_query_rows(self, recompress_every: int) -> int:
        return self.window

    def fewest_kept(self) -> int:
        return self.window  # the forced window, the newest token included

    def layer_budget(self, inputs: LayerInputs) -> torch.Tensor:
        """[b] tokens this layer keeps."""
        return inputs.budget_tokens(self.budget)

    def plan(self, inputs: LayerInputs) -> KeepPlan:
        scores = inputs.importance(self.window, normalize=False)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(scores, self.kernel, stride=1, padding=self.kernel // 2)
        batch, heads, n = pooled.shape
        kv_heads = inputs.key.shape[1]
        pooled = pooled.view(batch, kv_heads, heads // kv_heads, n).mean(dim=2)
        w, forced, candidates = _window_split(inputs, self.window)
        counts = (self.layer_budget(inputs) - w).clamp(min=0)
        return self.keep_top(pooled, torch.minimum(counts, candidates.sum(-1)), candidates, forced)


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
        w = inputs.real_len.clamp(max=self.window)
        share = (super().layer_budget(inputs) - w).clamp(min=0).double()  # mean share beyond the window
        smallest = share / self.beta
        largest = 2 * share - smallest
        depth = inputs.layer_idx / max(inputs.num_layers - 1, 1)
        layer_share = torch.round(largest - (largest - smallest) * depth).long()
        return torch.minimum(layer_share + w, inputs.real_len)
