"""One prefill, many compressed caches: for comparing methods and settings.

The prefill forward is the same for every method (SPEC 1: compression only
changes what later tokens see), and on short answers it is most of the cost
of an evaluation. `prefill` runs it once, with the model's own attention,
and keeps each layer's post-rotary queries, keys and values and the first
generated token. `Prefill.branch(method)` then builds the cache that
`refreekv.patch(model, method)` would have held after that prefill, with the
same cuts and the same stats, without running the model again; `generate`
continues decoding from such a cache.

    prefilled = prefill(model, input_ids, attention_mask)
    for method in [make_method("snapkv", budget=0.5), make_method("refreekv")]:
        cache, stats = prefilled.branch(method)
        with refreekv.patch(model, method):  # the masks of a compressed cache
            tokens = prefilled.generate(cache, max_new_tokens=32)

Memory: the captured queries are `[b, H, n, d]` per layer, on top of the
cache, because methods such as H2O over every prompt query need all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from refreekv.compression import CompressionMethod, LayerInputs
from refreekv.compression.checks import check_bool
from refreekv.integration import compat
from refreekv.integration.cache import GrowingLayer, compress_layer
from refreekv.integration.paged import DEFAULT_BLOCK_ROWS, paged_block_rows
from refreekv.integration.stats import CompressionStats

__all__ = ["Prefill", "prefill"]


class _Capture(CompressionMethod):
    """Records every layer's prompt and keeps it whole."""

    name = "capture"

    def __init__(self):
        super().__init__(protected_layers=())
        self.layers: list[LayerInputs] = []

    def plan(self, inputs: LayerInputs) -> None:
        self.layers.append(inputs)
        return None


@dataclass
class Prefill:
    """A prompt batch after its prefill, ready to be branched.

    input_ids, attention_mask: the left-padded prompt `[b, n]` and the
        first generated token appended, `[b, n + 1]`.
    layers: per layer, what a method is handed (queries, keys, values,
        where the real tokens are).
    stats: the uncompressed cache's stats (every layer keeps everything).
    generate_options: those the first token was chosen with.
    model: the model that ran the prefill.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    layers: list[LayerInputs]
    stats: CompressionStats
    generate_options: dict[str, Any]
    model: torch.nn.Module

    @property
    def first_tokens(self) -> torch.Tensor:
        """[b] the first generated token, the same under every method."""
        return self.input_ids[:, -1]

    def branch(
        self,
        method: CompressionMethod,
        *,
        evict: bool = True,
        storage: Optional[str] = None,
        block_rows: int = DEFAULT_BLOCK_ROWS,
    ) -> tuple[Any, CompressionStats]:
        """(cache, stats) exactly as `refreekv.patch(model, method,
        evict=evict, storage=storage, block_rows=block_rows)` leaves them
        after this prefill. Layers a method does not cut share their
        tensors with the prefill; nothing is copied for them."""
        evict = check_bool("evict", evict)
        block_rows = paged_block_rows(method, storage, block_rows, evict=evict)
        first = self.layers[0]
        method.check_model(first.num_layers)
        cache_layers = []
        for inputs in self.layers:
            compressed = None
            if not method.is_protected(inputs.layer_idx, inputs.num_layers):
                compressed = compress_layer(method, inputs, inputs.value, evict=evict, paged_block_rows=block_rows)
            cache_layers.append(compressed if compressed is not None else GrowingLayer(inputs.key, inputs.value))
        cache = compat.cache_from_layers(self.model, cache_layers)
        stats = CompressionStats.from_cache(
            cache_layers, first.real_len, self.stats.kv_bytes_before, layers=self.stats.layers, evict=evict
        )
        return cache, stats

    @torch.no_grad()
    def generate(self, cache, max_new_tokens: int, **options: Any) -> torch.Tensor:
        """[b, max_new_tokens] greedy tokens from a branched cache, the first
        one included, as `model.generate` under `refreekv.patch` gives them.
        Rows are not cut at an end-of-sequence token: generation stops when
        every row has produced one (later tokens of a finished row are
        padding in a plain run, and whatever the model says here)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        first = self.first_tokens[:, None]
        options = {**self.generate_options, **options}
        options.pop("min_new_tokens", None)  # it bound the first token only
        ends = options.get("eos_token_id")
        ends = [] if ends is None else [ends] if isinstance(ends, int) else list(ends)
        if max_new_tokens == 1 or (ends and bool(torch.isin(first, torch.tensor(ends, device=first.device)).all())):
            return first  # as generate: a batch whose rows have all ended stops
        model = self.model
        if getattr(model, "_refreekv_handle", None) is None:
            raise RuntimeError("decoding from a branched cache needs the model patched (refreekv.patch) for its masks")
        output = model.generate(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            past_key_values=cache,
            max_new_tokens=max_new_tokens - 1,
            do_sample=False,
            num_beams=1,
            **options,
        )
        return torch.cat([first, output[:, self.input_ids.shape[1] :]], dim=1)


@torch.no_grad()
def prefill(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **generate_options: Any
) -> Prefill:
    """Runs the prefill of a left-padded prompt batch once and captures what
    every method needs. `generate_options` (eos_token_id, pad_token_id,
    min_new_tokens, ...) are those of the later decoding; the first token
    is chosen by `model.generate` with them, greedily."""
    from refreekv.integration.patch import PatchHandle

    layout = compat.check_supported(model)
    if len(layout.full_layers) != len(layout.kinds):
        raise ValueError(
            "a branched prefill rebuilds the cache from the captured full-attention layers, so it needs a model whose "
            f"every layer is full attention with a cache of its own; this one's layers are {list(layout.kinds)}; "
            "run refreekv.patch(model, method) once per method instead"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    capture = _Capture()
    cache = compat.new_cache(model)
    with PatchHandle(model, capture) as handle:
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            max_new_tokens=1,
            do_sample=False,
            num_beams=1,
            **generate_options,
        )
        stats = handle.stats
    mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
    return Prefill(output, mask, capture.layers, stats, generate_options, model)
