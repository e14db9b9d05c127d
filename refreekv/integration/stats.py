"""What a compression actually kept, and the memory a cache takes, read
from the cache that is held."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["CompressionStats", "KVMemory", "kv_memory"]


@dataclass(frozen=True)
class KVMemory:
    """The bytes a cache's keys and values take at one moment, per layer.

    layers: the cache layer number of each entry below.
    in_use: bytes of the rows each layer holds (its keys' and values'
        `nbytes`): the rows attended to, the padding rows of a batch's
        shorter sequences, and in masking mode (`evict=False`) the evicted
        rows too; for a paged layer (SPEC 10) the blocks that hold rows,
        whose last per head may be partly filled.
    allocated: bytes of the memory under those rows (their storages, each
        counted once): `in_use` plus the free rows a layer reserves for the
        tokens it appends next, and whatever else the storage of a view
        holds (a sliding-window layer of transformers holds its rows as a
        view of a larger tensor). A layer that refreekv compressed reserves
        an eighth of its rows (one at least) when it grows and
        `recompress_every` rows at a decode-time cut, never so many that
        it would pass the rows the uncompressed cache holds at that step.
    """

    layers: tuple[int, ...]
    in_use: tuple[int, ...]
    allocated: tuple[int, ...]

    @property
    def in_use_bytes(self) -> int:
        return sum(self.in_use)

    @property
    def allocated_bytes(self) -> int:
        return sum(self.allocated)


def kv_memory(cache, layers: Optional[Sequence[int]] = None) -> KVMemory:
    """What `cache` takes now: any transformers cache whose layers hold
    `keys` and `values`, patched or not, e.g. the `past_key_values` of a
    forward or of `generate(..., return_dict_in_generate=True)`. `layers`
    picks cache layers; by default every layer that holds keys (not the
    linear-attention ones). `kv_memory(cache, kv.stats.layers)` measures
    the layers `kv.stats` counts: right after prefill its `in_use_bytes` and
    `allocated_bytes` are `kv_bytes_after` and `kv_bytes_allocated`; after
    decoding they show what the appended tokens and their headroom take.
    """
    if layers is None:
        layers = [index for index, layer in enumerate(cache.layers) if torch.is_tensor(getattr(layer, "keys", None))]
    in_use, allocated = zip(*(_layer_bytes(cache.layers[index]) for index in layers)) if layers else ((), ())
    return KVMemory(layers=tuple(layers), in_use=tuple(in_use), allocated=tuple(allocated))


def _layer_bytes(layer) -> tuple[int, int]:
    """(in use, allocated) bytes of one cache layer's keys and values (for
    a paged layer, in use: the blocks that hold rows)."""
    from refreekv.integration.paged import PagedLayer

    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in (layer.keys, layer.values)}
    in_use = layer.bytes_in_use() if isinstance(layer, PagedLayer) else layer.keys.nbytes + layer.values.nbytes
    return in_use, sum(storages.values())


@dataclass(frozen=True)
class CompressionStats:
    """Per full-attention layer and per sequence, after the prefill of the
    last call. Sliding-window and linear-attention layers are not counted:
    their memory is fixed by the model, not by the prompt.

    layers: the model's layer number of each row below.
    kept: [layers, b] float64, prompt tokens each layer attends to
        afterwards, averaged over its KV heads (whole numbers unless a
        method keeps a different count per head).
    held: [layers, b] float64, prompt rows each layer holds in memory for
        the sequence, averaged over its KV heads: with padded storage a row
        some head attends to (a per-head cut pads every head to the
        largest), every real row when evicted rows are masked; with paged
        storage each head's kept rows and the unused rows of its last
        block (`rounding`).
    rounding: [layers, b] float64, the unused rows of the last block of
        each head of a paged layer, averaged over the KV heads (fewer than
        `block_rows`; 0 for padded layers): `held - kept` with paged
        storage.
    prompt_tokens: [b] int64, real (non-padding) prompt tokens.
    kv_bytes_before: bytes the full prompt cache held right after prefill
        (what an unpatched model holds then).
    kv_bytes_after: bytes of the rows held after compression, in use
        (`KVMemory.in_use`): padding rows included, free rows not.
    kv_bytes_allocated: bytes allocated under them right after compression
        (`KVMemory.allocated`): `kv_bytes_after` plus, with
        `recompress_every`, the free rows the cut leaves for the next
        tokens. Decoding appends into free rows that each compressed layer
        reserves when it grows (see `KVMemory.allocated`), which these
        figures, taken at prefill, cannot show: `kv_memory(cache)` reads
        what a cache holds and allocates at any step.
    kv_padding_bytes: bytes of held rows that are padding (left padding of
        uncompressed layers, end padding of compressed ones, the unused rows
        of the last blocks of paged ones).
    """

    layers: tuple[int, ...]
    kept: torch.Tensor
    held: torch.Tensor
    rounding: torch.Tensor
    prompt_tokens: torch.Tensor
    kv_bytes_before: int
    kv_bytes_after: int
    kv_bytes_allocated: int
    kv_padding_bytes: int

    @property
    def per_layer(self) -> torch.Tensor:
        """[layers, b] kept fraction of each sequence's prompt, per layer."""
        return self.kept.double() / self.prompt_tokens.double()

    @property
    def per_sequence(self) -> torch.Tensor:
        """[b] kept fraction of each sequence, averaged over layers."""
        return self.per_layer.mean(dim=0)

    @property
    def budget(self) -> float:
        """Mean kept fraction over layers and sequences (the paper's budget)."""
        return float(self.per_sequence.mean())

    @property
    def held_per_sequence(self) -> torch.Tensor:
        """[b] held fraction of each sequence's prompt, averaged over layers
        (the budget in memory; equal to `per_sequence` unless heads differ)."""
        return (self.held.double() / self.prompt_tokens.double()).mean(dim=0)

    @property
    def kv_bytes_ratio(self) -> float:
        """Bytes in use after compression / the full prompt cache."""
        return self.kv_bytes_after / self.kv_bytes_before

    @property
    def kv_allocated_ratio(self) -> float:
        """Bytes allocated after compression / the full prompt cache."""
        return self.kv_bytes_allocated / self.kv_bytes_before

    @classmethod
    def from_cache(
        cls, cache_layers, real_len: torch.Tensor, kv_bytes_before: int, *, layers: tuple[int, ...], evict: bool = True
    ) -> "CompressionStats":
        """Reads what each full-attention cache layer (model layer numbers
        `layers`) holds right after a prefill (compressed layers are
        `CompressedLayer`s or `PagedLayer`s, the others hold the padded
        prompt)."""
        from refreekv.integration.cache import CompressedLayer
        from refreekv.integration.paged import PagedLayer

        real_len = real_len.cpu()
        kept, held, rounding, in_use_bytes, allocated_bytes, padding_bytes = [], [], [], 0, 0, 0
        for layer in cache_layers:
            in_use, allocated = _layer_bytes(layer)
            in_use_bytes += in_use
            allocated_bytes += allocated
            layer_rounding = torch.zeros(real_len.shape, dtype=torch.float64)
            if isinstance(layer, PagedLayer):
                layer_kept = layer.kept_per_sequence()
                layer_rounding = layer.rounding_per_sequence()
                held.append(layer.held_per_sequence())
                padding_bytes += in_use - int(layer.prompt_lengths.sum()) * (layer.keys[0, 0].nbytes + layer.values[0, 0].nbytes)
                kept.append(layer_kept)
                rounding.append(layer_rounding)
                continue
            row_bytes = in_use // (layer.keys.shape[0] * layer.keys.shape[2])
            if isinstance(layer, CompressedLayer):
                layer_kept = layer.kept_per_sequence()
                held.append(layer.held_per_sequence() if evict else real_len)
                # In masking mode every prompt row stays held; the padding is what precedes the real tokens.
                padding_rows = layer.prompt_rows - (layer_kept if evict else real_len)
            else:
                layer_kept = real_len.double()
                held.append(real_len)
                padding_rows = layer.keys.shape[2] - real_len
            # Rows masked out in some heads only count as that share of a row.
            padding_bytes += round(float(padding_rows.sum()) * row_bytes)
            kept.append(layer_kept)
            rounding.append(layer_rounding)
        return cls(
            layers=tuple(layers),
            kept=torch.stack(kept),
            held=torch.stack(held).double(),
            rounding=torch.stack(rounding),
            prompt_tokens=real_len,
            kv_bytes_before=kv_bytes_before,
            kv_bytes_after=in_use_bytes,
            kv_bytes_allocated=allocated_bytes,
            kv_padding_bytes=padding_bytes,
        )

    def summary(self) -> str:
        return (
            f"kept {100 * self.budget:.2f}% of the prompt KV on average "
            f"({self.kv_bytes_after / 2**20:.2f} MiB held in {self.kv_bytes_allocated / 2**20:.2f} MiB allocated, "
            f"of {self.kv_bytes_before / 2**20:.2f} MiB)"
        )
