"""Plain PyTorch reference implementations of the native operators.

They materialize everything (the full ``w x n`` probability matrix, every
prefix norm) and follow the formulas of SPEC sections 2 and 4 literally, so
tests and benchmarks can judge the native kernels against them. They are never
used as a fallback for the operators.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "attention_importance",
    "adaptive_keep_count",
    "mass_keep_count",
    "compact_kv",
    "paged_attention",
    "paged_rows",
    "paged_write",
    "released_code_keep_count",
]


def attention_importance(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    *,
    kv_valid: Optional[torch.Tensor] = None,
    normalize: bool = True,
    group_reduce: Optional[str] = None,
    softcap: Optional[float] = 0.0,
    sinks: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Same contract as :func:`refreekv.ops.attention_importance`, computed in
    ``dtype`` (float32 by default; float64 gives a ground truth). The softcap
    follows Gemma 2's eager attention and the sinks GPT-OSS's: a sink column
    joins the masked logits for the softmax and is dropped after it."""
    batch, heads, window, _ = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    q = query.to(dtype)
    k = key.to(dtype).repeat_interleave(group, dim=1)
    logits = (q @ k.transpose(-1, -2)) * scale  # [b, H, w, n]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    row_pos = torch.arange(keys - window, keys, device=query.device)
    key_pos = torch.arange(keys, device=query.device)
    hidden = (key_pos[None, :] > row_pos[:, None])[None, None]  # causal
    if kv_valid is not None:
        hidden = hidden | ~kv_valid[:, None, None, :]
    logits = logits.masked_fill(hidden, float("-inf"))
    if sinks is None:
        probs = torch.softmax(logits, dim=-1)
    else:
        sink_column = sinks.to(dtype)[None, :, None, None].expand(batch, heads, window, 1)
        probs = torch.softmax(torch.cat([logits, sink_column], dim=-1), dim=-1)[..., :-1]
    probs = probs.nan_to_num(0.0)  # rows that see only padding contribute nothing
    scores = probs.sum(dim=2)
    if normalize:
        scores = scores / (keys - key_pos).clamp(max=window).to(dtype)
    if group_reduce == "mean":
        scores = scores.view(batch, kv_heads, group, keys).mean(dim=2)
    elif group_reduce == "max":
        scores = scores.view(batch, kv_heads, group, keys).amax(dim=2)
    return scores


