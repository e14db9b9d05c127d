"""The contract between the integration and a compression method, and the
selection the methods share.

After a layer's prefill the integration hands the method a `LayerInputs`
(the prompt's post-rotary queries and cached keys, and where each sequence's
real tokens are) and gets back a `KeepPlan` (which cache rows to keep). The
integration does the cache surgery, masking and bookkeeping; a method only
decides. Methods that keep a fixed budget of the best-scored keys (H2O,
SnapKV, ...) derive from `ScoredMethod` and only score; methods that keep
the first sinks plus a recent span (StreamingLLM, ReFreeKV) derive from
`PositionalMethod` and only count the span. The selection every method
builds its plan with (`resolve_budget`, `split_ends`, `keep_top`) lives here
too: the base classes need it, and it produces the contract's `KeepPlan`.
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch

from refreekv.compression.checks import check_budget, check_layer_indices, check_num_sinks, check_window
from refreekv.ops import attention_importance

__all__ = [
    "CompressionMethod",
    "KeepPlan",
    "LayerInputs",
    "PositionalMethod",
    "ScoredMethod",
    "keep_top",
    "resolve_budget",
    "split_ends",
]


@dataclass(frozen=True)
class LayerInputs:
    """One layer's cache, right after its prefill forward or, with decode-time
    compression (SPEC 8), after the forward of a step where an event is due.
    At a decode event the "prompt" is every row the layer holds (sinks,
    earlier kept rows, generated rows), in order and left-padded per
    sequence, exactly as a prefill prompt is.

    query: [b, H, q, d] post-rotary queries of the newest q rows (q = n at
        prefill: the whole prompt; at a decode event the newest tokens, as
        many as `CompressionMethod.decode_query_rows` asks for).
    key: [b, Hkv, n, d] the cached (post-rotary) keys.
    scaling: the layer's softmax scale.
    layer_idx, num_layers: where the layer sits.
    prompt_valid: [b, n] bool, False on left padding.
    real_len: [b] int64, real tokens per sequence; they occupy positions
        [n - real_len, n) because padding is on the left.
    value: [b, Hkv, n, dv] the cached values, for methods that weigh what
        dropping a key changes in the output (None where not supplied).
    softcap: the layer's logit soft-capping (Gemma 2), None without.
    sinks: [H] the layer's learned sink logits (GPT-OSS), None without.
    max_tokens: at a decode event, the hard cap on rows kept per sequence
        for fixed-budget methods (`max_cache_tokens`); None at prefill.
    summed_importance: [b, Hkv, n] float32, for a prompt that arrived in
        pieces (SPEC 11) and a method that reads every prompt query
        (`CompressionMethod.sums_every_query`): the attention of every
        prompt query onto each key, summed over the queries and averaged
        over each KV head's query group, accumulated piece by piece (what
        `importance(n, normalize=False, group_reduce="mean")` gives in one
        forward; `query` then holds only the last piece's newest rows).
    """

    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    layer_idx: int
    num_layers: int
    prompt_valid: torch.Tensor
    real_len: torch.Tensor
    value: Optional[torch.Tensor] = None
    softcap: Optional[float] = None
    sinks: Optional[torch.Tensor] = None
    max_tokens: Optional[int] = None
    summed_importance: Optional[torch.Tensor] = None

    @property
    def prompt_len(self) -> int:
        return self.key.shape[2]

    @property
    def query_rows(self) -> int:
        """How many of the newest rows have their queries here."""
        return self.query.shape[2]

    def budget_tokens(self, budget: float | int) -> torch.Tensor:
        """[b] rows a fixed-budget method keeps: its budget at prefill, the
        cap at a decode event; never more than a sequence has."""
        return resolve_budget(budget if self.max_tokens is None else self.max_tokens, self.real_len)

    @property
    def first_real(self) -> torch.Tensor:
        """[b] position of each sequence's first real token."""
        return self.prompt_len - self.real_len

    def positions(self) -> torch.Tensor:
        """[n] position indices on the key's device."""
        return torch.arange(self.prompt_len, device=self.key.device)

    def importance(self, rows: int, *, normalize: bool = True, group_reduce: Optional[str] = None) -> torch.Tensor:
        """`refreekv.attention_importance` of the newest `rows` queries (at
        most `query_rows`) onto every key, with the layer's own softmax
        (scale, soft-capping, sinks) and padding keys masked: float32
        [b, H, n], or [b, Hkv, n] with `group_reduce`."""
        rows = min(rows, self.query_rows)
        return attention_importance(
            self.query[:, :, self.query_rows - rows :], self.key, self.scaling,
            kv_valid=self.prompt_valid, normalize=normalize, group_reduce=group_reduce,
            softcap=self.softcap or 0.0, sinks=self.sinks,
        )  # fmt: skip


