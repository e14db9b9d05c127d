"""Prompts that arrive in several forwards before the first generated token
(SPEC 11): chunked prefill.

A forward on an empty cache starts a prompt. The prompt is as long as that
forward, unless the cache was declared for a longer one
(`declare_prompt`: `PatchHandle.new_cache(prompt_length=...)`, and the
patched `generate` with `prefill_chunk_size`): the forwards that follow are
then pieces of the same prompt until it has every declared position. That
declaration is how the end of a prompt is recognised; nothing else tells a
piece of a prompt from a question appended to a compressed one.

`PromptFill` is the bookkeeping of a prompt being filled, kept on its cache
between pieces: where the real tokens are, and, in exact mode, what the cut
after the last piece reads of the earlier ones (the newest queries each
layer's method reads, or the per-key sums of every query's attention for a
method that reads them all).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from refreekv.compression import CompressionMethod, LayerInputs
from refreekv.compression.checks import is_integer

__all__ = [
    "EXACT", "PREFILL_MODES", "STREAMING", "PromptFill", "check_prefill_mode", "declare_prompt", "declared_length",
    "newest_queries",
]  # fmt: skip

EXACT, STREAMING = "exact", "streaming"
PREFILL_MODES = (EXACT, STREAMING)


def check_prefill_mode(prefill) -> str:
    if prefill not in PREFILL_MODES:
        raise ValueError(
            f"prefill must be one of {', '.join(map(repr, PREFILL_MODES))} (how a prompt that arrives in pieces is "
            f"cut: once after its last piece, or after every piece), got {prefill!r}"
        )
    return prefill


def declare_prompt(cache, length) -> None:
    """Marks an empty `cache` as one whose prompt has `length` positions
    (left padding included) and may arrive in several forwards."""
    if not is_integer(length) or length < 1:
        raise ValueError(f"prompt_length must be an integer >= 1 (the prompt's positions, padding included), got {length!r}")
    held = cache.get_seq_length()
    if held:
        raise ValueError(f"a prompt length can only be declared on an empty cache; this one already holds {held} positions")
    cache._refreekv_prompt_length = int(length)


def declared_length(cache) -> Optional[int]:
    return getattr(cache, "_refreekv_prompt_length", None)


def newest_queries(held: Optional[torch.Tensor], query: torch.Tensor, rows: int) -> torch.Tensor:
    """The newest `rows` queries [b, H, <= rows, d] of those `held` from
    earlier forwards (or None) followed by this forward's `query`."""
    query = query.detach()
    if held is not None and rows > query.shape[2]:
        query = torch.cat([held, query], dim=2)
    # A copy when slicing, so that a long forward's queries are not kept alive whole.
    return query if query.shape[2] <= rows else query[:, :, -rows:].clone()


