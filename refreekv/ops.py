"""Typed wrappers around the native operators in ``torch.ops.refreekv``.

Each wrapper is a single call into the operator; the schemas are declared in
``csrc/ops.cpp`` and the device kernels live in ``csrc/cpu`` and
``csrc/cuda``. The fake (meta) implementations next to the wrappers give
output shapes without computing, so ``torch.compile`` can trace callers.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from refreekv import _native  # noqa: F401  (registers torch.ops.refreekv)

__all__ = ["attention_importance", "adaptive_keep_count", "mass_keep_count", "compact_kv", "paged_attention", "paged_write"]

GroupReduce = Optional[Literal["mean", "max"]]


def attention_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    *,
    kv_valid: Optional[torch.Tensor] = None,
    normalize: bool = True,
    group_reduce: GroupReduce = None,
    softcap: Optional[float] = 0.0,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Per-key attention importance of the last ``w`` query rows.

    Args:
        query: ``[b, H, w, d]``; row ``i`` is the query at absolute position
            ``n - w + i``, i.e. the window is aligned to the end of the keys.
        key: ``[b, Hkv, n, d]``, same dtype and device as ``query``; ``H`` must
            be a multiple of ``Hkv`` (query head ``h`` reads key head
            ``h // (H // Hkv)``).
        scale: softmax scale ``s`` (the layer's own scaling).
        kv_valid: optional bool ``[b, n]``; ``False`` marks padding keys.
        normalize: average each key over the rows that can see it (SPEC 2.1)
            instead of summing (H2O accumulation).
        group_reduce: ``None`` for per-query-head scores, or ``"mean"`` /
            ``"max"`` over each GQA group.
        softcap: ``c``, Gemma 2 style logit soft-capping when ``c > 0``; ``0``
            or ``None`` leaves the logits uncapped. A negative ``c``, or one
            that is not positive and finite in float32, is an error.
        sinks: optional ``[H]`` learned attention sinks ``\sigma`` (GPT-OSS
            style), one logit per query head, of any floating dtype on the
            device of ``query`` (used in float32): a virtual key that every row
            sees and that is never scored itself. Non-finite sinks are an
            error (on CUDA checked on a host copy: one synchronization, only
            when sinks are given).

    Returns:
        float32 ``[b, H, n]`` (or ``[b, Hkv, n]`` with ``group_reduce``):

        .. math::
            \ell_h[i, j] = \mathrm{cap}_c(s\, q_{h,i} \cdot k_{h // g, j}),
            \qquad \mathrm{cap}_c(x) = c \tanh(x / c)
            \ (\mathrm{cap}_0(x) = x),

            p_h[i, j] = \frac{\exp \ell_h[i, j]}
                        {e^{\sigma_h} + \sum_{j' \le n - w + i,\ j'\ \mathrm{valid}}
                         \exp \ell_h[i, j']}
                        \quad (j \le n - w + i,\ j\ \mathrm{valid}), \qquad
            a_h[j] = \frac{\sum_i p_h[i, j]}{\min(w, n - j)}

        where the sink term ``e^{\sigma_h}`` is absent without ``sinks`` (a
        plain softmax) and the sink logit is neither scaled nor capped. No
        division when ``normalize=False``. Padding keys score 0, and a row
        that sees only padding contributes nothing.

    Float32, float16 and bfloat16 inputs are accepted; everything is computed
    in float32. Extra memory is ``O(b H n)`` plus a fixed tile per thread,
    whatever ``w``: the ``w x n`` probability matrix is never materialized.
    """
    return torch.ops.refreekv.attention_importance.default(
        query, key, float(scale), kv_valid, normalize, group_reduce or "none", float(softcap or 0.0), sinks
    )


