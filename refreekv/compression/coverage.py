"""Coverage: keep the fewest tokens that cover the prompt's attention.

A threshold-free method in the paper's sense (one tolerance, chosen once,
budgets that adapt to each layer, head and input), built from the axes the
stopping-rule study (benchmarks/stopping_rules.py) and the axes study
(benchmarks/coverage_axes.py) compare (docs/coverage.md). Its defaults are
those studies' choices: one 60% tolerance for the whole model, compounded
over its layers (C.9); the other values of each option exist to reproduce
the studies.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from refreekv.compression.base import CompressionMethod, KeepPlan, LayerInputs, keep_top, split_ends
from refreekv.compression.checks import (
    check_choice, check_kernel, check_num_sinks, check_real, check_tolerance, check_window,
)  # fmt: skip
from refreekv.ops import adaptive_keep_count, mass_keep_count

__all__ = ["Coverage", "expected_attention"]

STOPS = ("mass", "norm", "output")
RANKINGS = ("score", "position")
GRANULARITIES = ("head", "layer")
SIGNALS = ("attention", "value", "expected")
ALLOCATIONS = ("layer", "model")


class Coverage(CompressionMethod):
    """Per KV head, rank the candidates and keep the fewest whose dropped
    rest stays within `tolerance` (docs/coverage.md).

    The signal is the attention of the prompt's last `window` queries (each
    key averaged over the rows that see it, then over the query heads that
    share its KV head), max-pooled along the keys with `kernel`. The first
    `num_sinks` real tokens and the last `window` are always kept; the
    others are candidates.

    Options:
        tolerance: delta in [0, 1), the share the cut may lose: in each
            layer, or in the whole model (see `allocation`).
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
        signal: what each key is worth before pooling (docs/coverage.md C.2):
            "attention": the window's attention a_g[j];
            "value": a_g[j] * ||v_j||, what dropping the key can move the
            head's output by (the output-error rule's bound, per key);
            "expected": the mean of a_g and the attention that a query
            drawn from the window queries' Gaussian (mean and covariance
            per query head) pays in expectation, so keys that later
            queries are likely to read count although the window's own
            queries passed them by.
        allocation: how `tolerance` is spent across layers:
            "layer": every compressed layer may lose `tolerance`;
            "model": `tolerance` is the whole model's share, compounded
            layer by layer, prod_l (1 - delta_l) = 1 - tolerance, and
            split by depth (delta_l grows with the layer's rank among the
            compressed layers: an early layer's loss passes through every
            later one).
        head_floor: share of its candidates every KV head keeps at least,
            in [0, 1) (0: none).
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
        tolerance: float = 0.6,
        stop: str = "mass",
        ranking: str = "position",
        granularity: str = "head",
        signal: str = "attention",
        allocation: str = "model",
        head_floor: float = 0.0,
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
        self.signal = check_choice("signal", signal, SIGNALS)
        self.allocation = check_choice("allocation", allocation, ALLOCATIONS)
        self.head_floor = check_real("head_floor", head_floor, minimum=0.0, below=1.0)
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
        if inputs.value is None:
            for option, value in (("stop", "output"), ("signal", "value")):
                if getattr(self, option) == value:
                    raise ValueError(f"coverage with {option}={value!r} needs the layer's values (LayerInputs.value)")
        signal = self._signal(inputs)
        forced, candidates = split_ends(inputs, num_sinks=self.num_sinks, window=self.window)
        if self.ranking == "score":
            rank_key = signal
        else:
            rank_key = inputs.positions()[None, :].to(signal.dtype).expand_as(signal)
        order = rank_key.masked_fill(~candidates[:, None, :], float("-inf")).sort(dim=-1, descending=True, stable=True).indices
        valid_len = candidates.sum(-1)
        counts = self._counts(signal, order, valid_len, inputs, self.layer_tolerance(inputs.layer_idx, inputs.num_layers))
        if self.head_floor > 0:
            floor = torch.ceil(valid_len.double() * self.head_floor).long()
            counts = torch.minimum(torch.maximum(counts, floor[:, None]), valid_len[:, None])
        if self.granularity == "layer":
            counts = counts.amax(dim=1)
        return keep_top(rank_key, counts, candidates, forced)

    def layer_tolerance(self, layer_idx: int, num_layers: int) -> float:
        """delta_l, the share layer `layer_idx` may lose (see `allocation`)."""
        if self.allocation == "layer":
            return self.tolerance
        compressed = [i for i in range(num_layers) if not self.is_protected(i, num_layers)]
        weight = compressed.index(layer_idx) + 1  # the layer's depth rank, 1 for the first compressed layer
        total = len(compressed) * (len(compressed) + 1) / 2
        return 1.0 - (1.0 - self.tolerance) ** (weight / total)

    def _signal(self, inputs: LayerInputs) -> torch.Tensor:
        """[b, Hkv, n] float32 worth of each key, pooled, zero on padding."""
        rows = min(self.window, inputs.prompt_len)
        signal = inputs.importance(rows, group_reduce="mean")
        if self.signal == "value":
            signal = signal * inputs.value.float().norm(dim=-1)
        elif self.signal == "expected":
            signal = 0.5 * (signal + expected_attention(inputs, rows))
        if self.kernel > 1:
            signal = F.max_pool1d(signal, self.kernel, stride=1, padding=self.kernel // 2)
        return signal.masked_fill(~inputs.prompt_valid[:, None, :], 0.0)  # pooling spills into padding

    def _counts(self, signal: torch.Tensor, order: torch.Tensor, valid_len: torch.Tensor, inputs: LayerInputs,
                tolerance: float) -> torch.Tensor:  # fmt: skip
        """[b, Hkv] candidates each head keeps under the stopping rule."""
        ranked = signal.gather(-1, order)
        in_range = torch.arange(ranked.shape[-1], device=ranked.device) < valid_len[:, None, None]
        ranked = ranked.masked_fill(~in_range, 0.0)
        if self.stop == "mass":
            return mass_keep_count(ranked, tolerance, valid_len=valid_len)
        batch, kv_heads, n = ranked.shape
        if self.stop == "norm":
            # One head per row: the paper's norm ratio, measured per KV head.
            per_head = adaptive_keep_count(
                ranked.reshape(batch * kv_heads, 1, n), tolerance, valid_len=valid_len.repeat_interleave(kv_heads)
            )
            return per_head.view(batch, kv_heads)
        return _output_keep_count(signal, order, ranked, valid_len, inputs, tolerance)


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


def expected_attention(inputs: LayerInputs, rows: int) -> torch.Tensor:
    """[b, Hkv, n] float32: per KV head, the mean over its query heads of
    the attention a query q ~ N(mu, Sigma) pays each key in expectation,
    with mu and Sigma the mean and covariance of the newest `rows` real
    queries of each query head. The expected unnormalized weight of key k
    is E[exp(s q.k)] = exp(s mu.k + s^2 k^T Sigma k / 2) (the Gaussian's
    moment generating function); these are normalized over the real keys
    (and the layer's sink logit, which takes its share). Soft-capping is
    applied to the expected logit, an approximation where it is set."""
    rows = min(rows, inputs.query_rows)
    query = inputs.query[:, :, inputs.query_rows - rows :].float()  # [b, H, r, d]
    key = inputs.key.float()
    batch, heads = query.shape[:2]
    kv_heads, n = key.shape[1], key.shape[2]
    positions = torch.arange(inputs.prompt_len - rows, inputs.prompt_len, device=query.device)
    real_rows = (positions[None, :] >= inputs.first_real[:, None]).to(query.dtype)  # [b, r]
    count = real_rows.sum(-1).clamp(min=1)[:, None, None]  # [b, 1, 1]
    weights = real_rows[:, None, :, None]
    mean = (query * weights).sum(2) / count  # [b, H, d]
    centred = (query - mean[:, :, None]) * weights
    covariance = centred.transpose(-1, -2) @ centred / count[..., None]  # [b, H, d, d]
    key = key.repeat_interleave(heads // kv_heads, dim=1)  # [b, H, n, d]
    scale = inputs.scaling
    logits = scale * torch.einsum("bhd,bhnd->bhn", mean, key)
    logits = logits + 0.5 * scale**2 * torch.einsum("bhnd,bhde,bhne->bhn", key, covariance, key)
    if inputs.softcap:
        logits = inputs.softcap * torch.tanh(logits / inputs.softcap)
    logits = logits.masked_fill(~inputs.prompt_valid[:, None, :], float("-inf"))
    if inputs.sinks is not None:
        sink = inputs.sinks.float().to(logits.device)[None, :, None].expand(batch, heads, 1)
        probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :n]
    else:
        probs = logits.softmax(dim=-1)
    return probs.view(batch, kv_heads, heads // kv_heads, n).mean(2)
