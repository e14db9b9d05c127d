"""`refreekv.patch`: compress a transformers model's KV cache after prefill.

How it plugs in (transformers' public extension points, no forward replaced):

* an attention function, registered under a name of its own and set as the
  model's attention implementation, wraps the model's own eager or sdpa
  attention. On the prefill forward it lets the layer attend over the whole
  prompt, then asks the compression method which rows to keep and replaces
  the layer's cache with a `CompressedLayer`. On later forwards it maps the
  mask transformers built (for the uncompressed geometry) onto the rows the
  layer actually holds;
* a forward pre-hook on the decoder model supplies a cache when the caller
  gave none, and tells prefill (an empty cache) from decoding;
* a forward hook reads what was kept into `stats` once prefill is done.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from refreekv.compression import CompressionMethod, LayerInputs, make_method
from refreekv.integration import compat
from refreekv.integration.cache import CompressedLayer, compress_layer
from refreekv.integration.recompress import DecodeCompression, Timeline, recompress_layer
from refreekv.integration.stats import CompressionStats

__all__ = ["PatchHandle", "patch"]


def patch(
    model: torch.nn.Module,
    method: str | CompressionMethod = "refreekv",
    *,
    evict: bool = True,
    recompress_every: Optional[int] = None,
    max_cache_tokens: Optional[int] = None,
    **options: Any,
) -> "PatchHandle":
    """Compress `model`'s KV cache after every prefill and, optionally, every
    `recompress_every` generated tokens.

    Args:
        model: a decoder-only causal LM from transformers whose attention
            goes through its attention-function registry, with eager or
            sdpa attention (see `compat.check_supported`; the verified
            families are `compat.VERIFIED_FAMILIES`). Full-attention layers
            are compressed; sliding-window and linear-attention layers are
            left to transformers.
        method: a name from `refreekv.methods()` or a method instance.
        evict: remove the evicted rows from the cache (default). With False
            they are kept but masked out, which computes the same outputs
            without saving memory; it exists to verify eviction.
        recompress_every: None (default) compresses once, after prefill
            (SPEC 1). An integer N >= 1 also re-cuts every compressed layer
            after every N generated tokens, over all the rows it holds,
            with the newest tokens' queries as the signal (SPEC 8), so the
            cache stays bounded while generating.
        max_cache_tokens: with `recompress_every`, the rows each layer may
            hold per sequence after an event, for the fixed-budget methods
            (streamingllm, h2o, snapkv, pyramidkv; required for them, refused
            for the others, which set their own budget).
        **options: the method's options (see `refreekv.methods()`).

    Returns:
        A `PatchHandle`: a context manager with `.remove()` and `.stats`.
    """
    if isinstance(method, CompressionMethod):
        if options:
            raise TypeError(f"options {sorted(options)} given with a method instance; set them on the instance")
        resolved = method
    else:
        resolved = make_method(method, **options)
    return PatchHandle(model, resolved, evict=evict, recompress_every=recompress_every, max_cache_tokens=max_cache_tokens)


@dataclass
class _Prefill:
    """Bookkeeping of the prefill forward in progress."""

    prompt_valid: torch.Tensor  # [b, n] bool
    real_len: torch.Tensor  # [b] int64
    kv_bytes_before: int = 0
    seen_layers: set = field(default_factory=set)  # full-attention layers whose attention ran


@dataclass
class _Decoding:
    """Bookkeeping of decode-time compression since the last prefill."""

    generated: int = 0  # tokens appended since the prefill
    events_done: int = 0
    event_due: bool = False
    variants: dict = field(default_factory=dict)  # layer -> AttentionVariant, for the layers it re-cuts
    queries: dict = field(default_factory=dict)  # layer -> [b, H, q, d] newest queries
    timeline: Timeline = field(default_factory=Timeline)

    def advance(self, tokens: int, every: int) -> None:
        self.generated += tokens
        self.event_due = self.generated // every > self.events_done
        if self.event_due:
            self.events_done = self.generated // every

    def keep_queries(self, layer_idx: int, query: torch.Tensor, rows: int) -> None:
        query = query.detach()
        held = self.queries.get(layer_idx)
        if held is not None and rows > query.shape[2]:
            query = torch.cat([held, query], dim=2)
        # A copy when slicing, so a long chunk's queries are not kept alive whole.
        self.queries[layer_idx] = query if query.shape[2] <= rows else query[:, :, -rows:].clone()


class PatchHandle:
    """A patched model. Use as a context manager or call `remove()`."""

    def __init__(
        self,
        model: torch.nn.Module,
        method: CompressionMethod,
        *,
        evict: bool = True,
        recompress_every: Optional[int] = None,
        max_cache_tokens: Optional[int] = None,
    ):
        if getattr(model, "_refreekv_handle", None) is not None:
            raise RuntimeError("this model is already patched by refreekv; call .remove() on the existing handle first")
        self.layout = compat.check_supported(model)
        self.model = model
        self.method = method
        self.evict = evict
        self.num_layers = model.config.num_hidden_layers
        method.check_model(self.num_layers)
        self.decode = DecodeCompression.configure(method, recompress_every, max_cache_tokens)
        self._full_layers = frozenset(self.layout.full_layers)
        self._base_implementation = model.config._attn_implementation
        self._base_attention = compat.base_attention_function(
            model.model.layers[self.layout.full_layers[0]].self_attn, self._base_implementation
        )
        self._name = f"refreekv_{id(self):x}"
        self._decoder = model.model
        self._decoder_signature = inspect.signature(self._decoder.forward)
        self._cache = None
        self._prefill: Optional[_Prefill] = None
        self._stats: Optional[CompressionStats] = None
        # The decode-time state of the cache being decoded (it travels with
        # the cache: a copied cache continues on its own), and the last one.
        self._decoding: Optional[_Decoding] = None
        self._last_decoding = _Decoding()

        compat.register_attention(self._name, self._attention, self._base_implementation)
        model.config._attn_implementation = self._name
        self._hooks = [
            self._decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self._decoder.register_forward_hook(self._after_forward, with_kwargs=True),
        ]
        model._refreekv_handle = self

    # -- public -------------------------------------------------------------

    @property
    def stats(self) -> CompressionStats:
        """What the last prefill kept (see `CompressionStats`)."""
        if self._stats is None:
            raise RuntimeError("no prefill has run since the model was patched")
        return self._stats

    @property
    def timeline(self) -> Timeline:
        """The decode-time compression events since the last prefill (empty
        without `recompress_every`)."""
        return self._last_decoding.timeline

    def remove(self) -> None:
        """Restores the model exactly as it was. Removing twice does nothing."""
        if self._hooks is None:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = None
        self.model.config._attn_implementation = self._base_implementation
        compat.unregister_attention(self._name)
        del self.model._refreekv_handle
        self._cache = self._prefill = None

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._hooks is None else "active"
        return f"PatchHandle({self.method!r}, evict={self.evict}, {state})"

    # -- hooks --------------------------------------------------------------

    def _before_forward(self, module, args, kwargs):
        bound = self._decoder_signature.bind_partial(*args, **kwargs).arguments
        cache = bound.get("past_key_values")
        use_cache = bound.get("use_cache")
        if use_cache is None:
            use_cache = self.model.config.use_cache
        if cache is None and use_cache:
            # The decoder would create this cache itself; creating it here lets
            # the attention function find it.
            cache = compat.new_cache(self.model)
            kwargs["past_key_values"] = cache
        self._cache = cache
        self._prefill = None
        self._decoding = None
        tokens = bound.get("input_ids")
        if tokens is None:
            tokens = bound.get("inputs_embeds")
        if cache is None or tokens is None:
            return args, kwargs  # nothing to compress (the model reports missing inputs itself)
        if cache.get_seq_length() == 0:
            compat.check_cache(cache)
            self._prefill = self._start_prefill(bound.get("attention_mask"), tokens.shape[0], tokens.shape[1], tokens.device)
            if self.decode is not None:
                self._decoding = self._last_decoding = _Decoding()
                cache._refreekv_decoding = (self._name, self._decoding)
        elif self.decode is not None:
            owner, self._decoding = getattr(cache, "_refreekv_decoding", (None, None))
            if owner != self._name:
                raise RuntimeError(
                    "decode-time compression (recompress_every) continues a cache that this patch prefilled; this "
                    "cache was filled elsewhere (before patching, by another patch or by a branched prefill)"
                )
            self._last_decoding = self._decoding
            self._decoding.advance(tokens.shape[1], self.decode.every)
        return args, kwargs

    def _after_forward(self, module, args, kwargs, output):
        if self._prefill is not None:
            prefill, self._prefill = self._prefill, None
            missed = sorted(self._full_layers - prefill.seen_layers)
            if missed:
                raise RuntimeError(
                    f"the attention of layers {missed} did not go through transformers' attention-function registry "
                    "during prefill, so refreekv could not compress them; this model is not supported"
                )
            self._stats = self._read_stats(prefill)
        elif self._decoding is not None and self._decoding.event_due:
            self._recompress()

    @staticmethod
    def _start_prefill(attention_mask, batch: int, length: int, device) -> _Prefill:
        if attention_mask is None:
            prompt_valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        elif attention_mask.dim() != 2:
            raise ValueError(
                f"refreekv needs a 2-D padding mask [batch, length] at prefill, got a {attention_mask.dim()}-D attention_mask"
            )
        else:
            prompt_valid = attention_mask.to(device=device, dtype=torch.bool)
        real_len = prompt_valid.sum(-1)
        left_padded = (prompt_valid.long().diff(dim=-1) >= 0).all()
        if not bool(left_padded) or bool((real_len == 0).any()):
            raise ValueError(
                "refreekv expects left-padded prompts with at least one real token each "
                "(tokenizer.padding_side = 'left'); got an attention_mask with padding elsewhere"
            )
        return _Prefill(prompt_valid=prompt_valid, real_len=real_len)

    # -- the attention function ---------------------------------------------

    def _attention(self, module, query, key, value, attention_mask, **kwargs):
        layer_idx = module.layer_idx
        if self._prefill is not None:
            output = self._base_attention(module, query, key, value, attention_mask, **kwargs)
            if layer_idx in self._full_layers:
                self._compress(module, query, key, value, kwargs)
            return output
        source = self.layout.cache_source[layer_idx]
        layer = self._cache.layers[source] if self._cache is not None and source is not None else None
        if self._decoding is not None and layer_idx in self._decoding.variants:
            self._decoding.keep_queries(layer_idx, query, self.decode.query_rows)
        if isinstance(layer, CompressedLayer):
            attention_mask = self._held_rows_mask(layer, attention_mask, query, key.shape[2])
        if compat.masked_sdpa_applies(self._base_implementation, query, attention_mask):
            return compat.masked_sdpa_attention(module, query, key, value, attention_mask, **kwargs)
        return self._base_attention(module, query, key, value, attention_mask, **kwargs)

    def _compress(self, module, query, key, value, attention_kwargs: dict) -> None:
        layer_idx = module.layer_idx
        prefill = self._prefill
        prefill.seen_layers.add(layer_idx)
        prefill.kv_bytes_before += key.nbytes + value.nbytes
        if self.method.is_protected(layer_idx, self.num_layers):
            return
        variant = compat.attention_variant(module, self._base_attention, attention_kwargs)
        if self.decode is not None:
            self._decoding.variants[layer_idx] = variant
        inputs = LayerInputs(
            query=query,
            key=key,
            scaling=variant.scaling,
            layer_idx=layer_idx,
            num_layers=self.num_layers,
            prompt_valid=prefill.prompt_valid,
            real_len=prefill.real_len,
            value=value,
            softcap=variant.softcap,
            sinks=variant.sinks,
        )
        headroom = None if self.decode is None else self.decode.every
        compressed = compress_layer(self.method, inputs, value, evict=self.evict, headroom=headroom)
        if self.decode is not None:
            if compressed is None:  # kept whole, but re-cut later: a compressed layer holding everything
                padding = None if bool(prefill.prompt_valid.all()) else prefill.prompt_valid[:, None, :]
                compressed = CompressedLayer(key, value, padding, evicted=0)
            compressed.recompressing = True
        if compressed is not None:
            self._cache.layers[layer_idx] = compressed

    def _recompress(self) -> None:
        """A decode-time event (SPEC 8): every compressed layer re-cuts the
        rows it holds, after the forward of the step that made it due."""
        decoding = self._decoding
        for layer_idx, variant in decoding.variants.items():
            new_layer, event = recompress_layer(
                self.method, self._cache.layers[layer_idx], decoding.queries[layer_idx], variant,
                layer_idx=layer_idx, num_layers=self.num_layers, max_tokens=self.decode.max_cache_tokens,
                step=decoding.generated, evict=self.evict, headroom=self.decode.every,
            )  # fmt: skip
            self._cache.layers[layer_idx] = new_layer
            decoding.timeline.events.append(event)
        decoding.event_due = False

    def _held_rows_mask(self, layer: CompressedLayer, mask, query, kv_length: int):
        """The mask for the rows a compressed layer holds: its prompt rows
        where valid, then the appended tokens as transformers' mask (built
        for the uncompressed geometry) has them."""
        batch, heads, q_length, _ = query.shape
        prompt_rows = layer.prompt_rows
        appended = kv_length - prompt_rows
        if layer.prompt_valid is None and mask is None:
            return None  # plain causal attention over everything held
        if mask is None:
            # Causal among the appended tokens; the queries are the last ones.
            query_pos = torch.arange(q_length, device=query.device) + (appended - q_length)
            new = (torch.arange(appended, device=query.device)[None, :] <= query_pos[:, None])[None, None]
        else:
            tail = mask[..., mask.shape[-1] - appended :]
            new = tail if tail.dtype == torch.bool else tail == 0
        if layer.prompt_valid is None:
            prompt = torch.ones(1, 1, 1, prompt_rows, dtype=torch.bool, device=query.device)
        else:
            prompt = layer.prompt_valid[:, :, None, :]
            if prompt.shape[1] > 1:  # per KV head: expand to the query heads
                prompt = prompt.repeat_interleave(heads // prompt.shape[1], dim=1)
        mask_heads = max(prompt.shape[1], new.shape[1])
        held = torch.cat(
            [prompt.expand(batch, mask_heads, q_length, -1), new.expand(batch, mask_heads, q_length, -1)], dim=-1
        )
        if self._base_implementation == "eager":
            return torch.zeros(held.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~held, torch.finfo(query.dtype).min
            )
        return held

    # -- stats --------------------------------------------------------------

    def _read_stats(self, prefill: _Prefill) -> CompressionStats:
        full_layers = self.layout.full_layers
        return CompressionStats.from_cache(
            [self._cache.layers[i] for i in full_layers], prefill.real_len, prefill.kv_bytes_before,
            evict=self.evict, layers=full_layers,
        )  # fmt: skip
