"""A context compressed once, many questions (SPEC 11).

Retrieval and chat systems ask several questions about one long document.
`PatchHandle.compress_context` prefills and cuts the document alone, with
no question after it: the cut is question-agnostic (its signal is the
context's own end). Each question is then answered from a copy of that
compressed cache, so the shared cache is never changed by answering:

    with refreekv.patch(model, "coverage") as kv:
        context = kv.compress_context(document_ids)
        for question_ids in questions:
            answer = context.generate(question_ids, max_new_tokens=32)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch

from refreekv.compression.checks import is_integer
from refreekv.integration.stats import CompressionStats

__all__ = ["CompressedContext", "compress_context"]


@dataclass
class CompressedContext:
    """A context cut under a patch, ready to be asked questions.

    input_ids, attention_mask: the context [b, n] and its padding mask.
    stats: what the cut kept (as `PatchHandle.stats` reports it).
    """

    handle: Any  # the PatchHandle that cut it
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    stats: CompressionStats
    _cache: Any

    def cache(self):
        """A copy of the compressed cache, for a caller that continues it
        itself (under the patch that compressed it)."""
        self._check_handle()
        return copy.deepcopy(self._cache)

    def generate(self, question_ids: torch.Tensor, **generate_options: Any) -> torch.Tensor:
        """`model.generate` on the context followed by `question_ids`
        ([b, q] real tokens, no padding: the same length for every
        sequence), from a copy of the compressed cache; returns what
        generate returns (its sequences include the context and the
        question). The compressed cache is left as it was."""
        self._check_handle()
        batch = self.input_ids.shape[0]
        if question_ids.dim() != 2 or question_ids.shape[0] != batch or question_ids.shape[1] < 1:
            raise ValueError(
                f"question_ids must be [batch, tokens] with the context's batch of {batch} and at least one token, "
                f"got shape {tuple(question_ids.shape)}"
            )
        for name in ("input_ids", "attention_mask", "past_key_values", "inputs_embeds", "prefill_chunk_size"):
            if name in generate_options:
                raise ValueError(f"CompressedContext.generate sets {name} itself; got {name}={generate_options[name]!r}")
        question_ids = question_ids.to(self.input_ids.device)
        input_ids = torch.cat([self.input_ids, question_ids], dim=1)
        attention_mask = torch.cat([self.attention_mask, torch.ones_like(question_ids, dtype=self.attention_mask.dtype)], dim=1)
        model = self.handle.model
        return model.generate(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=copy.deepcopy(self._cache),
            **generate_options,
        )  # fmt: skip

    def _check_handle(self) -> None:
        handle = self.handle
        if handle._hooks is None or getattr(handle.model, "_refreekv_handle", None) is not handle:
            raise RuntimeError(
                "the refreekv patch that compressed this context was removed: its rows were cut for that patch, "
                "whose attention reads them. Compress the context again under the patch now in place"
            )


@torch.no_grad()
def compress_context(
    handle, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *, chunk_size: Optional[int] = None
) -> CompressedContext:
    """See `PatchHandle.compress_context`."""
    handle._check_in_place()
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the context's shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    length = input_ids.shape[1]
    if chunk_size is not None and (not is_integer(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    step = length if chunk_size is None else int(chunk_size)
    cache = handle.new_cache(prompt_length=length)
    model = handle.model
    # Positions count real tokens, as generate numbers a left-padded prompt
    # (and so the question that follows it).
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    for start in range(0, length, step):
        end = min(start + step, length)
        model(
            input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
            position_ids=position_ids[:, start:end], past_key_values=cache, use_cache=True, logits_to_keep=1,
        )  # fmt: skip
    record = cache._refreekv
    record.context = True
    return CompressedContext(handle, input_ids, attention_mask, record.stats, cache)
