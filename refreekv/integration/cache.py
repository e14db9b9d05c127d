"""The cache layer that holds a compressed prompt.

A compressed layer stores the kept prompt rows (per sequence, padded at the
end to the longest) followed by every token appended while decoding. It
reports the *logical* length, as if nothing had been evicted, so position ids
and the masks transformers builds keep the original numbering; the attention
wrapper then maps those masks onto the rows actually held.
"""

from __future__ import annotations

from typing import Optional

import torch

from refreekv.compression import CompressionMethod, KeepPlan, LayerInputs
from refreekv.integration.compat import DynamicLayer
from refreekv.integration.forwards import require_patched_forward
from refreekv.integration.paged import PagedLayer, pack_paged, paged_fits
from refreekv.ops import compact_kv

__all__ = [
    "CompressedLayer",
    "GrowingLayer",
    "compress_layer",
    "kept_positions",
    "left_aligned_layer",
    "whole_layer",
]


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends decoded tokens into spare capacity.

    transformers' layer concatenates on every update, a fresh copy of the
    whole cache per layer and decoded token that costs more than the
    attention itself. This one writes into a buffer with headroom and holds
    views of its filled part; it reallocates (one copy) when the headroom
    runs out, growing by an eighth (at least one row).

    Its buffer never has more rows than its logical length (`get_seq_length`
    after the append): what transformers' layer holds at the same step, so
    no step allocates more than the uncompressed cache would. A layer that
    holds every row it stands for (an uncompressed prompt, or evicted rows
    kept and masked) therefore reallocates on every append, as transformers'
    layer does; a compressed one grows into the rows it evicted.

    The tensors it starts from are never written to: they may be shared (a
    branched prefill hands the same prompt to many caches). Neither are
    tensors that transformers assigns (cropping, beam reordering, batch
    selection): an update after such an assignment adopts them and appends
    by reallocating. Nor are inference tensors outside inference mode (torch
    forbids it): a cache filled under `torch.inference_mode()` and continued
    without it reallocates once, into ordinary tensors.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, *, buffers: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """`buffers`: tensors this layer may write into, whose first rows are
        `keys` and `values` (a compaction that left headroom for appends)."""
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self._adopt()
        if buffers is not None:
            self._key_buffer, self._value_buffer = buffers
            if not self._holds_buffer_views():
                raise ValueError("keys and values must be the first rows of the buffers they come with")
            self._owns_buffers = True

    def _adopt(self) -> None:
        # The held tensors become the buffers, not ours to write into, so the
        # next append reallocates.
        self._key_buffer, self._value_buffer = self.keys, self.values
        self._owns_buffers = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self._holds_buffer_views():
            self._adopt()
        length = self.keys.shape[-2]
        needed = length + key_states.shape[-2]
        logical_length = self.get_seq_length() + key_states.shape[-2]
        if not self._can_append_in_place(needed, logical_length):
            capacity = min(needed + max(1, needed // 8), logical_length)
            self._key_buffer = _with_capacity(self.keys, capacity)
            self._value_buffer = _with_capacity(self.values, capacity)
            self._owns_buffers = True
        self._key_buffer[..., length:needed, :] = key_states
        self._value_buffer[..., length:needed, :] = value_states
        self.keys = self._key_buffer[..., :needed, :]
        self.values = self._value_buffer[..., :needed, :]
        return self.keys, self.values

    def _can_append_in_place(self, needed: int, logical_length: int) -> bool:
        # A buffer past the logical length is left by a crop (which keeps the
        # storage, as transformers' layer does until its next concatenation).
        capacity = self._key_buffer.shape[-2]
        writable = torch.is_inference_mode_enabled() or not self._key_buffer.is_inference()
        return self._owns_buffers and writable and needed <= capacity <= logical_length

    def _holds_buffer_views(self) -> bool:
        return _starts_at(self.keys, self._key_buffer) and _starts_at(self.values, self._value_buffer)


def _starts_at(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether `view` is the first rows of `buffer`, as `update` and
    cropping leave it."""
    return (
        view.data_ptr() == buffer.data_ptr()
        and view.stride() == buffer.stride()
        and view.shape[:-2] == buffer.shape[:-2]
        and view.shape[-1] == buffer.shape[-1]
    )


def _with_capacity(rows: torch.Tensor, capacity: int) -> torch.Tensor:
    """A new [..., capacity, d] buffer whose first rows are a copy of `rows`."""
    buffer = rows.new_empty(*rows.shape[:-2], capacity, rows.shape[-1])
    buffer[..., : rows.shape[-2], :] = rows
    return buffer


class CompressedLayer(GrowingLayer):
    """A DynamicLayer whose first `prompt_rows` rows are a compressed prompt.

    prompt_valid: [b, heads, prompt_rows] bool with heads 1 or Hkv, False on
        padding rows (and, in masking mode, on evicted rows that are still
        held); None, or stored as None, when every row is valid. Read the
        rows attended to through `attended_prompt_rows` and `attended_rows`.
    evicted: prompt rows no longer held (logical minus physical length).
    """

    # Cropping counts in logical positions that this layer no longer holds
    # one-to-one before its appended tokens (see `crop`).
    is_croppable = False

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        prompt_valid: Optional[torch.Tensor],
        evicted: int,
        *,
        buffers: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ):
        super().__init__(keys, values, buffers=buffers)
        self.prompt_rows = keys.shape[-2]
        # None lets the attention skip masking the prompt (see `attended_prompt_rows`).
        self.prompt_valid = None if prompt_valid is None or bool(prompt_valid.all()) else prompt_valid
        self.evicted = evicted
        # Set when the layer re-cuts while decoding: reordering its rows
        # (beam search) would leave the recent queries it keeps behind.
        self.recompressing = False

    def attended_prompt_rows(self) -> torch.Tensor:
        """[b or 1, 1 or Hkv, prompt_rows] bool: the prompt rows some query
        attends to (padding and, in masking mode, evicted rows are False)."""
        if self.prompt_valid is None:
            return torch.ones(1, 1, self.prompt_rows, dtype=torch.bool, device=self.keys.device)
        return self.prompt_valid

    def attended_rows(self) -> torch.Tensor:
        """[b, 1 or Hkv, rows held] bool: `attended_prompt_rows`, then every
        token appended since."""
        prompt = self.attended_prompt_rows()
        batch, heads, rows = self.keys.shape[0], prompt.shape[1], self.keys.shape[2]
        appended = torch.ones(batch, heads, rows - self.prompt_rows, dtype=torch.bool, device=self.keys.device)
        return torch.cat([prompt.expand(batch, -1, -1), appended], dim=-1)

    def attended_counts(self) -> torch.Tensor:
        """[b, 1 or Hkv] int64 rows each head attends to."""
        return self.attended_rows().sum(-1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        require_patched_forward(self)
        return super().update(key_states, value_states, *args, **kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the newest tokens, as transformers' layer does (a positive
        value, transformers' older form, is the length to keep). Only tokens
        appended since the last cut can go: the rows before them are a
        compressed prompt that no crop can restore."""
        if tokens_to_remove > 0:
            tokens_to_remove = max(self.get_seq_length() - tokens_to_remove, 0)
        else:
            tokens_to_remove = -tokens_to_remove
        appended = self.keys.shape[-2] - self.prompt_rows
        if tokens_to_remove > appended:
            raise NotImplementedError(
                f"cannot crop {tokens_to_remove} tokens off a cache layer compressed by refreekv: it holds {appended} "
                "tokens appended since its last cut, after a compressed prompt that cropping cannot restore "
                "(transformers crops for assisted decoding and prompt lookup, which refreekv.patch refuses)"
            )
        super().crop(-tokens_to_remove)

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.evicted

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def kept_per_sequence(self) -> torch.Tensor:
        """[b] float64, on the CPU: rows attended to per sequence, averaged
        over the KV heads (whole numbers unless the method keeps a different
        count per head)."""
        return self.attended_counts().double().mean(dim=1).cpu()

    def held_per_sequence(self) -> torch.Tensor:
        """[b] int64, on the CPU: rows held that some head attends to."""
        return self.attended_rows().any(dim=1).sum(-1).cpu()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.prompt_valid is not None:
            self.prompt_valid = self.prompt_valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.prompt_valid is not None:
            self.prompt_valid = self.prompt_valid[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.recompressing:
            raise NotImplementedError(
                "beam search is not supported with decode-time compression (recompress_every) or after a streaming "
                "prefill (prefill='streaming'); use greedy or sampling, or recompress_every=None and prefill='exact'"
            )
        super().reorder_cache(beam_idx)
        if self.prompt_valid is not None:
            self.prompt_valid = self.prompt_valid.index_select(0, beam_idx.to(self.prompt_valid.device))


@torch.no_grad()
def compress_layer(
    method: CompressionMethod,
    inputs: LayerInputs,
    value: torch.Tensor,
    *,
    evict: bool = True,
    headroom: Optional[int] = None,
    paged_block_rows: Optional[int] = None,
) -> Optional[CompressedLayer | PagedLayer]:
    """The compressed cache layer `method` makes of one layer's prompt keys
    (`inputs.key`) and `value`; None when it keeps every real token, so the
    layer stays as it is. With `evict=False` every row stays held and the
    evicted ones are masked out instead. `headroom`, for decode-time
    compression, right-aligns each sequence's kept rows (padding first)
    and leaves that many rows free (no more than it evicts) for the tokens
    decoded until the next cut (`left_aligned_layer`). With
    `paged_block_rows` the layer is a `PagedLayer` with blocks of that many
    rows (and `headroom` rows reserved per head, none where that would pass
    the uncompressed cache's size), unless block rounding
    could make it hold more than the uncompressed cache (`paged_fits`):
    then it is padded."""
    plan = method.plan(inputs)
    if plan is None or plan.keeps_everything(inputs.real_len):
        return None
    key = inputs.key
    if paged_block_rows is not None:
        kept = plan.kept_lengths().expand(key.shape[:2]).cpu()
        if paged_fits(kept, key.shape[2], paged_block_rows):
            return pack_paged(
                key, value, plan.keep_index, kept, logical_length=key.shape[2],
                block_rows=paged_block_rows, reserve=headroom or 0,
                scaling=inputs.scaling, softcap=inputs.softcap, sinks=inputs.sinks,
            )  # fmt: skip
    if evict and headroom is not None:
        return left_aligned_layer(key, value, plan.keep_index, plan.kept_lengths(), logical_length=key.shape[2], headroom=headroom)
    if evict:
        keys, values, row_valid = compact_kv(key, value, plan.keep_index, plan.keep_len)
        prompt_valid = row_valid[:, None, :]
        if plan.head_len is not None:
            prompt_valid = prompt_valid & (torch.arange(keys.shape[2], device=keys.device) < plan.head_len[..., None])
    else:
        keys, values = key, value
        prompt_valid = kept_positions(plan, key.shape[2])
    return CompressedLayer(keys, values, prompt_valid, key.shape[2] - keys.shape[2])


def whole_layer(
    inputs: LayerInputs, *, headroom: int, paged_block_rows: Optional[int] = None
) -> CompressedLayer | PagedLayer:
    """A compressed layer holding every real row of `inputs`, for a layer
    that keeps everything at prefill but is re-cut while decoding: paged
    where left padding leaves room for the block rounding (`paged_fits`)."""
    batch, kv_heads, length = inputs.key.shape[:3]
    kept = inputs.real_len[:, None].expand(batch, kv_heads).cpu()
    if paged_block_rows is None or not paged_fits(kept, length, paged_block_rows):
        return CompressedLayer(inputs.key, inputs.value, inputs.prompt_valid[:, None, :], evicted=0)
    real = (inputs.first_real[:, None] + torch.arange(length, device=inputs.key.device)).clamp(max=length - 1)
    return pack_paged(
        inputs.key, inputs.value, real[:, None, :].expand(batch, kv_heads, length), kept,
        logical_length=length, block_rows=paged_block_rows, reserve=headroom,
        scaling=inputs.scaling, softcap=inputs.softcap, sinks=inputs.sinks,
    )  # fmt: skip


def left_aligned_layer(
    key: torch.Tensor,
    value: torch.Tensor,
    keep_index: torch.Tensor,
    kept: torch.Tensor,
    *,
    logical_length: int,
    headroom: int = 0,
) -> CompressedLayer:
    """The rows `keep_index[s, h, :kept[s, h]]` ([b, Hkv, r] and [b, Hkv] or
    [b, 1]) gathered with each head's rows right-aligned, padding first:
    the held rows stay a left-padded prompt, which is what a later
    decode-time cut is handed. Padding rows hold a copy of a kept row and
    are masked out. One `compact_kv` writes the rows and `headroom` empty
    rows after them, which the layer then appends into (so an event costs
    one copy of what it keeps); fewer when rows and headroom would pass
    `logical_length`, what the uncompressed cache holds (`GrowingLayer`
    grows from there when they run out)."""
    kept = kept.expand(keep_index.shape[:2])
    rows = int(kept.max())
    headroom = min(headroom, logical_length - rows)
    padding = rows - kept  # [b, Hkv]
    slots = torch.arange(rows, device=key.device)
    source = (slots - padding[..., None]).clamp(min=0)  # padding slots repeat the first kept row
    index = keep_index.gather(-1, source)
    index = torch.nn.functional.pad(index, (0, headroom))  # past each count: zero rows
    key_buffer, value_buffer, _ = compact_kv(key, value, index, torch.full_like(kept[:, 0], rows))
    valid = slots >= padding[..., None]
    if bool((padding == padding[:, :1]).all()):
        valid = valid[:, :1]  # one mask for every head of a sequence
    return CompressedLayer(
        key_buffer[..., :rows, :], value_buffer[..., :rows, :], valid, logical_length - rows,
        buffers=(key_buffer, value_buffer),
    )  # fmt: skip


def kept_positions(plan: KeepPlan, length: int) -> torch.Tensor:
    """[b, Hkv, n] bool: True where the plan keeps the position."""
    batch, kv_heads, rows = plan.keep_index.shape
    in_plan = torch.arange(rows, device=plan.keep_index.device) < plan.kept_lengths()[..., None]
    # Entries past a head's kept length go to a spare column, dropped afterwards.
    index = plan.keep_index.masked_fill(~in_plan, length)
    kept = torch.zeros(batch, kv_heads, length + 1, dtype=torch.bool, device=index.device)
    return kept.scatter_(-1, index, True)[..., :length]