def adaptive_keep_count(
    ranked_scores: torch.Tensor,
    threshold: float,
    *,
    valid_len: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""The ReFreeKV stopping rule (SPEC 2.3): how many candidates to keep.

    Args:
        ranked_scores: ``[b, H, c]`` float32/float16/bfloat16 scores already in
            rank order, most important first.
        threshold: ``T`` in ``[0, 1)``, the tolerated relative loss.
        valid_len: optional int64 ``[b]``, the number of leading candidates
            that are real for each sequence (the rest are ignored).

    Returns:
        int64 ``[b]``: for each sequence, with ``V`` valid candidates,

        .. math::
            B = \operatorname{mean}_h \lVert a_h[0:V] \rVert_2, \quad
            K(r) = \operatorname{mean}_h \lVert a_h[0:r] \rVert_2, \quad
            r^* = \min \{ r \ge 1 : (B - K(r)) / B \le T \}

        ``V`` when ``B == 0`` (nothing to tell candidates apart), ``0`` when
        ``V == 0``. With ``T = 0`` the count reaches the last non-zero score
        exactly, so nothing with any signal is dropped.
    """
    return torch.ops.refreekv.adaptive_keep_count.default(ranked_scores, float(threshold), valid_len)


def mass_keep_count(
    ranked_scores: torch.Tensor,
    tolerance: float,
    *,
    valid_len: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""How many candidates each head keeps so that the dropped score mass
    stays within a tolerance.

    Args:
        ranked_scores: ``[b, H, c]`` float32/float16/bfloat16 non-negative
            scores, each head's already in rank order, most important first.
        tolerance: ``delta`` in ``[0, 1)``, the tolerated share of the mass.
        valid_len: optional int64 ``[b]``, the number of leading candidates
            that are real for each sequence (the rest are ignored, whatever
            they hold).

    Returns:
        int64 ``[b, H]``: for each sequence and head, with ``V`` valid
        candidates ``a[0:V]``,

        .. math::
            M = \sum_{j < V} a[j], \qquad
            r^* = \min \{ r \in [1, V] : \textstyle\sum_{r \le j < V} a[j]
                   \le \delta M \}

        ``V`` when ``M == 0`` (nothing to tell candidates apart), ``0`` when
        ``V == 0``. With ``delta = 0`` the count reaches the last non-zero
        score exactly, however small, so no mass at all is dropped. Sums are
        in float64. Negative or non-finite scores are an error (on CUDA reported
        through a device buffer read once per call: one synchronization).
    """
    return torch.ops.refreekv.mass_keep_count.default(ranked_scores, float(tolerance), valid_len)


def compact_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    keep_index: torch.Tensor,
    keep_len: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Gathers the kept cache rows of keys and values.

    Args:
        key: ``[b, Hkv, n, d]``; value: ``[b, Hkv, n, dv]`` of the same dtype.
        keep_index: int64 ``[b, Hkv, r_max]``, positions to keep, in the order
            they should be stored; entries past a sequence's ``keep_len`` are
            ignored.
        keep_len: int64 ``[b]``, kept rows per sequence, each in ``[0, r_max]``.

    Returns:
        ``(key_out [b, Hkv, r_max, d], value_out [b, Hkv, r_max, dv],
        valid [b, r_max] bool)`` with
        ``key_out[b, h, r] = key[b, h, keep_index[b, h, r]]`` for
        ``r < keep_len[b]`` and zero padding (``valid == False``) after it.
    """
    return torch.ops.refreekv.compact_kv.default(key, value, keep_index, keep_len)


def paged_attention(
    query: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    *,
    softcap: Optional[float] = 0.0,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Attention of the newest ``q`` tokens over a paged KV cache, in which
    each (sequence, KV head) holds its own number of rows (SPEC 10).

    Args:
        query: ``[b, H, q, d]``, ``q >= 1``; row ``i`` is the query of the
            token whose key is row ``lengths - q + i`` of every head.
        key_pool: ``[blocks, block_rows, d]``; value_pool:
            ``[blocks, block_rows, dv]``, same dtype and device as ``query``.
        block_table: int64 ``[b, Hkv, max_blocks]``: row ``j`` of head
            ``(s, h)`` lives at ``pool[block_table[s, h, j // block_rows],
            j % block_rows]``. Entries past a head's last block are ignored.
        lengths: int64 ``[b, Hkv]``, rows each head holds, each in
            ``[0, max_blocks * block_rows]``. ``H`` must be a multiple of
            ``Hkv`` (query head ``h`` reads KV head ``h // (H // Hkv)``).
        scale: softmax scale ``s`` (the layer's own scaling).
        softcap, sinks: as in :func:`attention_importance` (``softcap`` 0 or
            None leaves logits uncapped; ``sinks`` ``[H]`` join the softmax
            denominator and carry no value).

    Returns:
        ``[b, H, q, dv]`` in the dtype of ``query``, with ``L = lengths[s,
        h // g]`` and row ``i`` seeing rows ``j <= L - q + i`` (causal,
        aligned bottom-right):

        .. math::
            \ell[i, j] = \mathrm{cap}_c(s\, q_i \cdot k_j), \qquad
            o_i = \frac{\sum_{j \le L - q + i} e^{\ell[i, j]} v_j}
                       {e^{\sigma_h} + \sum_{j \le L - q + i} e^{\ell[i, j]}}

        A row that sees no key (``L - q + i < 0``) is zero. Accumulation is
        in float32 for every input dtype; no ``[q, L]`` matrix is
        materialized beyond a tile.
    """
    return torch.ops.refreekv.paged_attention.default(
        query, key_pool, value_pool, block_table, lengths, float(scale), float(softcap or 0.0), sinks
    )


def paged_write(
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_table: torch.Tensor,
    start: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    row_index: Optional[torch.Tensor] = None,
    row_count: Optional[torch.Tensor] = None,
) -> None:
    r"""Writes rows of a padded cache into a paged one, in place: packing a
    prefill cut (``row_index`` the kept positions) or appending new tokens
    (``row_index`` None). Nothing else in the pools changes.

    Args:
        key_pool, value_pool, block_table: the paged cache (see
            :func:`paged_attention`); the pools are written.
        start: int64 ``[b, Hkv]``, the head's row at which writing begins
            (0 for a pack, its length for an append).
        key: ``[b, Hkv, n, d]``; value: ``[b, Hkv, n, dv]``, the pools'
            dtype and device.
        row_index: optional int64 ``[b, Hkv, r]``, positions of ``key`` to
            write, in order; None writes positions ``0 .. n - 1``.
        row_count: optional int64 ``[b, Hkv]``, how many of them each head
            writes (the first ones), each in ``[0, r]``; None writes all.

    For each ``(s, h)`` and ``j < row_count[s, h]``, row ``start[s, h] + j``
    of head ``(s, h)`` becomes ``key[s, h, row_index[s, h, j]]`` (and the
    same for values). Every written row must lie in a block the table
    lists; indices are checked (on CUDA by device-side assertions, so that
    an append needs no host synchronization).
    """
    torch.ops.refreekv.paged_write.default(key_pool, value_pool, block_table, start, key, value, row_index, row_count)


@torch.library.register_fake("refreekv::attention_importance")
def _attention_importance_fake(
    query, key, scale, kv_valid=None, normalize=True, group_reduce="none", softcap=0.0, sinks=None
):
    heads = query.shape[1] if group_reduce == "none" else key.shape[1]
    return query.new_empty((query.shape[0], heads, key.shape[2]), dtype=torch.float32)


@torch.library.register_fake("refreekv::adaptive_keep_count")
def _adaptive_keep_count_fake(ranked_scores, threshold, valid_len=None):
    return ranked_scores.new_empty((ranked_scores.shape[0],), dtype=torch.int64)


@torch.library.register_fake("refreekv::mass_keep_count")
def _mass_keep_count_fake(ranked_scores, tolerance, valid_len=None):
    return ranked_scores.new_empty(ranked_scores.shape[:2], dtype=torch.int64)


@torch.library.register_fake("refreekv::compact_kv")
def _compact_kv_fake(key, value, keep_index, keep_len):
    batch, kv_heads, kept_rows = keep_index.shape
    return (
        key.new_empty((batch, kv_heads, kept_rows, key.shape[3])),
        value.new_empty((batch, kv_heads, kept_rows, value.shape[3])),
        key.new_empty((batch, kept_rows), dtype=torch.bool),
    )


@torch.library.register_fake("refreekv::paged_attention")
def _paged_attention_fake(query, key_pool, value_pool, block_table, lengths, scale, softcap=0.0, sinks=None):
    return query.new_empty((*query.shape[:3], value_pool.shape[2]))


@torch.library.register_fake("refreekv::paged_write")
def _paged_write_fake(key_pool, value_pool, block_table, start, key, value, row_index=None, row_count=None):
    return None
