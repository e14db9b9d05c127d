"""ReFreeKV: threshold-free pruning of the recent span (SPEC 2)."""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from refreekv.compression.base import KeepPlan, LayerInputs, PositionalMethod, keep_top, resolve_budget, split_ends
from refreekv.compression.checks import check_bool, check_choice, check_count_or_fraction, check_tolerance
from refreekv.ops import adaptive_keep_count

__all__ = ["ReFreeKV"]


class ReFreeKV(PositionalMethod):
    """Threshold-free pruning (SPEC 2): keep the sinks plus the fewest recent
    tokens whose head-averaged attention-row norm is within `threshold` of
    the whole row's.

    Options:
        threshold: T, the tolerated relative loss of the norm (paper: 1%).
        num_sinks: m, first real tokens always kept.
        protected_layers: layers never compressed (paper: 0 and 1).
        window_rows: k, the prompt's last query rows whose attention forms
            the signal: an int >= 1, or a fraction of the prompt in (0, 1].
        include_sinks_in_norm: count the sinks in B and K (the paper's
            equations) instead of excluding them (the released code).
        ranking: "position" (the method) or "attention" (ablation: rank
            candidates per KV head by their group-mean attention).
    """

    name = "refreekv"
    default_protected_layers = (0, 1)

    def __init__(
        self,
        *,
        threshold: float = 0.01,
        num_sinks: int = 4,
        protected_layers: Optional[Sequence[int]] = None,
        window_rows: float | int = 1,
        include_sinks_in_norm: bool = False,
        ranking: str = "position",
    ):
        super().__init__(num_sinks=num_sinks, protected_layers=protected_layers)
        self.threshold = check_tolerance("threshold", threshold)
        self.window_rows = check_count_or_fraction("window_rows", window_rows, count="a row count")
        self.include_sinks_in_norm = check_bool("include_sinks_in_norm", include_sinks_in_norm)
        self.ranking = check_choice("ranking", ranking, ("position", "attention"))

    def _window_rows_of(self, rows: int) -> int:
        """`window_rows` as a count of `rows` query rows."""
        return int(resolve_budget(self.window_rows, torch.tensor([rows]))[0])

    def _signal(self, inputs: LayerInputs, group_reduce: Optional[str] = None) -> torch.Tensor:
        """Attention of the last k prompt rows, averaged over the rows that
        see each key (SPEC 2.1)."""
        if inputs.query_rows < inputs.prompt_len:
            rows = inputs.query_rows  # a decode event: the rows decode_query_rows asked for
        else:
            rows = self._window_rows_of(inputs.prompt_len)
        return inputs.importance(rows, group_reduce=group_reduce)

    def prefill_query_rows(self, prompt_len: int) -> int:
        return self._window_rows_of(prompt_len)

    def decode_query_rows(self, recompress_every: int) -> int:
        if isinstance(self.window_rows, numbers.Integral):
            return int(self.window_rows)
        # A fraction, at decode time, is of the tokens generated between two events.
        return self._window_rows_of(recompress_every)

    def recent_count(self, inputs: LayerInputs, sinks: torch.Tensor) -> torch.Tensor:
        signal = self._signal(inputs)  # [b, H, n]
        candidates = inputs.real_len - sinks
        newest_first = signal.flip(-1)
        if not self.include_sinks_in_norm:
            return adaptive_keep_count(newest_first, self.threshold, valid_len=candidates)
        # The sinks lead the ranking, so every K(r) counts them, as B does.
        sink_pos = (inputs.first_real[:, None] + torch.arange(self.num_sinks, device=signal.device)).clamp(
            max=inputs.prompt_len - 1
        )
        sink_scores = signal.gather(-1, sink_pos[:, None, :].expand(-1, signal.shape[1], -1))
        ranked = torch.cat([sink_scores, newest_first], dim=-1)
        kept = adaptive_keep_count(ranked, self.threshold, valid_len=torch.where(candidates > 0, inputs.real_len, 0))
        return torch.where(candidates > 0, (kept - sinks).clamp(min=1), 0)

    def plan(self, inputs: LayerInputs) -> KeepPlan:
        if self.ranking == "position":
            return super().plan(inputs)
        scores = self._signal(inputs, group_reduce="mean")  # [b, Hkv, n]
        forced, candidates = split_ends(inputs, num_sinks=self.num_sinks)
        ranked = scores.masked_fill(~candidates[:, None, :], 0.0).sort(dim=-1, descending=True).values
        counts = adaptive_keep_count(ranked, self.threshold, valid_len=candidates.sum(-1))
        return keep_top(scores, counts, candidates, forced)
