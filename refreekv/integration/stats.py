"""What a compression actually kept, read from the cache that is held."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CompressionStats"]


@dataclass(frozen=True)
class CompressionStats:
    """Per full-attention layer and per sequence, after the prefill of the
    last call. Sliding-window and linear-attention layers are not counted:
    their memory is fixed by the model, not by the prompt.

    layers: the model's layer number of each row below.
    kept: [layers, b] float64, prompt tokens each layer attends to
        afterwards, averaged over its KV heads (whole numbers unless a
        method keeps a different count per head).
    held: [layers, b] int64, prompt rows each layer holds in memory for
        the sequence: a row some head attends to (a per-head cut pads every
        head to the largest), every real row when evicted rows are masked.
    prompt_tokens: [b] int64, real (non-padding) prompt tokens.
    kv_bytes_before: bytes the full prompt cache held right after prefill.
    kv_bytes_after: bytes held after compression (padding rows included;
        with `recompress_every`, the free rows each cut leaves for the next
        tokens are not counted).
    kv_padding_bytes: bytes of held rows that are padding (left padding of
        uncompressed layers, end padding of compressed ones).
    """

    layers: tuple[int, ...]
    kept: torch.Tensor
    held: torch.Tensor
    prompt_tokens: torch.Tensor
    kv_bytes_before: int
    kv_bytes_after: int
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
        return self.kv_bytes_after / self.kv_bytes_before

    @classmethod
    def from_cache(
        cls, cache_layers, real_len: torch.Tensor, kv_bytes_before: int, *, layers: tuple[int, ...], evict: bool = True
    ) -> "CompressionStats":
        """Reads what each full-attention cache layer (model layer numbers
        `layers`) holds right after a prefill (compressed layers are
        `CompressedLayer`s, the others hold the padded prompt)."""
        from refreekv.integration.cache import CompressedLayer

        real_len = real_len.cpu()
        kept, held, held_bytes, padding_bytes = [], [], 0, 0
        for layer in cache_layers:
            row_bytes = (layer.keys.nbytes + layer.values.nbytes) // (layer.keys.shape[0] * layer.keys.shape[2])
            held_bytes += layer.keys.nbytes + layer.values.nbytes
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
        return cls(
            layers=tuple(layers),
            kept=torch.stack(kept),
            held=torch.stack(held),
            prompt_tokens=real_len,
            kv_bytes_before=kv_bytes_before,
            kv_bytes_after=held_bytes,
            kv_padding_bytes=padding_bytes,
        )

    def summary(self) -> str:
        return (
            f"kept {100 * self.budget:.2f}% of the prompt KV on average "
            f"({self.kv_bytes_after / 2**20:.2f} MiB held, of {self.kv_bytes_before / 2**20:.2f} MiB)"
        )
