"""Paged storage (SPEC 10): each (sequence, KV head) holds its own rows.

A padded `CompressedLayer` holds every head of a sequence at the largest
head's count, so a method that keeps a different count per head (Coverage
per head, AdaKV) saves only what its largest head drops. A `PagedLayer`
holds each head's kept rows, in their original order, in fixed-size blocks
drawn from one pool per layer, found through a block table:

    key_pool, value_pool: [blocks, block_rows, d]
    block_table: [b, Hkv, max_blocks] int64, block ids in row order
    lengths: [b, Hkv] int64, rows each head holds

Appending a token writes one row per head after its last row
(`refreekv.paged_write`); attention reads the pool through the block table
(`refreekv.paged_attention`). Neither moves a held row, and an append needs
no host synchronisation: the layer keeps a host copy of the lengths and of
each head's capacity (both change only by counts it knows), so it knows
without asking the device when a head's blocks run out. It then reserves
blocks for every head at once, for the next `reserve` tokens, in a larger
pool (one copy of the pool, as `GrowingLayer` reallocates when its
headroom runs out).

Like `GrowingLayer`, a paged layer never allocates more than the
uncompressed cache holds at the same step (b * Hkv * positions rows).
Block rounding costs up to `block_rows - 1` rows per head, so a layer is
paged only where its heads evict at least that many rows on average
(`paged_fits`); otherwise it stays padded, where the cap always holds.
Reservations shrink to the blocks the heads need when the cap is near,
and blocks a head reserved but never wrote go to the others.
"""

from __future__ import annotations

from typing import Optional

import torch

from refreekv.compression.checks import is_integer
from refreekv.integration.forwards import require_patched_forward
from refreekv.integration.compat import DynamicLayer
from refreekv.ops import paged_attention, paged_write

__all__ = ["DEFAULT_BLOCK_ROWS", "PagedLayer", "pack_paged", "paged_block_rows", "paged_fits"]

DEFAULT_BLOCK_ROWS = 16
MAX_BLOCK_ROWS = 4096


STORAGES = ("padded", "paged")


def paged_block_rows(method, storage: Optional[str], block_rows, *, evict: bool) -> Optional[int]:
    """The block size of a patch's paged storage, None for padded storage;
    clear errors for settings that do not fit (see `refreekv.patch`)."""
    if storage is None:
        storage = "paged" if method.per_head_counts and evict else "padded"
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(map(repr, STORAGES))} or None, got {storage!r}")
    if not is_integer(block_rows) or not 1 <= block_rows <= MAX_BLOCK_ROWS:
        raise ValueError(
            f"block_rows must be an integer in [1, {MAX_BLOCK_ROWS}] (rows per block of the paged pool), got {block_rows!r}"
        )
    if storage == "padded":
        return None
    if not evict:
        raise ValueError(
            "storage='paged' holds only the kept rows, and evict=False keeps every row (masking the evicted ones, to "
            "verify eviction); use storage='padded' with evict=False"
        )
    return int(block_rows)


def paged_fits(kept: torch.Tensor, logical_length: int, block_rows: int) -> bool:
    """Whether heads holding `kept` [b, Hkv] rows (CPU), standing for
    `logical_length` positions each, can be paged in blocks of `block_rows`
    without ever holding more than the uncompressed cache: true when, with
    a partly filled block per head, they hold no more now. Appends add a
    row to every head and a position to the cap alike, so it stays true."""
    heads = kept.numel()
    return int(kept.sum()) + heads * (block_rows - 1) <= heads * logical_length


def _block_limit(heads: int, logical_length: int, block_rows: int) -> int:
    """Blocks a layer may allocate: no more rows than the uncompressed cache."""
    return heads * logical_length // block_rows