@dataclass(frozen=True)
class KeepPlan:
    """Which cache rows a layer keeps.

    keep_index: [b, Hkv, r_max] int64 positions, ascending within each head
        for the first keep_len[b] entries; entries after them are ignored.
    keep_len: [b] int64 rows held per sequence: what every head keeps, or
        the most any head keeps when `head_len` is given.
    head_len: [b, Hkv] int64 rows each KV head keeps (the first ones of its
        keep_index), for methods whose budget differs between heads; None
        when every head keeps keep_len. The cache is then padded to
        keep_len and each head's extra rows are masked out.
    """

    keep_index: torch.Tensor
    keep_len: torch.Tensor
    head_len: Optional[torch.Tensor] = None

    def kept_lengths(self) -> torch.Tensor:
        """[b, Hkv] or [b, 1]: rows each head keeps."""
        return self.keep_len[:, None] if self.head_len is None else self.head_len

    def keeps_everything(self, real_len: torch.Tensor) -> bool:
        return bool((self.kept_lengths() == real_len[:, None]).all())


def resolve_budget(budget: float | int, real_len: torch.Tensor) -> torch.Tensor:
    """[b] tokens to keep per sequence, never more than it has."""
    if isinstance(budget, numbers.Integral):
        tokens = torch.full_like(real_len, int(budget))
    else:
        tokens = torch.round(real_len.double() * float(budget)).long().clamp(min=1)
    return torch.minimum(tokens, real_len)