class PromptFill:
    """A prompt being prefilled, in one forward or in pieces.

    length: the positions the whole prompt spans (padding included).
    patch: the name of the patch that began it.
    prompt_valid: [b, received] bool, the pieces' padding masks so far.
    final: whether the forward under way brings the last piece.
    piece_length: positions the forward under way brings.
    pieces: forwards received, the one under way included.
    kv_bytes_before: bytes the full-attention layers' uncompressed prompt
        rows take (what an unpatched model holds after the prompt).
    seen_layers: full-attention layers whose attention ran in the forward
        under way.
    cutting: whether the forward under way cuts the layers over every row
        so far: it brings the last piece, or, in streaming mode, the first
        piece after which every sequence has a real token.
    cut: whether the layers were cut in an earlier piece (streaming mode):
        the forward under way then re-cuts them after it.
    decoding: the patch's decode-time bookkeeping, carried from the first
        piece to the cache record.
    """

    def __init__(self, length: int, *, patch: str):
        self.length = length
        self.patch = patch
        self.prompt_valid: Optional[torch.Tensor] = None
        self.final = False
        self.piece_length = 0
        self.pieces = 0
        self.kv_bytes_before = 0
        self.seen_layers: set[int] = set()
        self.cutting = False
        self.cut = False
        self.decoding = None
        self._queries: dict[int, torch.Tensor] = {}  # layer -> [b, H, rows, d], the newest queries
        self._summed: dict[int, torch.Tensor] = {}  # layer -> [b, Hkv, length] float32

    @property
    def received(self) -> int:
        return 0 if self.prompt_valid is None else self.prompt_valid.shape[1]

    @property
    def real_len(self) -> torch.Tensor:
        return self.prompt_valid.sum(-1)

    def add_piece(self, attention_mask, batch: int, tokens: int, device) -> None:
        """Takes the next forward's `tokens` positions, with its
        `attention_mask` (None, or 2-D over every position so far), and
        checks the padding: left padding only, a real token per sequence
        once the prompt is whole."""
        received = self.received
        if tokens == 0:
            raise ValueError("refreekv got an empty prompt (0 tokens); a prefill needs at least one token per sequence")
        if received + tokens > self.length:
            raise ValueError(
                f"this forward brings {tokens} positions to a prompt declared with {self.length}, of which {received} "
                f"arrived already: {received + tokens} would pass the declared length"
            )
        if self.prompt_valid is not None and self.prompt_valid.shape[0] != batch:
            raise ValueError(f"a piece of a prompt of {self.prompt_valid.shape[0]} sequences came with {batch}")
        if attention_mask is None:
            piece = torch.ones(batch, tokens, dtype=torch.bool, device=device)
        elif attention_mask.dim() != 2:
            raise ValueError(
                f"refreekv needs a 2-D padding mask [batch, length] at prefill, got a {attention_mask.dim()}-D attention_mask"
            )
        elif attention_mask.shape[1] != received + tokens:
            raise ValueError(
                f"a piece of a prompt needs the padding mask of every position so far (2-D, {received + tokens} "
                f"columns: {received} received before and {tokens} in this forward), got {attention_mask.shape[1]} columns"
            )
        else:
            piece = attention_mask[:, received:].to(device=device, dtype=torch.bool)
        prompt_valid = piece if self.prompt_valid is None else torch.cat([self.prompt_valid, piece], dim=1)
        padded_after = (prompt_valid.long().diff(dim=-1) < 0).any(-1).nonzero().flatten().tolist()
        if padded_after:
            raise ValueError(
                "refreekv expects left-padded prompts (tokenizer.padding_side = 'left'); the attention_mask has "
                f"padding after a real token in rows {padded_after} of the batch"
            )
        final = received + tokens == self.length
        empty = (prompt_valid.sum(-1) == 0).nonzero().flatten().tolist()
        if final and empty:
            raise ValueError(
                f"refreekv got sequences without a real token: the attention_mask is all padding in rows {empty} of "
                f"the batch of {batch}; every sequence needs at least one real token"
            )
        self.prompt_valid, self.final, self.piece_length = prompt_valid, final, tokens
        self.pieces += 1
        self.seen_layers = set()

    def has_real_tokens(self) -> bool:
        """Whether every sequence has a real token among the positions so far."""
        return bool((self.real_len > 0).all())

    # -- what the cut after the last piece reads of the earlier ones -----------

    def hold_signal(self, method: CompressionMethod, inputs: LayerInputs) -> None:
        """Keeps what a cut over every row so far will read of this piece
        (`inputs`: its queries over those rows): its newest queries and,
        for a method that sums every query, their attention sums."""
        rows = method.prefill_query_rows(self.length)
        self._queries[inputs.layer_idx] = newest_queries(self._queries.get(inputs.layer_idx), inputs.query, rows)
        if method.sums_every_query:
            piece = inputs.importance(inputs.query_rows, normalize=False, group_reduce="mean")
            summed = self._summed.get(inputs.layer_idx)
            if summed is not None:  # over the earlier rows: this piece's keys add columns
                piece = piece + F.pad(summed, (0, piece.shape[2] - summed.shape[2]))
            self._summed[inputs.layer_idx] = piece

    def signal_inputs(self, method: CompressionMethod, inputs: LayerInputs) -> LayerInputs:
        """The inputs of a cut over every row so far (`inputs`: this
        forward's queries over them): what one forward of those rows would
        have handed the method."""
        if self.pieces == 1:
            return inputs  # the rows came in one forward
        self.hold_signal(method, inputs)
        query = self._queries.pop(inputs.layer_idx)
        query = query[:, :, query.shape[2] - min(method.prefill_query_rows(inputs.prompt_len), query.shape[2]) :]
        return replace(inputs, query=query, summed_importance=self._summed.pop(inputs.layer_idx, None))
