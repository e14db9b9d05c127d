"""Decode-time compression (SPEC 8): every `recompress_every` generated
tokens, each compressed layer re-cuts the whole cache it holds. Streaming
prefill (SPEC 11) re-cuts the same way after every piece of a prompt.

At an event the layer's held rows (sinks, rows earlier cuts kept, every
token generated since) are handed to the method as a left-padded prompt
(`LayerInputs`), with the queries of the newest tokens as the signal; the
method decides, and the cut is done here:

* evicting: the kept rows are gathered, right-aligned per sequence and KV
  head, into a new cache (one `compact_kv` per layer and event), so the
  held rows stay a left-padded prompt for the next event; a paged layer
  (SPEC 10) packs them into a new pool, each head at its own count;
* masking (`evict=False`, for verification): every row stays; the method is
  handed the same left-padded view of the rows still attended to, and its
  choice is mapped back onto the full cache as a mask.

A method whose KV heads keep their own counts (Coverage per head) cuts each
head on its own at an event, so its heads may hold different counts
afterwards: the padded cache then pads every head to the largest and masks
the rest, the paged cache holds each at its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F

from refreekv.compression import CompressionMethod, KeepPlan, LayerInputs, fixed_budget_methods
from refreekv.compression.checks import is_integer
from refreekv.integration.cache import CompressedLayer, kept_positions, left_aligned_layer
from refreekv.integration.compat import AttentionVariant
from refreekv.integration.paged import PagedLayer, pack_paged, paged_fits

__all__ = ["CompressionEvent", "DecodeCompression", "recompress_layer"]


@dataclass(frozen=True)
class DecodeCompression:
    """The re-cutting settings of a patch: decode-time events (SPEC 8)
    and, in streaming prefill (SPEC 11), a re-cut after every piece of a
    prompt, by the same rules.

    every: generated tokens between two events; None without decode-time
        events (streaming prefill only).
    max_cache_tokens: the hard cap per layer and sequence of a fixed-budget
        method at a re-cut (None for the threshold-free methods).
    query_rows: newest queries each layer keeps for an event's signal
        (None without events).
    streaming: whether every piece of a prompt but the first is re-cut.
    """

    every: Optional[int]
    max_cache_tokens: Optional[int]
    query_rows: Optional[int]
    streaming: bool = False

    @classmethod
    def configure(
        cls,
        method: CompressionMethod,
        recompress_every: Optional[int],
        max_cache_tokens: Optional[int],
        *,
        streaming: bool = False,
    ) -> Optional["DecodeCompression"]:
        """The settings, or None when nothing is re-cut (prefill-only
        compression); raises a clear error for options that do not fit the
        method."""
        if recompress_every is None and not streaming:
            if max_cache_tokens is not None:
                raise ValueError(
                    f"max_cache_tokens={max_cache_tokens!r} caps the cache at re-cuts; it needs recompress_every "
                    "or prefill='streaming'"
                )
            return None
        what = "recompress_every" if recompress_every is not None else "prefill='streaming'"
        query_rows = None
        if recompress_every is not None:
            if not is_integer(recompress_every) or recompress_every < 1:
                raise ValueError(f"recompress_every must be an integer >= 1 or None, got {recompress_every!r}")
            recompress_every = int(recompress_every)
        refusal = method.recompression_refusal()
        if refusal is not None:
            raise ValueError(f"{what} is not available for this method: {refusal}")
        if recompress_every is not None:
            query_rows = method.decode_query_rows(recompress_every)
            if query_rows > recompress_every:
                raise ValueError(
                    f"{method!r} reads the newest {query_rows} queries at each event, but only the recompress_every="
                    f"{recompress_every} tokens generated since the last event are sure to be held; "
                    f"set recompress_every >= {query_rows} or a smaller window"
                )
        if method.fixed_budget:
            if max_cache_tokens is None:
                raise ValueError(
                    f"{method.name} keeps a fixed budget: with {what} it needs max_cache_tokens, "
                    "the rows each layer may hold per sequence after a re-cut"
                )
            fewest = method.fewest_kept()
            if not is_integer(max_cache_tokens) or max_cache_tokens < fewest:
                raise ValueError(
                    f"max_cache_tokens must be an integer >= {fewest} for {method!r} (the rows every cut keeps, "
                    f"the newest token included), got {max_cache_tokens!r}"
                )
        elif max_cache_tokens is not None:
            raise ValueError(
                f"{method.name} decides its own budget and takes no max_cache_tokens (got {max_cache_tokens!r}); "
                f"only fixed-budget methods ({', '.join(fixed_budget_methods())}) take a cap"
            )
        return cls(
            every=recompress_every,
            max_cache_tokens=None if max_cache_tokens is None else int(max_cache_tokens),
            query_rows=query_rows,
            streaming=streaming,
        )

    def piece_query_rows(self, method: CompressionMethod, piece: int) -> int:
        """Newest queries of a prompt piece of `piece` positions that its
        re-cut reads: what the method reads at an event every `piece`
        tokens, no more than the piece brings."""
        return min(method.decode_query_rows(piece), piece)


@dataclass
class CompressionEvent:
    """One layer's cut at one decode step.

    step: tokens appended since prefill when the event ran (a multiple of
        `recompress_every` when decoding one token per step).
    layer: the model's layer number.
    held_before, held_after: [b] float64 rows the layer attended to per
        sequence before and after the cut, averaged over the KV heads
        (tensors on the model's device until read).
    rows_after: rows the layer holds in memory afterwards for its largest
        sequence, averaged over the KV heads (padding and block rounding
        included).
    """

    step: int
    layer: int
    held_before: torch.Tensor
    held_after: torch.Tensor
    rows_after: float

    def rows(self) -> list[dict]:
        """One record per sequence."""
        before, after = self.held_before.tolist(), self.held_after.tolist()
        return [
            {"step": self.step, "layer": self.layer, "sequence": row, "held_before": b, "held_after": a}
            for row, (b, a) in enumerate(zip(before, after))
        ]


@dataclass
class Timeline:
    """Every decode-time event since the last prefill, in order."""

    events: list[CompressionEvent] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """(step, layer, sequence, held_before, held_after) records."""
        return [row for event in self.events for row in event.rows()]


@torch.no_grad()
def recompress_layer(
    method: CompressionMethod,
    layer: CompressedLayer | PagedLayer,
    queries: torch.Tensor,
    variant: AttentionVariant,
    *,
    layer_idx: int,
    num_layers: int,
    max_tokens: Optional[int],
    step: int,
    evict: bool,
    headroom: int,
    paged_block_rows: Optional[int] = None,
) -> tuple[CompressedLayer | PagedLayer, CompressionEvent]:
    """Re-cuts the rows `layer` holds. `queries` [b, H, q, d] are those of
    the newest q tokens, all held; `variant` is the layer's softmax;
    `headroom` rows are left free after the kept ones for the next tokens
    (no more than the rows it no longer holds, so that the layer allocates
    no more than the uncompressed cache; see `left_aligned_layer`). With
    `paged_block_rows` the new layer is paged, reserving them per head in
    its new pool (none where that would pass the uncompressed cache's
    size), where its counts pass `paged_fits` (padded otherwise)."""
    order = None
    if isinstance(layer, PagedLayer):
        keys, values, held = layer.left_padded_rows()
    else:
        attended = layer.attended_rows().expand(-1, layer.keys.shape[1], -1)  # [b, Hkv, L]
        keys, values = layer.keys, layer.values
        if not evict:
            # The rows still attended to, in order and right-aligned per head:
            # what the evicting cache holds (up to its padding).
            order = torch.sort(attended.to(torch.int8), dim=-1, stable=True).indices
            keys = keys.gather(2, order[..., None].expand(-1, -1, -1, keys.shape[-1]))
            values = values.gather(2, order[..., None].expand(-1, -1, -1, values.shape[-1]))
        held = attended.sum(-1)
    cut = _cut_held_rows(method, keys, values, held, queries, variant, layer_idx, num_layers, max_tokens)
    before = held.double().mean(1)
    if cut is None:
        return layer, CompressionEvent(step, layer_idx, before, before, _rows_held(layer))
    keep_index, kept = cut
    logical_length = layer.get_seq_length()
    kept = kept.expand(keys.shape[:2])
    host_kept = None if paged_block_rows is None else kept.cpu()
    if host_kept is not None and paged_fits(host_kept, logical_length, paged_block_rows):
        new_layer = pack_paged(
            keys, values, keep_index, host_kept, logical_length=logical_length, block_rows=paged_block_rows,
            reserve=headroom, scaling=variant.scaling, softcap=variant.softcap, sinks=variant.sinks,
        )  # fmt: skip
    elif evict:
        new_layer = left_aligned_layer(keys, values, keep_index, kept, logical_length=layer.get_seq_length(), headroom=headroom)
    else:
        # The cut in the full cache's rows: what the view's rows were.
        in_full_cache = KeepPlan(order.gather(-1, keep_index), kept.amax(1), kept)
        new_layer = CompressedLayer(layer.keys, layer.values, kept_positions(in_full_cache, keys.shape[2]), evicted=0)
    new_layer.recompressing = True
    return new_layer, CompressionEvent(step, layer_idx, before, kept.double().mean(1), _rows_held(new_layer))


def _rows_held(layer: CompressedLayer | PagedLayer) -> float:
    """Rows the layer holds in memory for its largest sequence, averaged
    over the KV heads (padding and block rounding included)."""
    if isinstance(layer, PagedLayer):
        return float(layer.block_rows_per_head().double().mean(1).max())
    return float(layer.keys.shape[2])


def _cut_held_rows(
    method: CompressionMethod, keys, values, held, queries, variant: AttentionVariant, layer_idx, num_layers, max_tokens
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(keep_index [b, Hkv, r], kept [b, Hkv]): what `method` keeps of a
    layer's held rows, `keys` and `values` [b, Hkv, L, d] right-aligned per
    head with `held` [b, Hkv] rows each; None when it keeps them all.

    A method whose heads keep their own counts (`per_head_counts`) cuts
    each KV head on its own, as a layer of one KV head with its query group
    (and their sinks), so heads that hold different counts need no common
    padding; the others see the whole layer, whose heads hold as many rows."""
    batch, kv_heads, length, _ = keys.shape
    positions = torch.arange(length, device=keys.device)
    if method.per_head_counts:
        group = queries.shape[1] // kv_heads
        cuts = []
        for head in range(kv_heads):
            queried = slice(head * group, (head + 1) * group)
            head_variant = replace(variant, sinks=None if variant.sinks is None else variant.sinks[queried])
            inputs = _held_rows_inputs(
                keys[:, head : head + 1], values[:, head : head + 1], held[:, head], queries[:, queried], head_variant,
                layer_idx, num_layers, max_tokens,
            )  # fmt: skip
            plan = method.plan(inputs)
            if plan is None:  # keeps every held row
                plan = KeepPlan((length - held[:, head, None, None] + positions).clamp(max=length - 1), held[:, head])
            cuts.append(plan)
        width = max(plan.keep_index.shape[2] for plan in cuts)
        keep_index = torch.cat([F.pad(plan.keep_index, (0, width - plan.keep_index.shape[2])) for plan in cuts], dim=1)
        kept = torch.cat([plan.kept_lengths() for plan in cuts], dim=1)
    else:
        if not bool((held == held[:, :1]).all()):
            raise RuntimeError(f"{method!r} cuts a layer whose KV heads hold different counts ({held.tolist()}); it should not")
        plan = method.plan(_held_rows_inputs(keys, values, held[:, 0], queries, variant, layer_idx, num_layers, max_tokens))
        if plan is None:
            return None
        if plan.head_len is not None:
            raise RuntimeError(f"{method!r} planned a per-head cut without declaring per_head_counts")
        keep_index, kept = plan.keep_index, plan.kept_lengths().expand(batch, kv_heads)
    if bool((kept == held).all()):
        return None
    return keep_index, kept


def _held_rows_inputs(keys, values, held, queries, variant: AttentionVariant, layer_idx, num_layers, max_tokens) -> LayerInputs:
    """The method's view of a layer's held rows: a prompt left-padded to
    `keys`' length, with `held` [b] real rows per sequence."""
    length = keys.shape[2]
    prompt_valid = torch.arange(length, device=keys.device)[None, :] >= (length - held)[:, None]
    return LayerInputs(
        query=queries, key=keys, scaling=variant.scaling, layer_idx=layer_idx, num_layers=num_layers,
        prompt_valid=prompt_valid, real_len=held, value=values, softcap=variant.softcap, sinks=variant.sinks,
        max_tokens=max_tokens,
    )  # fmt: skip