class PagedLayer(DynamicLayer):
    """A cache layer whose heads each hold their own number of rows.

    It stands for `get_seq_length()` positions (what the uncompressed cache
    would hold) while holding only the kept ones, so position ids and
    transformers' masks keep the original numbering; its attention is
    `attend`, which needs no mask (padding is never held, and the newest
    rows are causal among themselves).

    Attributes (read-only for callers):
        key_pool, value_pool: [blocks, block_rows, d] (also `keys`, `values`).
        block_table: [b, Hkv, max_blocks] int64.
        lengths: [b, Hkv] int64 rows held per head, on the pool's device.
        prompt_lengths: [b, Hkv] int64 prompt rows kept per head at the
            last cut, on the CPU.
        scaling, softcap, sinks: the layer's softmax (see `AttentionVariant`).

    Host copies, so that appends never wait for the device: `host_lengths`
    (`lengths`), `host_table` (`block_table`) and `blocks_per_head` [b, Hkv],
    the blocks the table lists for each head (its first entries).
    """

    # Cropping counts in positions this layer no longer holds one-to-one.
    is_croppable = False

    def __init__(
        self,
        key_pool: torch.Tensor,
        value_pool: torch.Tensor,
        block_table: torch.Tensor,
        lengths: torch.Tensor,
        *,
        host_lengths: torch.Tensor,
        host_table: torch.Tensor,
        blocks_per_head: torch.Tensor,
        logical_length: int,
        scaling: float,
        softcap: Optional[float] = None,
        sinks: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        self.lazy_initialization(key_pool, value_pool)
        self.keys, self.values = key_pool, value_pool
        self.block_table = block_table
        self.lengths = lengths
        self._host_lengths = host_lengths
        self._host_table = host_table
        self._blocks_per_head = blocks_per_head
        # Pool blocks no head's table lists (handed back by `reserve`).
        self._free_blocks = torch.zeros(0, dtype=torch.long)
        self.prompt_lengths = host_lengths
        self.logical_length = logical_length
        self.scaling, self.softcap, self.sinks = scaling, softcap, sinks
        # Set when the layer re-cuts while decoding (see CompressedLayer).
        self.recompressing = False

    # -- storage ------------------------------------------------------------

    @property
    def key_pool(self) -> torch.Tensor:
        return self.keys

    @property
    def value_pool(self) -> torch.Tensor:
        return self.values

    @property
    def block_rows(self) -> int:
        return self.keys.shape[1]

    def appendable(self) -> int:
        """Tokens every head can take before blocks must be reserved."""
        capacity = self._blocks_per_head * self.block_rows
        return int((capacity - self._host_lengths).min()) if self._host_lengths.numel() else 0

    def reserve(self, tokens: int) -> None:
        """Makes room for `tokens` more rows in every head: each head whose
        blocks cannot take them gets blocks for its rows and the `tokens`,
        plus an eighth of that (one block at least). Where that would pass
        the cap (`_block_limit`), every head gets the blocks it needs and
        the blocks left under the cap are shared out in proportion to the
        spare each head wanted or holds, so blocks a head reserved but did
        not write may go to another. New blocks come from those no head
        holds rows in, then from a larger pool (one copy of the pool). It
        reads only host copies: no synchronisation with the device."""
        lengths = self._host_lengths + tokens
        have = self._blocks_per_head
        needed = -(-lengths // self.block_rows)
        short = needed > have
        if not bool(short.any()):
            return
        spare = torch.clamp(lengths // 8, min=self.block_rows)
        wanted = torch.where(short, -(-(lengths + spare) // self.block_rows), have)
        limit = _block_limit(lengths.numel(), self.logical_length + tokens, self.block_rows)
        if int(wanted.sum()) > limit:
            extra = wanted - needed
            wanted = needed + extra * (limit - int(needed.sum())) // max(int(extra.sum()), 1)
        slots = torch.arange(max(int(wanted.max()), self._host_table.shape[2]))
        table = torch.nn.functional.pad(self._host_table, (0, slots.numel() - self._host_table.shape[2]))
        released = table[(slots >= wanted[..., None]) & (slots < have[..., None])]
        free = torch.cat([self._free_blocks, released])
        is_new = (slots >= have[..., None]) & (slots < wanted[..., None])
        count = int(is_new.sum())
        grow = max(count - free.numel(), 0)
        # Head by head in table order, each takes the next free ids, then fresh ones after the pool's last block.
        ids = torch.cat([free, torch.arange(self.keys.shape[0], self.keys.shape[0] + grow)])
        table[is_new] = ids[:count]
        self._free_blocks = ids[count:]
        if grow:
            self.keys = _grown_pool(self.keys, grow)
            self.values = _grown_pool(self.values, grow)
        self._host_table = table
        self.block_table = table.to(self.keys.device)
        self._blocks_per_head = wanted

    # -- the DynamicLayer interface -----------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Appends the new tokens' rows to every head and returns them (the
        attention reads the pool, see `attend`)."""
        require_patched_forward(self)
        tokens = key_states.shape[2]
        if tokens > self.appendable():
            self.reserve(tokens)
        paged_write(self.keys, self.values, self.block_table, self.lengths, key_states, value_states)
        self.lengths = self.lengths + tokens  # a new tensor: a copied cache may share the old one
        self._host_lengths = self._host_lengths + tokens
        self.logical_length += tokens
        return key_states, value_states

    def attend(self, query: torch.Tensor) -> torch.Tensor:
        """[b, H, q, dv]: the newest q tokens' attention over every row held.

        A decoding step reads the pool in place (`paged_attention`). Many
        queries at once (a piece of a streaming prompt, a turn) read the
        rows out once, right-aligned per head, and go through SDPA: its
        tiled kernels beat the per-row paged kernel when every row is
        attended by many queries (at 8k tokens in pieces of 1024, the paged
        kernel took a third of the prefill). Soft-capping and sinks, which
        SDPA lacks, stay on the paged kernel."""
        rows = query.shape[2]
        if rows == 1 or self.softcap or self.sinks is not None:
            return paged_attention(
                query, self.keys, self.values, self.block_table, self.lengths, self.scaling,
                softcap=self.softcap, sinks=self.sinks,
            )  # fmt: skip
        keys, values, held = self.left_padded_rows()
        longest = keys.shape[2]
        positions = torch.arange(longest, device=keys.device)
        # Each head's rows end at the last position; query i is the row at
        # longest - rows + i of every head, and sees the held rows up to it.
        held_rows = positions >= (longest - held)[..., None, None]  # [b, Hkv, 1, longest]
        causal = positions <= (longest - rows + torch.arange(rows, device=keys.device))[:, None]  # [rows, longest]
        mask = (held_rows & causal).repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
        return torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=query.shape[1] != keys.shape[1]
        )

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.logical_length + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the newest tokens (a positive value is the length to
        keep), only among those appended since the last cut."""
        if tokens_to_remove > 0:
            tokens_to_remove = max(self.logical_length - tokens_to_remove, 0)
        else:
            tokens_to_remove = -tokens_to_remove
        appended = int((self._host_lengths - self.prompt_lengths).min())
        if tokens_to_remove > appended:
            raise NotImplementedError(
                f"cannot crop {tokens_to_remove} tokens off a paged cache layer compressed by refreekv: it holds "
                f"{appended} tokens appended since its last cut, after a compressed prompt that cropping cannot restore"
            )
        self.lengths = self.lengths - tokens_to_remove
        self._host_lengths = self._host_lengths - tokens_to_remove
        self.logical_length -= tokens_to_remove

    def _refuse(self, operation: str) -> None:
        raise NotImplementedError(
            f"{operation} is not supported on a paged cache layer (storage='paged'): sequences would share blocks "
            "that each appends to. Use storage='padded' for beam search and batch expansion after prefill"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._refuse("reordering the batch (beam search)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("repeating sequences of the batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse("selecting sequences of the batch")

    def offload(self):
        self._refuse("offloading")

    # -- what it holds ------------------------------------------------------

    def left_padded_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, held): every head's rows read out of the pool into
        [b, Hkv, longest, d], right-aligned per head (padding first, holding
        copies of a row), and held [b, Hkv] rows per head: what a
        decode-time cut is handed."""
        longest = int(self._host_lengths.max())
        row = torch.arange(longest, device=self.lengths.device) - (longest - self.lengths[..., None])
        row = row.clamp(min=0)
        pool_row = self.block_table.gather(-1, row // self.block_rows) * self.block_rows + row % self.block_rows
        keys = self.keys.flatten(0, 1)[pool_row]
        values = self.values.flatten(0, 1)[pool_row]
        return keys, values, self.lengths

    def kept_per_sequence(self) -> torch.Tensor:
        """[b] float64, on the CPU: prompt rows kept at the last cut per
        sequence, averaged over the KV heads."""
        return self.prompt_lengths.double().mean(dim=1)

    def block_rows_per_head(self, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[b, Hkv] int64, on the CPU: rows of the blocks that hold each
        head's rows (`lengths`, by default what it holds now)."""
        lengths = self._host_lengths if lengths is None else lengths
        return -(-lengths // self.block_rows) * self.block_rows

    def held_per_sequence(self) -> torch.Tensor:
        """[b] float64, on the CPU: prompt rows held in memory per sequence,
        averaged over the KV heads: the kept rows and the unused rows of
        each head's last block (`rounding_per_sequence`)."""
        return self.block_rows_per_head(self.prompt_lengths).double().mean(dim=1)

    def rounding_per_sequence(self) -> torch.Tensor:
        """[b] float64: `held_per_sequence` - `kept_per_sequence`, fewer
        than `block_rows` per head."""
        return self.held_per_sequence() - self.kept_per_sequence()

    def bytes_in_use(self) -> int:
        """Bytes of the blocks that hold rows (keys and values)."""
        blocks = int(-(-self._host_lengths // self.block_rows).sum())
        return blocks * (self.keys[0].nbytes + self.values[0].nbytes) if self.keys.shape[0] else 0


def _grown_pool(pool: torch.Tensor, extra_blocks: int) -> torch.Tensor:
    grown = pool.new_empty(pool.shape[0] + extra_blocks, *pool.shape[1:])
    grown[: pool.shape[0]] = pool
    return grown


@torch.no_grad()
def pack_paged(
    key: torch.Tensor,
    value: torch.Tensor,
    keep_index: torch.Tensor,
    kept: torch.Tensor,
    *,
    logical_length: int,
    block_rows: int,
    reserve: int = 0,
    scaling: float,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
) -> PagedLayer:
    """A `PagedLayer` holding, for each head, the rows `keep_index[s, h,
    :kept[s, h]]` of `key` and `value` ([b, Hkv, n, d]), with blocks for
    `reserve` more rows per head (for decode-time cuts: the tokens until
    the next one; none where they would pass the uncompressed cache's size)
    and otherwise none beyond each head's last partly filled block. The
    counts must pass `paged_fits`. One synchronisation reads the counts
    (none if `kept` is on the CPU); one `paged_write` packs."""
    batch, kv_heads = key.shape[:2]
    kept = kept.expand(batch, kv_heads)
    host_kept = kept.cpu()
    if not paged_fits(host_kept, logical_length, block_rows):
        raise ValueError(
            f"paged storage of {int(host_kept.sum())} rows over {host_kept.numel()} heads in blocks of {block_rows} "
            f"could hold more than the uncompressed cache ({host_kept.numel()} x {logical_length} rows); check "
            "paged_fits first and keep such a layer padded"
        )
    blocks_per_head = -(-(host_kept + reserve) // block_rows)
    if int(blocks_per_head.sum()) > _block_limit(host_kept.numel(), logical_length, block_rows):
        blocks_per_head = -(-host_kept // block_rows)
    total = int(blocks_per_head.sum())
    first = (blocks_per_head.flatten().cumsum(0) - blocks_per_head.flatten()).view(batch, kv_heads)
    width = int(blocks_per_head.max()) if blocks_per_head.numel() else 0
    slots = torch.arange(width)
    # Head (s, h) owns blocks first[s, h] .. first[s, h] + blocks - 1; slots past them point at block 0, never read.
    table = torch.where(slots < blocks_per_head[..., None], first[..., None] + slots, 0)
    key_pool = key.new_empty(total, block_rows, key.shape[3])
    value_pool = value.new_empty(total, block_rows, value.shape[3])
    block_table = table.to(key.device)
    lengths = kept.to(device=key.device, dtype=torch.long).contiguous()
    paged_write(
        key_pool, value_pool, block_table, torch.zeros_like(lengths), key, value,
        row_index=keep_index, row_count=lengths,
    )  # fmt: skip
    return PagedLayer(
        key_pool, value_pool, block_table, lengths, host_lengths=host_kept.clone(), host_table=table,
        blocks_per_head=blocks_per_head, logical_length=logical_length, scaling=scaling, softcap=softcap, sinks=sinks,
    )  # fmt: skip