def adaptive_keep_count(
    ranked_scores: torch.Tensor,
    threshold: float,
    *,
    valid_len: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SPEC 2.3 evaluated literally in float64, one sequence at a time."""
    batch, _, candidates = ranked_scores.shape
    counts = []
    for b in range(batch):
        valid = candidates if valid_len is None else int(valid_len[b])
        scores = ranked_scores[b, :, :valid].double()
        if valid == 0:
            counts.append(0)
            continue
        norms = scores.square().cumsum(dim=-1).sqrt().mean(dim=0)  # K(r) for r = 1..V
        total = norms[-1]  # B
        if total == 0:
            counts.append(valid)
        elif threshold == 0:
            # (B - K(r)) / B == 0 exactly when every score after r is zero.
            nonzero = (scores != 0).any(dim=0).nonzero()
            counts.append(int(nonzero[-1]) + 1)
        else:
            meets = (total - norms) / total <= threshold
            counts.append(int(meets.nonzero()[0]) + 1)
    return torch.tensor(counts, dtype=torch.int64, device=ranked_scores.device)


def mass_keep_count(
    ranked_scores: torch.Tensor,
    tolerance: float,
    *,
    valid_len: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The rule of :func:`refreekv.ops.mass_keep_count` evaluated literally in
    float64, one sequence at a time. Every dropped mass is its own sum (a
    reversed cumulative sum) rather than ``M - P(r)``, so it is exactly zero
    only past the last non-zero score and ``tolerance = 0`` needs no special
    case."""
    batch, heads, candidates = ranked_scores.shape
    counts = torch.zeros(batch, heads, dtype=torch.int64, device=ranked_scores.device)
    for b in range(batch):
        valid = candidates if valid_len is None else int(valid_len[b])
        if valid == 0:
            continue
        scores = ranked_scores[b, :, :valid].double()
        total = scores.sum(dim=-1, keepdim=True)  # M
        from_r = scores.flip(-1).cumsum(-1).flip(-1)  # sum a[r:V] for r = 0..V-1
        dropped = torch.cat([from_r[:, 1:], scores.new_zeros(heads, 1)], dim=-1)  # r = 1..V
        meets = dropped <= tolerance * total
        first = meets.byte().argmax(dim=-1) + 1  # argmax gives the first maximum; r = V always meets
        counts[b] = torch.where(total[:, 0] == 0, valid, first)
    return counts


def released_code_keep_count(ranked_scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The stopping rule searched the way the authors' released code does
    (the baseline of the operator benchmarks): vectorized over candidates,
    float32 cumulative sum of squares, square root, mean over heads, where,
    max. `ranked_scores` [b, H, c] is already in rank order; returns [b]."""
    norms = ranked_scores.float().square().cumsum(-1).sqrt().mean(1)  # K(r), r = 1..c: [b, c]
    total = norms[:, -1:]  # B
    meets = (total - norms) / total <= threshold
    positions = torch.arange(norms.shape[-1], device=norms.device)
    first_meeting = torch.where(meets, -positions, -norms.shape[-1]).max(-1).values.neg()
    return first_meeting + 1


def compact_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    keep_index: torch.Tensor,
    keep_len: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather with ``torch.gather``, then zero the rows past each ``keep_len``."""
    kept_rows = keep_index.shape[2]
    valid = torch.arange(kept_rows, device=key.device)[None, :] < keep_len[:, None]
    index = keep_index.masked_fill(~valid[:, None, :], 0)
    key_out = key.gather(2, index[..., None].expand(-1, -1, -1, key.shape[3]))
    value_out = value.gather(2, index[..., None].expand(-1, -1, -1, value.shape[3]))
    padding = ~valid[:, None, :, None]
    return key_out.masked_fill(padding, 0), value_out.masked_fill(padding, 0), valid


def paged_rows(pool: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[b, Hkv, max(lengths), d]: each head's rows read out of `pool` one by
    one, zero past its length."""
    batch, kv_heads, _ = block_table.shape
    block_rows = pool.shape[1]
    longest = int(lengths.max()) if lengths.numel() else 0
    rows = pool.new_zeros(batch, kv_heads, longest, pool.shape[2])
    for s in range(batch):
        for h in range(kv_heads):
            for j in range(int(lengths[s, h])):
                rows[s, h, j] = pool[block_table[s, h, j // block_rows], j % block_rows]
    return rows


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
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Same contract as :func:`refreekv.ops.paged_attention`: the rows read
    out with `paged_rows`, then attention over the padded result with the
    padding and the future masked, computed in `dtype`."""
    batch, heads, q_rows, _ = query.shape
    kv_heads = block_table.shape[1]
    group = heads // kv_heads
    keys = paged_rows(key_pool, block_table, lengths).to(dtype).repeat_interleave(group, dim=1)
    values = paged_rows(value_pool, block_table, lengths).to(dtype).repeat_interleave(group, dim=1)
    logits = (query.to(dtype) @ keys.transpose(-1, -2)) * scale  # [b, H, q, L]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    head_lengths = lengths.repeat_interleave(group, dim=1)[:, :, None, None]  # [b, H, 1, 1]
    last_seen = head_lengths - q_rows + torch.arange(q_rows, device=query.device)[None, None, :, None]
    key_pos = torch.arange(keys.shape[2], device=query.device)[None, None, None, :]
    logits = logits.masked_fill(key_pos > last_seen, float("-inf"))
    if sinks is not None:
        sink_column = sinks.to(dtype)[None, :, None, None].expand(batch, heads, q_rows, 1)
        logits = torch.cat([logits, sink_column], dim=-1)
        values = torch.cat([values, values.new_zeros(batch, heads, 1, values.shape[-1])], dim=2)
    # A row that sees no key is zero: NaN without sinks, all on the (zero-valued) sink with them.
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return (probs @ values).to(query.dtype)


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
    """Same contract as :func:`refreekv.ops.paged_write`, one row at a time."""
    batch, kv_heads, rows, _ = key.shape
    block_rows = key_pool.shape[1]
    for s in range(batch):
        for h in range(kv_heads):
            count = (rows if row_index is None else row_index.shape[2]) if row_count is None else int(row_count[s, h])
            for j in range(count):
                source = j if row_index is None else int(row_index[s, h, j])
                target = int(start[s, h]) + j
                block = int(block_table[s, h, target // block_rows])
                key_pool[block, target % block_rows] = key[s, h, source]
                value_pool[block, target % block_rows] = value[s, h, source]
