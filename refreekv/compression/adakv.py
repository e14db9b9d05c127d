"""AdaKV: SnapKV's layer budget shared unevenly among the layer's KV heads."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from refreekv.compression.base import KeepPlan, LayerInputs, keep_top, split_ends
from refreekv.compression.checks import check_real
from refreekv.compression.snapkv import SnapKV

__all__ = ["AdaKV"]


class AdaKV(SnapKV):
    """Ada-KV (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by
    Adaptive Budget Allocation", arXiv 2407.11550; kvpress's `AdaKVPress`)
    over SnapKV's scores: the layer keeps as many rows as SnapKV, shared so
    that heads whose attention spreads over many keys get more of them than
    heads that attend to a few.

    Per sequence, with `s` the candidates SnapKV keeps per KV head (its
    budget less the observation window) and `Hkv` KV heads, the layer keeps
    `Hkv * s` candidates in all:

    1. floor: every head keeps its own top `f = floor(floor * s)` candidates
       (Ada-KV's safeguard alpha; kvpress's `alpha_safeguard`, 0.2 by
       default, as here);
    2. the other `Hkv * (s - f)` go to the highest scores of the rest, over
       every head of the layer together; ties go to the lower head, then to
       the earlier position.

    Head `h` keeps `f + e_h` candidates (`e_h` of them won in step 2) plus the
    window, so the mean over heads is SnapKV's count and `floor=1` is SnapKV.
    The scores are SnapKV's per KV head: the window's attention, summed over
    its rows (each row's attention sums to 1, so heads compare on one
    scale), pooled along the keys, averaged over each GQA group.

    Unlike kvpress, whose safeguard counts the window within `floor * (s +
    window)`, the floor here is a share of the candidates, on top of the
    window every head keeps. Paged storage (SPEC 10, the default for this
    method) holds each head at its own count; padded storage holds every
    head at the largest and masks the others' extra rows.
    """

    name = "adakv"

    def __init__(
        self,
        *,
        budget: float | int = 0.5,
        window: int = 8,
        kernel: int = 7,
        pooling: str = "max",
        floor: float = 0.2,
        protected_layers: Optional[Sequence[int]] = None,
    ):
        super().__init__(budget=budget, window=window, kernel=kernel, pooling=pooling, protected_layers=protected_layers)
        self.floor = check_real("floor", floor, minimum=0.0)
        # check_real takes half-open ranges; a floor of 1 (SnapKV) is valid.
        if self.floor > 1.0:
            raise ValueError(f"floor must be in [0, 1] (a share of each head's even split), got {floor!r}")

    @property
    def per_head_counts(self) -> bool:
        return True

    def recompression_refusal(self) -> Optional[str]:
        return (
            "adakv cuts each KV head to its own length by ranking every head of the layer together, and a "
            "decode-time cut cuts each head on its own (which would make it snapkv); use snapkv"
        )

    def plan(self, inputs: LayerInputs) -> KeepPlan:
        scores = self.scores(inputs)
        forced, candidates = split_ends(inputs, window=self.window)
        even_share = (self.layer_budget(inputs) - self.window_len(inputs)).clamp(min=0)
        even_share = torch.minimum(even_share, candidates.sum(-1))  # [b] what SnapKV keeps per head
        return keep_top(scores, self._head_counts(scores, even_share, candidates), candidates, forced)

    def _head_counts(self, scores: torch.Tensor, even_share: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """[b, Hkv] candidates each head keeps: its floor, then what it wins
        of the rest in one ranking over the layer's heads (`keep_top` on the
        heads laid end to end as one row, the floors forced)."""
        batch, kv_heads, n = scores.shape
        # Rounded down, so the floors never exceed the layer's total.
        floor_count = torch.floor(even_share.double() * self.floor).long()
        floor_plan = keep_top(scores, floor_count, candidates, torch.zeros_like(candidates))
        slots = torch.arange(floor_plan.keep_index.shape[-1], device=scores.device)
        # Each head's floor rows as a mask; unused slots land in a spare column.
        floor_rows = torch.where(slots < floor_count[:, None, None], floor_plan.keep_index, n)
        in_floor = torch.zeros(batch, kv_heads, n + 1, dtype=torch.bool, device=scores.device)
        in_floor = in_floor.scatter_(-1, floor_rows, True)[..., :n]
        rest = candidates[:, None, :] & ~in_floor
        layer_plan = keep_top(
            scores.reshape(batch, 1, kv_heads * n),
            kv_heads * (even_share - floor_count),
            rest.reshape(batch, kv_heads * n),
            in_floor.reshape(batch, kv_heads * n),
        )
        # Count the kept rows (floors and winners) of each head.
        kept = layer_plan.keep_index[:, 0]
        is_kept = torch.arange(kept.shape[-1], device=scores.device) < layer_plan.keep_len[:, None]
        counts = torch.zeros(batch, kv_heads, dtype=torch.long, device=scores.device)
        return counts.scatter_add_(1, kept // n, is_kept.long())
