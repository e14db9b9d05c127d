"""What a compression actually kept, read from the cache that is held."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CompressionStats"]


@dataclass(frozen=True)
class CompressionStats:
    """Per layer and per sequence, after the prefill of the last call.

    kept: [layers, b] int64, prompt tokens each layer attends to afterwards.
    prompt_tokens: [b] int64, real (non-padding) prompt tokens.
    kv_bytes_before: bytes the full prompt cache held right after prefill.
    kv_bytes_after: bytes held after compression (padding rows included).
    kv_padding_bytes: bytes of held rows that are padding (left padding of
        uncompressed layers, end padding of compressed ones).
    """

    kept: torch.Tensor
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
    def kv_bytes_ratio(self) -> float:
        return self.kv_bytes_after / self.kv_bytes_before

    def summary(self) -> str:
        return (
            f"kept {100 * self.budget:.2f}% of the prompt KV on average "
            f"({self.kv_bytes_after / 2**20:.2f} MiB held, of {self.kv_bytes_before / 2**20:.2f} MiB)"
        )
