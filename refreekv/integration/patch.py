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
* a forward hook, which runs even when the forward raises, reads what was
  kept into `stats` once prefill is done;
* `model.generate` is wrapped on the instance to refuse, before anything
  runs, the generation modes that verify draft tokens (assisted decoding,
  prompt lookup): they need a cache they can crop back to any length.

State of a call (the forward in progress, what its prefill kept) is kept
per thread: transformers runs the hooks and the attention function in the
thread that calls the model, so threads sharing a patched model do not see
each other's calls. A cache carries what its own prefill kept, so whichever
call continues it reports and re-cuts that cache.
"""

from __future__ import annotations

import inspect
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from refreekv.compression import CompressionMethod, LayerInputs, make_method
from refreekv.compression.checks import check_bool
from refreekv.integration import compat
from refreekv.integration.cache import CompressedLayer, compress_layer, whole_layer
from refreekv.integration.forwards import patched_forward_began, patched_forward_ended
from refreekv.integration.paged import DEFAULT_BLOCK_ROWS, PagedLayer, paged_block_rows
from refreekv.integration.pieces import (
    EXACT, STREAMING, PromptFill, check_prefill_mode, declare_prompt, declared_length, newest_queries,
)
from refreekv.integration.recompress import DecodeCompression, Timeline, recompress_layer
from refreekv.integration.stats import CompressionStats

__all__ = ["PatchHandle", "patch"]


def patch(
    model: torch.nn.Module,
    method: str | CompressionMethod = "refreekv",
    *,
    evict: bool = True,
    prefill: str = EXACT,
    recompress_every: Optional[int] = None,
    max_cache_tokens: Optional[int] = None,
    storage: Optional[str] = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
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
        prefill: how a prompt that arrives in several forwards (SPEC 11;
            `generate(prefill_chunk_size=...)`, or a cache from
            `PatchHandle.new_cache(prompt_length=...)` filled by hand) is
            cut. "exact" (default): once, after its last piece, exactly as
            if it had come in one forward (its memory peaks at the whole
            prompt, as without chunks). "streaming": the first piece is cut
            as a prompt, every later one re-cuts the rows held by the rules
            of decode-time compression (SPEC 8; fixed-budget methods then
            need `max_cache_tokens`), so a layer never holds more than its
            kept rows plus one piece. A different method from the
            one-forward cut, with its own quality.
        recompress_every: None (default) compresses once, after prefill
            (SPEC 1). An integer N >= 1 also re-cuts every compressed layer
            after every N generated tokens, over all the rows it holds,
            with the newest tokens' queries as the signal (SPEC 8), so the
            cache stays bounded while generating.
        max_cache_tokens: with `recompress_every` or streaming prefill, the
            rows each layer may hold per sequence after a re-cut, for the
            fixed-budget methods
            (`refreekv.compression.fixed_budget_methods()`; required for
            them, refused for the others, which set their own budget).
        storage: how compressed layers hold their rows (SPEC 10).
            "padded": every head of a sequence at the largest head's count,
            the others masked; "paged": each (sequence, KV head) at its
            own count, in blocks of `block_rows` rows, attended to by
            `refreekv.paged_attention`. None (default) picks "paged" for
            methods whose heads keep different counts
            (`method.per_head_counts`) and "padded" for the others.
            Paged storage needs `evict=True`, and refuses beam search.
        block_rows: rows per block of paged storage.
        **options: the method's options (see `refreekv.methods()`).

    Returns:
        A `PatchHandle`: a context manager with `.remove()` and `.stats`.
    """
    evict = check_bool("evict", evict)
    if isinstance(method, CompressionMethod):
        if options:
            raise TypeError(f"options {sorted(options)} given with a method instance; set them on the instance")
        resolved = method
    else:
        resolved = make_method(method, **options)
    return PatchHandle(
        model, resolved, evict=evict, prefill=prefill, recompress_every=recompress_every,
        max_cache_tokens=max_cache_tokens, storage=storage, block_rows=block_rows,
    )  # fmt: skip


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
        self.queries[layer_idx] = newest_queries(self.queries.get(layer_idx), query, rows)


