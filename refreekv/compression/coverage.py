"""Coverage: keep the fewest tokens that cover the prompt's attention.

A threshold-free method in the paper's sense (one tolerance, chosen once,
budgets that adapt to each layer, head and input), built from the axes the
stopping-rule study (benchmarks/stopping_rules.py, docs/coverage.md)
compares. Its defaults are the study's choice; the other values of each
option exist to reproduce the study.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from refreekv.compression.base import CompressionMethod, KeepPlan, LayerInputs, keep_top, split_ends
from refreekv.compression.checks import check_choice, check_kernel, check_num_sinks, check_tolerance, check_window
from refreekv.ops import adaptive_keep_count, mass_keep_count

__all__ = ["Coverage"]

STOPS = ("mass", "norm", "output")
RANKINGS = ("score", "position")
GRANULARITIES = ("head", "layer")


class Coverage(CompressionMethod):
    """Per KV head, rank the candidates and keep the fewest whose dropped
    rest stays within `tolerance` (docs/coverage.md).

    The signal is the attention of the prompt's last `window` queries (each
    key averaged over the rows that see it, then over the query heads that
    share its KV head), max-pooled along the keys with `kernel`. The first
    `num_sinks` real tokens and the last `window` are always kept; the
    others are candidates.

    Options:
        tolerance: delta in [0, 1), the share the cut may lose.
        stop: what the share is measured on, over the candidates:
            "mass": the signal's sum (attention probability);
            "norm": the signal's L2 norm (the paper's quantity, per head);
            "output": the value-weighted output the dropped keys carry,
            ||sum_dropped p_j v_j|| / ||sum_all p_j v_j||.
        ranking: "position" (newest first, the paper's order) or
            "score" (highest signal first, top-p per KV head).
        granularity: "head" (each KV head keeps its own count; paged
            storage holds each at its own, padded storage pads to the
            largest and masks) or "layer" (every head keeps the largest
            count).
        window: query rows of the signal, and recent tokens always kept.
        kernel: odd max-pooling width along the keys (1: no pooling), so
            the neighbours of an attended token rank with it.
        num_sinks: first real tokens always kept.
        protected_layers: layers never compressed.
    """

    name = "coverage"

    def __init__(
        self,
        *,
        tolerance: float = 0.05,
        stop: str = "mass",
        ranking: str = "position",
        granularity: str = "head",
        window: int = 32,
        kernel: int = 7,
        num_sinks: int = 4,
        protected_layers: Optional[Sequence[int]] = None,
    ):
        super().__init__(protected_layers)
        self.tolerance = check_tolerance("tolerance", tolerance)
        self.stop = check_choice("stop", stop, STOPS)
        self.ranking = check_choice("ranking", ranking, RANKINGS)
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        self.window = check_window(window)
        self.kernel = check_kernel(kernel)
        self.num_sinks = check_num_sinks(num_sinks)

    def decode_query_rows(self, recompress_every: int) -> int:
        return self.window

    def prefill_query_rows(self, prompt_len: int) -> int:
        return min(self.window, prompt_len)

    @property
    def per_head_counts(self) -> bool:
        return self.granularity == "head"

    def plan(self, inputs: LayerInputs) -> KeepPlan:
        if self.stop == "output" and inputs.value is None:
            raise ValueError("coverage with stop='output' needs the layer's values (LayerInputs.value)")
        rows = min(self.window, inputs.prompt_len)
        signal = inputs.importance(rows, group_reduce="mean")
        if self.kernel > 1:
            signal = F.max_pool1d(signal, self.kernel, stride=1, padding=self.kernel // 2)
            signal = signal.masked_fill(~inputs.prompt_valid[:, None, :], 0.0)  # pooling spills into padding
        forced, candidates = split_ends(inputs, num_sinks=self.num_sinks, window=self.window)
        if self.ranking == "score":
            rank_key = signal
        else:
            rank_key = inputs.positions()[None, :].to(signal.dtype).expand_as(signal)
        order = rank_key.masked_fill(~candidates[:, None, :], float("-inf")).sort(dim=-1, descending=True, stable=True).indices
        valid_len = candidates.sum(-1)
        counts = self._counts(signal, order, valid_len, inputs)  # [b, Hkv]
        if self.granularity == "layer":
            counts = counts.amax(dim=1)
        return keep_top(rank_key, counts, candidates, forced)

    def _counts(self, signal: torch.Tensor, order: torch.Tensor, valid_len: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        """[b, Hkv] candidates each head keeps under the stopping rule."""
        ranked = signal.gather(-1, order)
        in_range = torch.arange(ranked.shape[-1], device=ranked.device) < valid_len[:, None, None]
        ranked = ranked.masked_fill(~in_range, 0.0)
        if self.stop == "mass":
            return mass_keep_count(ranked, self.tolerance, valid_len=valid_len)
        batch, kv_heads, n = ranked.shape
        if self.stop == "norm":
            # One head per row: the paper's norm ratio, measured per KV head.
            per_head = adaptive_keep_count(
                ranked.reshape(batch * kv_heads, 1, n), self.tolerance, valid_len=valid_len.repeat_interleave(kv_heads)
            )
            return per_head.view(batch, kv_heads)
        return _output_keep_count(signal, order, ranked, valid_len, inputs, self.tolerance)


def _output_keep_count(signal, order, ranked, valid_len, inputs: LayerInputs, tolerance: float) -> torch.Tensor:
    """The smallest r >= 1 per head whose dropped candidates (ranks r and
    after) carry at most `tolerance` of the head's attention output,
    ||sum_dropped p_j v_j|| / ||sum_all p_j v_j||, with p the signal
    normalized over the real tokens (sinks and window included)."""
    value = inputs.value.float()
    probs = signal / signal.sum(-1, keepdim=True).clamp(min=torch.finfo(signal.dtype).tiny)
    output = torch.einsum("bhn,bhnd->bhd", probs, value).norm(dim=-1)  # [b, Hkv]
    ranked_probs = ranked / signal.sum(-1, keepdim=True).clamp(min=torch.finfo(signal.dtype).tiny)
    ranked_values = value.gather(2, order[..., None].expand(-1, -1, -1, value.shape[-1]))
    carried = ranked_probs[..., None] * ranked_values  # [b, Hkv, n, d], zero past valid_len
    # dropped(r) = sum over ranks >= r: the total minus the prefix before r.
    prefix = carried.cumsum(dim=2)
    dropped = (prefix[:, :, -1:, :] - prefix).norm(dim=-1)  # keeping r + 1 candidates drops this
    meets = dropped <= tolerance * output[..., None]
    ranks = torch.arange(ranked.shape[-1], device=ranked.device)
    meets &= ranks < valid_len[:, None, None]
    first = torch.where(meets, ranks, ranked.shape[-1]).amin(dim=-1) + 1
    counts = torch.minimum(first, valid_len[:, None])
    return torch.where(output > 0, counts, valid_len[:, None].expand_as(counts))