def split_ends(inputs: LayerInputs, *, num_sinks: int = 0, window: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(forced, candidates), [b, n] bool each: each sequence's first
    `num_sinks` real tokens and the last `window` after them are forced, its
    other real tokens are candidates."""
    sinks = inputs.real_len.clamp(max=num_sinks)
    recent = (inputs.real_len - sinks).clamp(max=window)
    positions = inputs.positions()[None, :]
    forced = inputs.prompt_valid & (
        (positions < (inputs.first_real + sinks)[:, None]) | (positions >= (inputs.prompt_len - recent)[:, None])
    )
    return forced, inputs.prompt_valid & ~forced


def keep_top(
    scores: torch.Tensor, counts: torch.Tensor, candidates: torch.Tensor, forced: torch.Tensor
) -> KeepPlan:
    """Per KV head, the top counts candidates by score, plus forced.

    scores: [b, Hkv, n] float; counts: [b] int64 (one count for every
    head) or [b, Hkv] (a count per head, giving a plan with head_len),
    at most the number of candidates of each sequence; candidates,
    forced: [b, n] bool, disjoint.
    """
    batch, kv_heads, n = scores.shape
    per_head = counts.dim() == 2
    head_counts = counts if per_head else counts[:, None].expand(batch, kv_heads)
    is_candidate = candidates[:, None, :]
    ranked = scores.masked_fill(~is_candidate, float("-inf"))
    if bool(ranked.isnan().any()):
        # A NaN ranks neither above nor equal to anything: the plan would come out short.
        raise ValueError("keep_top: expected finite scores, got NaN (non-finite queries or keys upstream?)")
    k_max = int(counts.max())
    # The top head_counts scores, ties (frequent after max pooling) broken
    # by position, so a sequence keeps the same tokens whatever padding
    # precedes it: every score above the count-th largest, then the
    # earliest of those equal to it. A threshold instead of a full sort:
    # on 3 x 4096 scores a stable sort took 0.67 ms, this top-k 0.04 ms.
    chosen = forced[:, None, :].expand(batch, kv_heads, n).clone()
    if k_max > 0:
        top_values = ranked.topk(k_max, dim=-1).values
        kth = top_values.gather(-1, (head_counts - 1).clamp(min=0)[:, :, None])
        above = ranked > kth
        tied = (ranked == kth) & is_candidate
        still_needed = head_counts[:, :, None] - above.sum(-1, keepdim=True)
        take_tied = tied & (tied.cumsum(-1) <= still_needed)
        chosen |= (above | take_tied) & (head_counts[:, :, None] > 0)
    head_len = head_counts + forced.sum(-1)[:, None]
    keep_len = head_len.amax(dim=1)
    # Kept positions in ascending order: each chosen position goes to the
    # slot its rank among the chosen gives it, the others to a spare slot.
    rows = int(keep_len.max())
    slot = torch.where(chosen, chosen.cumsum(-1) - 1, rows)
    ordered = torch.zeros(batch, kv_heads, rows + 1, dtype=torch.long, device=scores.device)
    ordered.scatter_(-1, slot, torch.arange(n, device=scores.device).expand(batch, kv_heads, n))
    return KeepPlan(ordered[..., :rows], keep_len, head_len if per_head else None)


class CompressionMethod:
    """Base of every method: option bookkeeping and the protected layers.

    Subclasses set `name`, accept their options as keyword arguments of
    `__init__` (their defaults are the documented defaults) and implement
    `plan`.
    """

    name: ClassVar[str]
    default_protected_layers: ClassVar[tuple[int, ...]] = ()
    # Whether the method keeps a fixed budget, and so takes `max_cache_tokens`
    # as its cap when it re-cuts while decoding.
    fixed_budget: ClassVar[bool] = False

    def __init__(self, protected_layers: Optional[Sequence[int]] = None):
        layers = self.default_protected_layers if protected_layers is None else protected_layers
        self.protected_layers = check_layer_indices("protected_layers", layers)

    def check_model(self, num_layers: int) -> None:
        """Raises before anything runs if the options do not fit the model."""
        bad = [i for i in self.protected_layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(
                f"protected_layers {bad} out of range for a model with {num_layers} layers: "
                f"expected indices from {-num_layers} to {num_layers - 1}, got {self.protected_layers}"
            )

    def is_protected(self, layer_idx: int, num_layers: int) -> bool:
        return any(i % num_layers == layer_idx for i in self.protected_layers)

    def plan(self, inputs: LayerInputs) -> Optional[KeepPlan]:
        """The rows to keep for one layer; None keeps the layer as it is."""
        raise NotImplementedError

    def prefill_query_rows(self, prompt_len: int) -> int:
        """How many of the prompt's newest queries the cut after prefill
        reads (at most `prompt_len`). A prompt that arrives in pieces
        (SPEC 11) keeps that many across them, so the cut sees what one
        forward would have given it. By default every query: a method
        that reads fewer says so."""
        return prompt_len

    @property
    def sums_every_query(self) -> bool:
        """Whether the cut after prefill sums every prompt query's
        attention onto each key (H2O over every query): a prompt in pieces
        then accumulates that sum piece by piece
        (`LayerInputs.summed_importance`) instead of keeping the queries."""
        return False

    def decode_query_rows(self, recompress_every: int) -> int:
        """How many of the newest queries the method reads at a decode
        event. Patching refuses more than `recompress_every`: only the
        tokens generated since the last event are sure to be held, in
        order, as the signal's causal window needs."""
        return 1

    @property
    def per_head_counts(self) -> bool:
        """Whether the KV heads of a layer keep different counts (plans
        with `head_len`): paged storage then holds each head at its own,
        and a decode-time cut cuts each head on its own."""
        return False

    def recompression_refusal(self) -> Optional[str]:
        """Why the method cannot re-cut while decoding, or None if it can."""
        return None

    def fewest_kept(self) -> int:
        """Rows every cut keeps whatever the budget (the smallest sensible
        `max_cache_tokens`)."""
        return 1

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Every option with its default, from the constructor signature."""
        parameters = inspect.signature(cls.__init__).parameters
        defaults = {name: p.default for name, p in parameters.items() if name != "self"}
        if "protected_layers" in defaults:
            defaults["protected_layers"] = cls.default_protected_layers
        return defaults

    def options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.option_defaults()}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({options})"


class PositionalMethod(CompressionMethod):
    """Keeps each sequence's first `num_sinks` real tokens and its `recent`
    most recent ones: the same positions for every head. Subclasses
    implement `recent_count`."""

    def __init__(self, *, num_sinks: int = 4, protected_layers: Optional[Sequence[int]] = None):
        super().__init__(protected_layers)
        self.num_sinks = check_num_sinks(num_sinks)

    def fewest_kept(self) -> int:
        return self.num_sinks + 1  # the sinks and the newest token

    def prefill_query_rows(self, prompt_len: int) -> int:
        return min(1, prompt_len)  # positions only (subclasses that read attention say more)

    def recent_count(self, inputs: LayerInputs, sinks: torch.Tensor) -> torch.Tensor:
        """[b] recent tokens to keep, at most real_len - sinks each."""
        raise NotImplementedError

    def plan(self, inputs: LayerInputs) -> KeepPlan:
        sinks = inputs.real_len.clamp(max=self.num_sinks)
        recent = self.recent_count(inputs, sinks)
        keep_len = sinks + recent
        rows = torch.arange(int(keep_len.max()), device=keep_len.device)[None, :]
        sink_pos = inputs.first_real[:, None] + rows
        recent_pos = inputs.prompt_len - recent[:, None] + (rows - sinks[:, None])
        positions = torch.where(rows < sinks[:, None], sink_pos, recent_pos)
        positions = positions.masked_fill(rows >= keep_len[:, None], 0)
        kv_heads = inputs.key.shape[1]
        return KeepPlan(positions[:, None, :].expand(-1, kv_heads, -1), keep_len)


class ScoredMethod(CompressionMethod):
    """A fixed budget per sequence: its last `window` tokens, always kept,
    plus, per KV head, the candidates before them that `scores` ranks best.
    Subclasses implement `scores`; `layer_budget` may differ by layer."""

    fixed_budget = True

    def __init__(self, *, budget: float | int = 0.5, window: int = 8, protected_layers: Optional[Sequence[int]] = None):
        super().__init__(protected_layers)
        self.budget = check_budget(budget)
        self.window = check_window(window)

    def decode_query_rows(self, recompress_every: int) -> int:
        return self.window

    def prefill_query_rows(self, prompt_len: int) -> int:
        return min(self.window, prompt_len)

    def fewest_kept(self) -> int:
        return self.window  # the forced window, the newest token included

    def scores(self, inputs: LayerInputs) -> torch.Tensor:
        """[b, Hkv, n] float: how much each key is worth keeping."""
        raise NotImplementedError

    def window_len(self, inputs: LayerInputs) -> torch.Tensor:
        """[b] tokens of each sequence's forced window."""
        return inputs.real_len.clamp(max=self.window)

    def layer_budget(self, inputs: LayerInputs) -> torch.Tensor:
        """[b] tokens this layer keeps, the window included."""
        return inputs.budget_tokens(self.budget)

    def plan(self, inputs: LayerInputs) -> KeepPlan:
        scores = self.scores(inputs)
        forced, candidates = split_ends(inputs, window=self.window)
        counts = (self.layer_budget(inputs) - self.window_len(inputs)).clamp(min=0)
        return keep_top(scores, torch.minimum(counts, candidates.sum(-1)), candidates, forced)