@dataclass
class _Forward:
    """The decoder forward in progress in one thread."""

    cache: Any  # the DynamicCache it reads and fills; None without a cache
    prefill: Optional[PromptFill] = None  # a piece of a prompt (the whole prompt in one forward)
    decoding: Optional[_Decoding] = None
    query_rows: Optional[int] = None  # newest queries each re-cut layer keeps, when a re-cut may follow
    recut_piece: bool = False  # a streaming piece, attended to as held and re-cut after the forward


@dataclass
class _CacheRecord:
    """What a patch leaves on a cache it prefilled (as `cache._refreekv`), so
    that any later call continuing the cache, in any thread, reports and
    re-cuts that cache (a copied cache continues on its own)."""

    patch: str  # the name of the patch that prefilled it
    stats: CompressionStats
    decoding: Optional[_Decoding]  # with recompress_every
    context: bool = False  # cut by `compress_context`: a question may follow in one forward
    untouched: bool = True  # nothing appended since the cut


class _ThreadState(threading.local):
    """The calls of one thread: each thread that calls a patched model gets
    its own (threading.local runs `__init__` once per thread)."""

    def __init__(self):
        self.forward: Optional[_Forward] = None
        self.stats: Optional[CompressionStats] = None
        self.no_stats = "no prefill has run since the model was patched (stats describe the calling thread's last call)"
        self.timeline = Timeline()

    def report(self, record: _CacheRecord) -> None:
        self.stats = record.stats
        self.timeline = Timeline() if record.decoding is None else record.decoding.timeline

    def compressed_nothing(self, why: str) -> None:
        self.stats = None
        self.no_stats = f"the last call in this thread compressed nothing: {why}"
        self.timeline = Timeline()


# Every patch registers its attention function under a name of its own; a
# count, unlike id(), is never reused by a later patch, so a cache's record
# names the patch that prefilled it for good.
_PATCH_NUMBERS = itertools.count()

# generate() options that make it verify draft tokens (assisted decoding):
# transformers' GenerationConfig.get_generation_mode, with assistant_model.
_DRAFT_OPTIONS = ("prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


class PatchHandle:
    """A patched model. Use as a context manager or call `remove()`."""

    def __init__(
        self,
        model: torch.nn.Module,
        method: CompressionMethod,
        *,
        evict: bool = True,
        prefill: str = EXACT,
        recompress_every: Optional[int] = None,
        max_cache_tokens: Optional[int] = None,
        storage: Optional[str] = None,
        block_rows: int = DEFAULT_BLOCK_ROWS,
    ):
        self.prefill = check_prefill_mode(prefill)
        self.paged_block_rows = paged_block_rows(method, storage, block_rows, evict=evict)
        existing = getattr(model, "_refreekv_handle", None)
        if existing is not None:
            if not existing._copied:
                raise RuntimeError("this model is already patched by refreekv; call .remove() on the existing handle first")
            existing.remove()  # the copied hooks of a copy of a patched model: the copy is patched in its own right
        self.layout = compat.check_supported(model)
        self.model = model
        self.method = method
        self.evict = evict
        self.num_layers = model.config.num_hidden_layers
        method.check_model(self.num_layers)
        self.decode = DecodeCompression.configure(
            method, recompress_every, max_cache_tokens, streaming=self.prefill == STREAMING
        )
        self._full_layers = frozenset(self.layout.full_layers)
        self._base_implementation = model.config._attn_implementation
        self._base_attention = compat.base_attention_function(
            model.model.layers[self.layout.full_layers[0]].self_attn, self._base_implementation
        )
        self._name = f"refreekv_{next(_PATCH_NUMBERS)}"
        self._decoder = model.model
        self._decoder_signature = inspect.signature(self._decoder.forward)
        self._thread = _ThreadState()
        self._copied = False  # set on the copy a copy of the patched model carries (see __getstate__)

        compat.register_attention(self._name, self._attention, self._base_implementation)
        model.config._attn_implementation = self._name
        self._hooks = [
            self._decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self._decoder.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True),
        ]
        self._shadowed_generate = vars(model).get("generate")  # an instance's own generate, put back on remove()
        self._model_generate = model.generate
        model.generate = self._generate
        model._refreekv_handle = self

    # -- public -------------------------------------------------------------

    @property
    def stats(self) -> CompressionStats:
        """What the prefill of the calling thread's last call kept (see
        `CompressionStats`). A call is a forward of the model or a
        `generate`; one that continues a cache this patch prefilled reports
        that cache's prefill. Each thread reads its own calls, so threads
        sharing the model do not see each other's figures.

        Raises RuntimeError, saying why, when that call compressed nothing:
        it ran without a cache (use_cache=False), raised before its prefill
        finished, or continued a cache this patch did not prefill."""
        thread = self._thread
        if thread.stats is None:
            raise RuntimeError(thread.no_stats)
        return thread.stats

    @property
    def timeline(self) -> Timeline:
        """The decode-time compression events of the cache the calling
        thread's last call used, since its prefill (empty without
        `recompress_every`, or when that call compressed nothing)."""
        return self._thread.timeline

    def new_cache(self, prompt_length: Optional[int] = None):
        """An empty cache for the model. With `prompt_length` (positions,
        left padding included), the prompt that fills it may arrive in
        several forwards (a hand-written chunked prefill, each forward
        given the padding mask of every position so far): they are pieces
        of one prompt until it has all `prompt_length` positions, cut as
        the patch's `prefill` mode says. Without it, the first forward is
        the whole prompt, and a second forward of several tokens right
        after it is refused (it would have been cut too early)."""
        cache = compat.new_cache(self.model)
        if prompt_length is not None:
            declare_prompt(cache, prompt_length)
        return cache

    def compress_context(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *, chunk_size: Optional[int] = None):
        """Prefills and cuts a context with no question after it (SPEC
        11): the cut's signal is the context's own end (or, in streaming
        mode, each piece's). Returns a `CompressedContext`, whose
        `generate(question_ids, ...)` answers each question from a copy of
        the compressed cache, leaving it as it is.

        Args:
            input_ids: [b, n] the context, left-padded.
            attention_mask: [b, n] its padding mask (None: no padding).
            chunk_size: prefill in pieces of this many positions (bounded
                memory in streaming mode); None: one forward.
        """
        from refreekv.integration.context import compress_context

        return compress_context(self, input_ids, attention_mask, chunk_size=chunk_size)

    def remove(self) -> None:
        """Restores the model as it was (an attention implementation or a
        `generate` the caller set while patched stays). Removing twice does
        nothing. A cache compressed under the patch can only be continued
        under a patch."""
        if self._hooks is None:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = None
        if self.model.config._attn_implementation == self._name:
            self.model.config._attn_implementation = self._base_implementation
        if not self._copied:  # the name is the original patch's, still in use there
            compat.unregister_attention(self._name)
        if vars(self.model).get("generate") == self._generate:
            if self._shadowed_generate is None:
                del self.model.generate
            else:
                self.model.generate = self._shadowed_generate
        del self.model._refreekv_handle

    def __getstate__(self) -> dict:
        # A copy of the patched model (copy.deepcopy, pickle) copies this
        # handle with it, and its hooks, which would call the original's
        # attention function under the original's name. The copied handle
        # refuses to run instead (`_check_in_place`); patching the copy
        # replaces it.
        state = dict(self.__dict__)
        del state["_thread"]
        state["_copied"] = True
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread = _ThreadState()

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._hooks is None else "active"
        storage = "padded" if self.paged_block_rows is None else f"paged, block_rows={self.paged_block_rows}"
        return f"PatchHandle({self.method!r}, evict={self.evict}, prefill={self.prefill}, storage={storage}, {state})"

    # -- generate -----------------------------------------------------------

    def _generate(self, *args, **kwargs):
        """`model.generate` while patched: refuses draft verification before
        anything runs, and a call that raises before its prefill finished
        leaves `stats` saying why."""
        self._check_in_place()
        thread = self._thread
        thread.compressed_nothing("it ran no prefill")
        try:
            kwargs = self._prepare_generation(args, kwargs)
            return self._model_generate(*args, **kwargs)
        except Exception as error:
            if thread.stats is None:
                thread.no_stats += f" ({type(error).__name__}: {error})"
            raise

    def _prepare_generation(self, args, kwargs) -> dict:
        """Refuses, before anything runs, generate options whose forwards
        refreekv would compress wrongly, and declares a prompt prefilled
        in chunks; returns generate's keyword arguments.

        Assisted decoding, prompt lookup, early-exit and multi-token-
        prediction drafts run the prompt and the first draft tokens in one
        forward, which refreekv would take for the prefill (and compress the
        drafts as prompt), then crop the rejected drafts off the cache,
        which a compressed layer cannot undo. A chunked prefill
        (`prefill_chunk_size` shorter than the prompt) fills a cache
        declared with the prompt's length, so that its chunks are pieces
        of one prompt (SPEC 11)."""
        try:
            bound = inspect.signature(self._model_generate).bind_partial(*args, **kwargs).arguments
        except TypeError:
            return kwargs  # generate reports its own argument errors
        options = bound.get("kwargs", {})
        configs = [config for config in (bound.get("generation_config"), self.model.generation_config) if config is not None]

        def option(name):
            if name in options:
                return options[name]
            return next((getattr(c, name) for c in configs if getattr(c, name, None) is not None), None)

        requested = [] if bound.get("assistant_model") is None else [f"assistant_model={type(bound['assistant_model']).__name__}"]
        drafts = {name: option(name) for name in _DRAFT_OPTIONS}
        requested += [f"{name}={value!r}" for name, value in drafts.items() if value is not None and value is not False]
        if requested:
            raise ValueError(
                f"refreekv does not support assisted decoding or prompt lookup (generate got {', '.join(requested)}): "
                "they verify draft tokens in the same forward as the prompt, which refreekv would compress as prompt, "
                "and crop rejected drafts off a cache that compression has already cut. Generate without them "
                "under the patch, or call .remove() first to use them without compression"
            )
        chunk = option("prefill_chunk_size")
        if chunk is None:
            return kwargs
        prompt = next((p for p in (bound.get("inputs"), options.get("input_ids"), options.get("inputs_embeds")) if p is not None), None)
        if prompt is None:
            raise ValueError(
                f"refreekv needs the prompt (input_ids or inputs_embeds) to prefill it in chunks (generate got "
                f"prefill_chunk_size={chunk!r} and no prompt): a chunked prompt is cut once its length has arrived"
            )
        if prompt.shape[1] <= chunk:
            return kwargs  # one forward
        cache = options.get("past_key_values")
        if cache is None:
            cache = compat.new_cache(self.model)
            kwargs = {**kwargs, "past_key_values": cache}
        elif cache.get_seq_length():
            raise ValueError(
                f"refreekv cannot prefill in chunks (prefill_chunk_size={chunk!r}) into a cache that already holds "
                f"{cache.get_seq_length()} positions: transformers chunks the whole prompt from its first token. "
                "Give an empty cache, or generate from this one without prefill_chunk_size"
            )
        declare_prompt(cache, prompt.shape[1])
        return kwargs

    # -- hooks --------------------------------------------------------------

    def _check_in_place(self) -> None:
        """Refuses, before anything runs, a model that no longer runs
        through this patch."""
        if self._copied:
            raise RuntimeError(
                "this model is a copy (copy.deepcopy or pickle) of a model patched by refreekv: it carries the "
                "patch's hooks but not the patch, which belongs to the original model. Patch the copy in its own "
                "right (refreekv.patch(copy, ...) replaces the copied hooks; .remove() on that handle leaves the copy "
                "unpatched), or copy the model before patching it or after .remove()"
            )
        implementation = self.model.config._attn_implementation
        if implementation != self._name:
            raise RuntimeError(
                f"the model's attention implementation was changed to {implementation!r} while refreekv's patch "
                f"was on (the patch set {self._name!r}, its wrapper of {self._base_implementation!r}), so the "
                "attention no longer goes through refreekv. Change the attention implementation before "
                "refreekv.patch or after .remove() (which keeps the one you set), then patch again"
            )

    def _before_forward(self, module, args, kwargs):
        self._check_in_place()
        thread = self._thread
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
        forward = thread.forward = _Forward(cache)
        patched_forward_began()  # ended by `_after_forward`, which runs even when the forward raises
        tokens = bound.get("input_ids")
        if tokens is None:
            tokens = bound.get("inputs_embeds")
        if cache is None:
            thread.compressed_nothing("it ran without a cache (use_cache=False)")
        elif tokens is None:
            thread.compressed_nothing("it was given neither input_ids nor inputs_embeds")  # the model says so too
        elif getattr(cache, "_refreekv_fill", None) is not None or cache.get_seq_length() == 0:
            self._start_piece(forward, bound.get("attention_mask"), tokens)
        else:
            record = getattr(cache, "_refreekv", None)
            if record is not None and record.patch != self._name and record.context:
                raise RuntimeError(
                    "this cache holds a context compressed by another refreekv patch (on another model, or one "
                    "removed since): its rows were cut for that patch's model and method. Answer it under the patch "
                    "that compressed it, or compress the context again under this one"
                )
            if record is None or record.patch != self._name:
                record = None
                thread.compressed_nothing(
                    "it continued a cache that this patch did not prefill (one filled before patching, by another "
                    "patch, by a prefill that raised, or by a branched prefill, whose stats Prefill.branch returns)"
                )
            else:
                if record.untouched and tokens.shape[1] > 1 and not record.context:
                    raise ValueError(
                        f"this forward appends {tokens.shape[1]} tokens to a cache whose prompt refreekv has just cut "
                        f"({cache.get_seq_length()} positions), before any token was generated: if they are more of "
                        "the prompt, it was cut too early. Declare a prompt that arrives in pieces with "
                        "kv.new_cache(prompt_length=...) (generate(prefill_chunk_size=...) does it for you); to ask "
                        "questions about a context compressed on its own, use kv.compress_context(...)"
                    )
                record.untouched = False
                thread.report(record)
            if self.decode is not None and self.decode.every is not None:
                if record is None:
                    raise RuntimeError(
                        "decode-time compression (recompress_every) continues a cache that this patch prefilled; this "
                        "cache was filled elsewhere (before patching, by another patch or by a branched prefill)"
                    )
                forward.decoding = record.decoding
                forward.query_rows = self.decode.query_rows
                forward.decoding.advance(tokens.shape[1], self.decode.every)
        return args, kwargs

    def _start_piece(self, forward: _Forward, attention_mask, tokens: torch.Tensor) -> None:
        """A forward that brings a prompt, or a piece of one (SPEC 11)."""
        cache, thread = forward.cache, self._thread
        fill = getattr(cache, "_refreekv_fill", None)
        if fill is None:
            compat.check_cache(cache)
            fill = PromptFill(declared_length(cache) or tokens.shape[1], patch=self._name)
            if self.decode is not None:
                fill.decoding = _Decoding()
        elif fill.patch != self._name:
            raise RuntimeError(
                f"this cache holds the first {fill.received} of {fill.length} positions of a prompt that another "
                "refreekv patch began (or one removed since); finish its prompt under that patch, or start a new cache"
            )
        thread.compressed_nothing("its prefill raised before it finished")  # until `_after_forward` reports it
        fill.add_piece(attention_mask, tokens.shape[0], tokens.shape[1], tokens.device)
        cache._refreekv_fill = fill
        fill.cutting = fill.final or (self.prefill == STREAMING and not fill.cut and fill.has_real_tokens())
        forward.prefill = fill
        forward.decoding = fill.decoding
        forward.recut_piece = fill.cut
        if fill.cut:
            fill.decoding.queries = {}  # a piece's re-cut reads its own newest queries
            forward.query_rows = self.decode.piece_query_rows(self.method, tokens.shape[1])

    def _after_forward(self, module, args, kwargs, output):
        """Runs after every forward, also one that raised (output None):
        the forward's state is dropped either way, so the handle keeps no
        call's cache alive."""
        if self._copied:
            return
        thread = self._thread
        forward, thread.forward = thread.forward, None
        if forward is not None:
            patched_forward_ended()
        if forward is None or output is None:
            return  # the forward raised; `_before_forward` left stats saying what was under way
        fill = forward.prefill
        if fill is None:
            if forward.decoding is not None and forward.decoding.event_due:
                self._recompress(forward)
            return
        missed = sorted(self._full_layers - fill.seen_layers)
        if missed:
            raise RuntimeError(
                f"the attention of layers {missed} did not go through transformers' attention-function registry "
                "during prefill, so refreekv could not compress them; this model is not supported"
            )
        if forward.recut_piece:
            self._recompress(forward, piece=fill.piece_length)
        fill.cut = fill.cut or (self.prefill == STREAMING and fill.cutting)
        if not fill.final:
            thread.compressed_nothing(
                f"its prompt has arrived in part ({fill.received} of the {fill.length} positions declared); it is "
                "cut once the last piece arrives"
            )
            return
        del forward.cache._refreekv_fill
        if forward.decoding is not None:
            forward.decoding.queries = {}  # decode-time events read the queries of generated tokens only
        decoding = forward.decoding if self.decode is not None and self.decode.every is not None else None
        record = _CacheRecord(self._name, self._read_stats(forward.cache, fill), decoding)
        forward.cache._refreekv = record
        thread.report(record)

    # -- the attention function ---------------------------------------------

    def _attention(self, module, query, key, value, attention_mask, **kwargs):
        layer_idx = module.layer_idx
        forward = self._thread.forward  # None for a layer called outside the decoder's forward
        fill = None if forward is None else forward.prefill
        if fill is not None and not forward.recut_piece:
            output = self._base_attention(module, query, key, value, attention_mask, **kwargs)
            if layer_idx in self._full_layers:
                self._compress(forward, module, query, key, value, kwargs)
            return output
        cache = None if forward is None else forward.cache
        source = self.layout.cache_source[layer_idx]
        layer = cache.layers[source] if cache is not None and source is not None else None
        if fill is not None and layer_idx in self._full_layers:
            # A streaming piece appended to held rows: its own rows count in the uncompressed prompt.
            fill.seen_layers.add(layer_idx)
            fill.kv_bytes_before += (key.nbytes // key.shape[2] + value.nbytes // value.shape[2]) * query.shape[2]
        decoding = None if forward is None else forward.decoding
        if decoding is not None and forward.query_rows is not None and layer_idx in decoding.variants:
            decoding.keep_queries(layer_idx, query, forward.query_rows)
        if isinstance(layer, PagedLayer):
            return layer.attend(query).transpose(1, 2).contiguous(), None
        if isinstance(layer, CompressedLayer):
            attention_mask = self._held_rows_mask(layer, attention_mask, query, key.shape[2])
        if compat.masked_sdpa_applies(self._base_implementation, query, attention_mask):
            return compat.masked_sdpa_attention(module, query, key, value, attention_mask, **kwargs)
        return self._base_attention(module, query, key, value, attention_mask, **kwargs)

    def _compress(self, forward: _Forward, module, query, key, value, attention_kwargs: dict) -> None:
        """A full-attention layer's part of a prompt forward, once its
        attention has run: the cut over every row so far when the forward
        is `cutting`, or, before the last piece, keeping what that cut will
        read of this one."""
        layer_idx = module.layer_idx
        fill = forward.prefill
        fill.seen_layers.add(layer_idx)
        if fill.cutting:
            fill.kv_bytes_before += key.nbytes + value.nbytes  # every row so far, none cut yet
        if self.method.is_protected(layer_idx, self.num_layers):
            return
        variant = compat.attention_variant(module, self._base_attention, attention_kwargs)
        inputs = LayerInputs(
            query=query,
            key=key,
            scaling=variant.scaling,
            layer_idx=layer_idx,
            num_layers=self.num_layers,
            prompt_valid=fill.prompt_valid,
            real_len=fill.real_len,
            value=value,
            softcap=variant.softcap,
            sinks=variant.sinks,
        )
        if not fill.cutting:
            fill.hold_signal(self.method, inputs)
            return
        inputs = fill.signal_inputs(self.method, inputs)
        # Re-cut later: at decode-time events, or at the next pieces of a streaming prompt.
        recut = self.decode is not None and (self.decode.every is not None or not fill.final)
        if recut:
            forward.decoding.variants[layer_idx] = variant
        headroom = self._headroom(fill) if recut else None
        compressed = compress_layer(
            self.method, inputs, value, evict=self.evict, headroom=headroom, paged_block_rows=self.paged_block_rows
        )
        if recut:
            if compressed is None:  # kept whole, but re-cut later: a compressed layer holding everything
                compressed = whole_layer(inputs, headroom=headroom, paged_block_rows=self.paged_block_rows)
            compressed.recompressing = True
        if compressed is not None:
            forward.cache.layers[layer_idx] = compressed

    def _headroom(self, fill: PromptFill) -> int:
        """Rows a cut leaves free for what comes next: the next piece of a
        streaming prompt (as long as this one, at most what is left), or
        the tokens generated until the next decode-time event."""
        if not fill.final:
            return min(fill.piece_length, fill.length - fill.received)
        return self.decode.every or 0

    def _recompress(self, forward: _Forward, piece: Optional[int] = None) -> None:
        """A re-cut of every compressed layer's held rows (SPEC 8), after
        the forward of the decode step that made an event due, or of a
        streaming prompt's `piece` (SPEC 11; not an event of the
        timeline)."""
        decoding, cache = forward.decoding, forward.cache
        headroom = self.decode.every if piece is None else self._headroom(forward.prefill)
        for layer_idx, variant in decoding.variants.items():
            new_layer, event = recompress_layer(
                self.method, cache.layers[layer_idx], decoding.queries[layer_idx], variant,
                layer_idx=layer_idx, num_layers=self.num_layers, max_tokens=self.decode.max_cache_tokens,
                step=decoding.generated, evict=self.evict, headroom=headroom,
                paged_block_rows=self.paged_block_rows,
            )  # fmt: skip
            cache.layers[layer_idx] = new_layer
            if piece is None:
                decoding.timeline.events.append(event)
        decoding.event_due = False

    def _held_rows_mask(self, layer: CompressedLayer, mask, query, kv_length: int):
        """The mask for the rows a compressed layer holds: its prompt rows
        where valid, then the appended tokens as transformers' mask (built
        for the uncompressed geometry) has them."""
        batch, heads, q_length, _ = query.shape
        appended = kv_length - layer.prompt_rows
        if layer.prompt_valid is None and mask is None:
            return None  # plain causal attention over everything held
        if mask is None:
            # Causal among the appended tokens; the queries are the last ones.
            query_pos = torch.arange(q_length, device=query.device) + (appended - q_length)
            new = (torch.arange(appended, device=query.device)[None, :] <= query_pos[:, None])[None, None]
        else:
            tail = mask[..., mask.shape[-1] - appended :]
            new = tail if tail.dtype == torch.bool else tail == 0
        prompt = layer.attended_prompt_rows()[:, :, None, :]
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

    def _read_stats(self, cache, prefill: PromptFill) -> CompressionStats:
        full_layers = self.layout.full_layers
        return CompressionStats.from_cache(
            [cache.layers[i] for i in full_layers], prefill.real_len, prefill.kv_bytes_before,
            evict=self.evict, layers=full_layers,
        )  # fmt: skip
