"""Native operators against plain PyTorch, timed and measured in the same run (CPU).

    python benchmarks/bench_ops.py [--quick] [--json out.json] [--dtype float32|float16|bfloat16]

For each operator and case it prints our time, the plain PyTorch reference's
time, their ratio (ours / reference) and speedup (reference / ours), the peak
extra memory of each, and whether the two results agree. It prints figures
and asserts nothing about time.

  attention_importance  n in {1024, 4096, 16384}, w in {1, 8, 64, n};
                        b=1, H=8 query heads, Hkv=2 (GQA group 4), d=128.
                        Reference: KV heads repeated to the query heads, the
                        w x n logits materialized, causal mask, float32
                        softmax, sum over rows, divided by min(w, n - j).
                        Where those w x n temporaries would not fit in half of
                        MemAvailable (n=16384, w=n needs ~24 GiB) the
                        reference is skipped and the row says so.
  adaptive_keep_count   c in {1024, 4096, 16384}, H=32, threshold 0.01.
                        Reference: the vectorized search of the authors'
                        released code (cumulative sum of squares, square root,
                        mean over heads, where, max).
  mass_keep_count       c in {1024, 4096, 16384}, H=32, tolerance 0.01.
                        Reference: plain PyTorch in float64 (cumulative sum,
                        dropped mass M - P(r) for every r, count of the r
                        that miss the rule).
  compact_kv            n in {1024, 4096, 16384}, half the positions kept
                        (4 sinks + the most recent); reference: torch.gather.
  paged_attention       decode (q=1) over a paged cache, b=1, H=9, Hkv=3,
                        d=64 (SmolLM2-135M), blocks of 16 rows in shuffled
                        order; the KV heads hold n, 0.6 n and 0.3 n rows
                        (n in {1024, 4096, 16384}). Reference: what a padded
                        cache costs, torch SDPA (enable_gqa) over [b, Hkv, n,
                        d] with a boolean mask of each head's rows; the plain
                        reference (refreekv.reference.paged_attention: rows
                        read out one by one, attention in float32) is timed
                        too and shown in the note.
  paged_write           a prefill cut into a paged cache: n in {1024, 4096,
                        16384} positions per head, half of them written (4
                        sinks + the most recent), same shapes as
                        paged_attention. Reference: plain PyTorch index_put of
                        the gathered rows at their (block, row) targets.

--quick runs n (and c) in {1024, 4096} and w in {1, 64, n} with a smaller
time budget, as a demo. --json writes every figure (the benchmark suite files
them under "ops").

How it measures. Every (operator, implementation, case) runs in a fresh
process, so libraries initialised or memory cached by one measurement cannot
flatter another. The worker builds and touches the inputs, warms the same
operation up on tiny shapes (thread pools, lazy library setup), then measures
the peak extra memory of one full-size call: the growth of the peak resident
set size (VmHWM) over the resident size just before the call, output included.
The first full-size call is also the warm-up for timing, which reports the
median over several repeats (fewer for slow cases) with time.perf_counter;
fast calls are timed in batches, so each repeat lasts long enough to mean
something. The reference worker then runs our operator on the same seeded
inputs to check that both agree; a disagreement is printed loudly but stops
nothing. The "others" column is the share of the machine's CPU that other
processes took during the case (from /proc/stat less our own CPU time): the
operators use every core, so where it is high the times are not to be trusted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from refreekv import reference

import refreekv
from proc_status import release_freed_memory, reset_peak_rss, status_bytes

BATCH = 1
QUERY_HEADS = 8
KV_HEADS = 2
HEAD_DIM = 128
KEEP_COUNT_HEADS = 32
THRESHOLD = 0.01
TOLERANCE = 0.01  # mass_keep_count's delta
NUM_SINKS = 4
SEED = 0
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The paged operators: SmolLM2-135M's attention, heads of different lengths.
PAGED_QUERY_HEADS = 9
PAGED_KV_HEADS = 3
PAGED_HEAD_DIM = 64
PAGED_BLOCK_ROWS = 16
PAGED_LENGTH_SHARES = (1.0, 0.6, 0.3)  # of n, per KV head

# The reference runs only if its estimated working set stays under this share
# of MemAvailable; beyond that it would swap or be killed, and say nothing.
REFERENCE_MEMORY_SHARE = 0.5
# Largest importance difference still called agreement, per input dtype. In
# float32 both sides compute the same sums in different orders; in half
# precision the reference forms its logits in that precision (as plain
# PyTorch attention does) while the operator forms them in float32.
IMPORTANCE_TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 5e-3}
# Largest paged_attention output difference still called agreement: the
# outputs are in the input dtype, so half precision rounds them.
PAGED_ATTENTION_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# Timing: the repeats of a case take about the time budget together. Fast
# calls are batched so that MAX_REPEATS repeats fill it (a sub-millisecond
# call timed alone is mostly noise); slow calls get one call per repeat and
# at least MIN_REPEATS repeats, whatever the budget.
MIN_REPEATS = 3
MAX_REPEATS = 20
TIME_BUDGET_SECONDS = {"full": 2.0, "quick": 0.3}


# ----------------------------------------------------------------------------
# Plain PyTorch references
# ----------------------------------------------------------------------------


def reference_compact_kv(
    key: torch.Tensor, value: torch.Tensor, keep_index: torch.Tensor, keep_len: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.gather of the kept rows. Every case keeps keep_len = r_max rows,
    so there are no padding rows to zero."""
    kept_rows = keep_index.shape[2]
    valid = torch.arange(kept_rows)[None, :] < keep_len[:, None]
    key_out = key.gather(2, keep_index[..., None].expand(-1, -1, -1, key.shape[3]))
    value_out = value.gather(2, keep_index[..., None].expand(-1, -1, -1, value.shape[3]))
    return key_out, value_out, valid


def reference_mass_keep_count(ranked_scores: torch.Tensor, tolerance: float) -> torch.Tensor:
    """The first r with M - P(r) <= delta M, vectorized: float64 cumulative
    sums P(r), and the count of the r that miss the rule (the dropped mass
    never grows with r, so they are exactly the r before the first that
    meets it). The cases have positive scores, so M > 0 and no special case
    applies."""
    prefix = ranked_scores.double().cumsum(-1)  # P(r), r = 1..c: [b, H, c]
    total = prefix[..., -1:]  # M
    return (total - prefix > tolerance * total).sum(-1) + 1


def reference_paged_write(
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_table: torch.Tensor,
    start: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    row_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """index_put of the rows row_index picks at their (block, row) targets.
    Every case writes all of row_index, so there is no count to honour."""
    target = start[..., None] + torch.arange(row_index.shape[2])  # [b, Hkv, r]
    blocks = block_table.gather(2, target // PAGED_BLOCK_ROWS)
    rows = target % PAGED_BLOCK_ROWS
    key_pool[blocks, rows] = key.gather(2, row_index[..., None].expand(-1, -1, -1, key.shape[3]))
    value_pool[blocks, rows] = value.gather(2, row_index[..., None].expand(-1, -1, -1, value.shape[3]))
    return key_pool, value_pool


# ----------------------------------------------------------------------------
# Operators under test: inputs, both implementations, memory estimate, check
# ----------------------------------------------------------------------------


def importance_inputs(case: dict, dtype: torch.dtype) -> tuple:
    query = torch.randn(BATCH, QUERY_HEADS, case["w"], HEAD_DIM, dtype=dtype)
    key = torch.randn(BATCH, KV_HEADS, case["n"], HEAD_DIM, dtype=dtype)
    return query, key, HEAD_DIM**-0.5


def importance_reference_bytes(case: dict, dtype: torch.dtype) -> int:
    # At worst the logits, their masked copy and the float32 probabilities
    # (each w x n per query head) are alive together, next to the keys
    # repeated to every query head.
    window_by_keys = BATCH * QUERY_HEADS * case["w"] * case["n"]
    repeated_keys = BATCH * QUERY_HEADS * case["n"] * HEAD_DIM * dtype.itemsize
    return 3 * window_by_keys * 4 + repeated_keys


def importance_check(ours: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> dict:
    max_abs_diff = (ours - reference).abs().max().item()
    return {
        "agree": max_abs_diff <= IMPORTANCE_TOLERANCE[dtype],
        "max_abs_diff": max_abs_diff,
        "text": f"max|diff| {max_abs_diff:.1e}",
    }


def keep_count_inputs(case: dict, dtype: torch.dtype) -> tuple:
    # Positive scores sorted so the most important come first, as ranked
    # attention mass would be.
    scores = torch.rand(BATCH, KEEP_COUNT_HEADS, case["c"], dtype=dtype)
    return scores.sort(dim=-1, descending=True).values, THRESHOLD


def keep_count_reference_bytes(case: dict, dtype: torch.dtype) -> int:
    return 3 * BATCH * KEEP_COUNT_HEADS * case["c"] * 4  # squares, cumsum, sqrt


def mass_keep_count_inputs(case: dict, dtype: torch.dtype) -> tuple:
    return keep_count_inputs(case, dtype)[0], TOLERANCE


def mass_keep_count_reference_bytes(case: dict, dtype: torch.dtype) -> int:
    return BATCH * KEEP_COUNT_HEADS * case["c"] * (3 * 8 + 1)  # float64 copy, cumsum, difference; bool


def keep_count_check(ours: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> dict:
    return {
        "agree": torch.equal(ours, reference),
        "ours_count": ours.tolist(),
        "reference_count": reference.tolist(),
        "text": f"counts {ours.tolist()} vs {reference.tolist()}",
    }


def compact_inputs(case: dict, dtype: torch.dtype) -> tuple:
    keys = case["n"]
    kept_rows = keys // 2
    key = torch.randn(BATCH, KV_HEADS, keys, HEAD_DIM, dtype=dtype)
    value = torch.randn(BATCH, KV_HEADS, keys, HEAD_DIM, dtype=dtype)
    sinks_then_recent = torch.cat([torch.arange(NUM_SINKS), torch.arange(keys - (kept_rows - NUM_SINKS), keys)])
    keep_index = sinks_then_recent.expand(BATCH, KV_HEADS, kept_rows).contiguous()
    keep_len = torch.full((BATCH,), kept_rows, dtype=torch.int64)
    return key, value, keep_index, keep_len


def compact_reference_bytes(case: dict, dtype: torch.dtype) -> int:
    return 2 * BATCH * KV_HEADS * (case["n"] // 2) * HEAD_DIM * dtype.itemsize  # the two outputs


def compact_check(ours: tuple, reference: tuple, dtype: torch.dtype) -> dict:
    names = ("key", "value", "valid")
    differing = [name for name, a, b in zip(names, ours, reference) if not torch.equal(a, b)]
    return {
        "agree": not differing,
        "differing_outputs": differing,
        "text": "equal" if not differing else "differ: " + ", ".join(differing),
    }


def paged_lengths(longest: int) -> list[int]:
    return [round(share * longest) for share in PAGED_LENGTH_SHARES]


def paged_layout(rows_per_head: list[int]) -> tuple[int, torch.Tensor]:
    """(blocks, block_table [1, Hkv, max_blocks]): each head gets the blocks
    its rows fill, taken from the pool in a shuffled order."""
    blocks_per_head = [-(-rows // PAGED_BLOCK_ROWS) for rows in rows_per_head]
    blocks = sum(blocks_per_head)
    order = torch.randperm(blocks)
    block_table = torch.zeros(BATCH, len(rows_per_head), max(blocks_per_head), dtype=torch.int64)
    taken = 0
    for head, count in enumerate(blocks_per_head):
        block_table[0, head, :count] = order[taken : taken + count]
        taken += count
    return blocks, block_table


def paged_attention_inputs(case: dict, dtype: torch.dtype) -> tuple:
    """The query, the paged cache, and the same rows as a padded cache (each
    head's rows, then zeros up to the longest) with its [b, H, 1, n] mask."""
    lengths = paged_lengths(case["n"])
    blocks, block_table = paged_layout(lengths)
    query = torch.randn(BATCH, PAGED_QUERY_HEADS, 1, PAGED_HEAD_DIM, dtype=dtype)
    padded_key = torch.zeros(BATCH, PAGED_KV_HEADS, case["n"], PAGED_HEAD_DIM, dtype=dtype)
    padded_value = torch.zeros_like(padded_key)
    key_pool = torch.zeros(blocks, PAGED_BLOCK_ROWS, PAGED_HEAD_DIM, dtype=dtype)
    value_pool = torch.zeros_like(key_pool)
    for head, length in enumerate(lengths):
        count = -(-length // PAGED_BLOCK_ROWS)
        for padded, pool in ((padded_key, key_pool), (padded_value, value_pool)):
            rows = torch.randn(length, PAGED_HEAD_DIM, dtype=dtype)
            padded[0, head, :length] = rows
            # The last block's rows past the head's length stay zero.
            in_blocks = torch.zeros(count * PAGED_BLOCK_ROWS, PAGED_HEAD_DIM, dtype=dtype)
            in_blocks[:length] = rows
            pool[block_table[0, head, :count]] = in_blocks.view(count, PAGED_BLOCK_ROWS, PAGED_HEAD_DIM)
    lengths_tensor = torch.tensor([lengths])
    mask = torch.arange(case["n"]) < lengths_tensor[..., None]  # [b, Hkv, n]
    mask = mask.repeat_interleave(PAGED_QUERY_HEADS // PAGED_KV_HEADS, dim=1)[:, :, None, :]
    return query, key_pool, value_pool, block_table, lengths_tensor, padded_key, padded_value, mask


def paged_attention_ours(query, key_pool, value_pool, block_table, lengths, padded_key, padded_value, mask) -> torch.Tensor:
    return refreekv.paged_attention(query, key_pool, value_pool, block_table, lengths, PAGED_HEAD_DIM**-0.5)


def paged_attention_sdpa(query, key_pool, value_pool, block_table, lengths, padded_key, padded_value, mask) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        query, padded_key, padded_value, attn_mask=mask, scale=PAGED_HEAD_DIM**-0.5, enable_gqa=True
    )


def paged_attention_plain(query, key_pool, value_pool, block_table, lengths, padded_key, padded_value, mask) -> torch.Tensor:
    return reference.paged_attention(query, key_pool, value_pool, block_table, lengths, PAGED_HEAD_DIM**-0.5)


def paged_attention_reference_bytes(case: dict, dtype: torch.dtype) -> int:
    # The plain reference's rows read out and repeated to every query head,
    # keys and values, in float32 (SDPA needs less).
    return 2 * 2 * BATCH * PAGED_QUERY_HEADS * case["n"] * PAGED_HEAD_DIM * 4


def paged_attention_check(ours: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> dict:
    max_abs_diff = (ours.float() - reference.float()).abs().max().item()
    return {
        "agree": max_abs_diff <= PAGED_ATTENTION_TOLERANCE[dtype],
        "max_abs_diff": max_abs_diff,
        "text": f"max|diff| {max_abs_diff:.1e}",
    }


def paged_write_inputs(case: dict, dtype: torch.dtype) -> tuple:
    keys = case["n"]
    kept_rows = keys // 2
    blocks, block_table = paged_layout([kept_rows] * PAGED_KV_HEADS)
    key_pool = torch.randn(blocks, PAGED_BLOCK_ROWS, PAGED_HEAD_DIM, dtype=dtype)
    value_pool = torch.randn(blocks, PAGED_BLOCK_ROWS, PAGED_HEAD_DIM, dtype=dtype)
    start = torch.zeros(BATCH, PAGED_KV_HEADS, dtype=torch.int64)
    key = torch.randn(BATCH, PAGED_KV_HEADS, keys, PAGED_HEAD_DIM, dtype=dtype)
    value = torch.randn(BATCH, PAGED_KV_HEADS, keys, PAGED_HEAD_DIM, dtype=dtype)
    sinks_then_recent = torch.cat([torch.arange(NUM_SINKS), torch.arange(keys - (kept_rows - NUM_SINKS), keys)])
    row_index = sinks_then_recent.expand(BATCH, PAGED_KV_HEADS, kept_rows).contiguous()
    return key_pool, value_pool, block_table, start, key, value, row_index


def paged_write_ours(key_pool, value_pool, block_table, start, key, value, row_index) -> tuple[torch.Tensor, torch.Tensor]:
    refreekv.paged_write(key_pool, value_pool, block_table, start, key, value, row_index=row_index)
    return key_pool, value_pool


def paged_write_reference_bytes(case: dict, dtype: torch.dtype) -> int:
    # The gathered rows and the targets' indices.
    kept = BATCH * PAGED_KV_HEADS * (case["n"] // 2)
    return 2 * kept * PAGED_HEAD_DIM * dtype.itemsize + 4 * kept * 8


def paged_write_check(ours: tuple, reference: tuple, dtype: torch.dtype) -> dict:
    names = ("key_pool", "value_pool")
    differing = [name for name, a, b in zip(names, ours, reference) if not torch.equal(a, b)]
    return {
        "agree": not differing,
        "differing_outputs": differing,
        "text": "equal" if not differing else "differ: " + ", ".join(differing),
    }


@dataclass(frozen=True)
class Operator:
    name: str
    shapes: str  # the fixed dimensions, for the table title
    case_label: str  # what the case columns are
    make_inputs: Callable[[dict, torch.dtype], tuple]
    ours: Callable[..., Any]
    reference: Callable[..., Any]
    reference_bytes: Callable[[dict, torch.dtype], int]
    check: Callable[[Any, Any, torch.dtype], dict]
    warmup_case: dict
    # A second baseline, timed where the reference runs, when the reference
    # is not itself the plain PyTorch reference; shown in the row's note.
    plain: Optional[Callable[..., Any]] = None


OPERATORS = {
    op.name: op
    for op in (
        Operator(
            "attention_importance",
            f"b={BATCH}, H={QUERY_HEADS}, Hkv={KV_HEADS}, d={HEAD_DIM}",
            "n, w",
            importance_inputs,
            refreekv.attention_importance,
            reference.attention_importance,
            importance_reference_bytes,
            importance_check,
            {"n": 64, "w": 8},
        ),
        Operator(
            "adaptive_keep_count",
            f"b={BATCH}, H={KEEP_COUNT_HEADS}, threshold {THRESHOLD}",
            "c",
            keep_count_inputs,
            refreekv.adaptive_keep_count,
            reference.released_code_keep_count,
            keep_count_reference_bytes,
            keep_count_check,
            {"c": 64},
        ),
        Operator(
            "mass_keep_count",
            f"b={BATCH}, H={KEEP_COUNT_HEADS}, tolerance {TOLERANCE}",
            "c",
            mass_keep_count_inputs,
            refreekv.mass_keep_count,
            reference_mass_keep_count,
            mass_keep_count_reference_bytes,
            keep_count_check,
            {"c": 64},
        ),
        Operator(
            "compact_kv",
            f"b={BATCH}, Hkv={KV_HEADS}, d={HEAD_DIM}, keeps n/2",
            "n",
            compact_inputs,
            refreekv.compact_kv,
            reference_compact_kv,
            compact_reference_bytes,
            compact_check,
            {"n": 64},
        ),
        Operator(
            "paged_attention",
            f"decode, b={BATCH}, H={PAGED_QUERY_HEADS}, Hkv={PAGED_KV_HEADS}, d={PAGED_HEAD_DIM}, "
            f"heads of n, 0.6n, 0.3n rows in blocks of {PAGED_BLOCK_ROWS}; ref: SDPA over the padded cache",
            "n",
            paged_attention_inputs,
            paged_attention_ours,
            paged_attention_sdpa,
            paged_attention_reference_bytes,
            paged_attention_check,
            {"n": 64},
            plain=paged_attention_plain,
        ),
        Operator(
            "paged_write",
            f"b={BATCH}, Hkv={PAGED_KV_HEADS}, d={PAGED_HEAD_DIM}, packs n/2 rows into blocks of {PAGED_BLOCK_ROWS}",
            "n",
            paged_write_inputs,
            paged_write_ours,
            reference_paged_write,
            paged_write_reference_bytes,
            paged_write_check,
            {"n": 64},
        ),
    )
}


def cases(operator: str, quick: bool) -> list[dict]:
    sizes = [1024, 4096] if quick else [1024, 4096, 16384]
    if operator == "attention_importance":
        windows = [1, 64] if quick else [1, 8, 64]
        return [{"n": n, "w": w} for n in sizes for w in [*windows, n]]
    if operator in ("adaptive_keep_count", "mass_keep_count"):
        return [{"c": c} for c in sizes]
    return [{"n": n} for n in sizes]


def seeded_inputs(operator: Operator, case: dict, dtype: torch.dtype) -> tuple:
    """The same inputs in every process that asks for the same case."""
    torch.manual_seed(SEED)
    return operator.make_inputs(case, dtype)


# ----------------------------------------------------------------------------
# Worker: one (operator, implementation, case) in a fresh process
# ----------------------------------------------------------------------------


def measure_peak_extra(run: Callable[[], Any]) -> tuple[Any, int]:
    """(result, peak extra bytes) of one call of `run`.

    ru_maxrss is a high-water mark since the process started, so anything
    that peaked earlier (input construction, warm-up) would hide the call's
    own peak. Instead, freed heap pages are first returned to the system (else
    the call could reuse them without the resident size growing) and the
    kernel's peak is reset to the current resident size (clear_refs 5); the
    growth of VmHWM is then exactly what the call added. Where the reset is
    not permitted, VmHWM keeps its since-start meaning and the figure is the
    plain ru_maxrss difference."""
    release_freed_memory()
    try:
        reset_peak_rss()
    except OSError:
        pass
    peak_before = status_bytes("VmHWM")
    result = run()
    return result, status_bytes("VmHWM") - peak_before


def median_call_seconds(run: Callable[[], Any], budget_seconds: float) -> tuple[float, int, int]:
    """(median seconds per call, repeats, calls per repeat). Call after a
    warm-up call: one more call sizes the repeats."""
    start = time.perf_counter()
    run()
    call_seconds = max(time.perf_counter() - start, 1e-9)
    calls_per_repeat = max(1, math.floor(budget_seconds / MAX_REPEATS / call_seconds))
    repeats = min(MAX_REPEATS, max(MIN_REPEATS, int(budget_seconds / (calls_per_repeat * call_seconds))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls_per_repeat):
            run()
        times.append((time.perf_counter() - start) / calls_per_repeat)
    return statistics.median(times), repeats, calls_per_repeat


def run_worker(spec: dict) -> dict:
    operator = OPERATORS[spec["operator"]]
    dtype = DTYPES[spec["dtype"]]
    implementation = {"ours": operator.ours, "reference": operator.reference, "plain": operator.plain}[spec["implementation"]]
    with torch.no_grad():
        implementation(*seeded_inputs(operator, operator.warmup_case, dtype))
        inputs = seeded_inputs(operator, spec["case"], dtype)
        result, peak_extra_bytes = measure_peak_extra(lambda: implementation(*inputs))
        del result  # not held while timing
        seconds, repeats, calls = median_call_seconds(lambda: implementation(*inputs), spec["budget_seconds"])
        figures = {
            "ms": seconds * 1e3,
            "peak_extra_mib": peak_extra_bytes / 2**20,
            "repeats": repeats,
            "calls_per_repeat": calls,
        }
        if spec["implementation"] != "ours":
            # Each side on inputs of its own: an operator may write into its inputs.
            ours = operator.ours(*seeded_inputs(operator, spec["case"], dtype))
            figures["check"] = operator.check(ours, implementation(*seeded_inputs(operator, spec["case"], dtype)), dtype)
    return figures


def measure_in_fresh_process(spec: dict) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"failed": f"worker exit code {done.returncode}", "stderr_tail": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# Driver: cases, tables, JSON
# ----------------------------------------------------------------------------


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read(), re.M).group(1)) * 1024


def machine() -> dict:
    with open("/proc/cpuinfo") as cpuinfo:
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.M)
    return {
        "cpu": model.group(1).strip() if model else "unknown",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mem_available_gib": mem_available_bytes() / 2**30,
    }


def case_text(case: dict) -> str:
    return " ".join(f"{value:>6}" for value in case.values())


def machine_busy_seconds() -> float:
    """CPU seconds all processors have spent busy since boot, time stolen by
    the hypervisor included."""
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished workers."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def other_cpu_share(wall_seconds: float, busy_seconds: float, own_seconds: float) -> float:
    """Share of the machine's CPU that other processes used in the interval
    given as deltas. Our operators use every core, so anything else running
    stretches their times (OpenMP waits for a descheduled thread); rows where
    this is high have unreliable times."""
    return max(0.0, (busy_seconds - own_seconds) / (wall_seconds * os.cpu_count()))


def print_header(operator: Operator, dtype_name: str) -> None:
    print()
    print(f"{operator.name}  ({operator.shapes}, {dtype_name})")
    print(
        f"{operator.case_label:>13} | {'ours ms':>9} {'ref ms':>9} {'ours/ref':>8} {'speedup':>8}"
        f" | {'ours MiB':>8} {'ref MiB':>8} | {'others':>6} | check"
    )


def row_note(row: dict) -> str:
    notes = []
    for side in ("ours", "reference"):
        result = row[side]
        if "failed" in result:
            notes.append(f"{side} FAILED ({result['failed']}):\n{result['stderr_tail']}")
        elif "skipped" in result:
            notes.append(f"{side} skipped: {result['skipped']}")
        elif "check" in result:
            check = result["check"]
            notes.append(check["text"] if check["agree"] else f"!!! MISMATCH !!! {check['text']}")
    plain = row.get("plain")
    if plain is not None:
        if "failed" in plain:
            notes.append(f"plain reference FAILED ({plain['failed']}):\n{plain['stderr_tail']}")
        else:
            check = plain["check"]
            agreement = check["text"] if check["agree"] else f"!!! MISMATCH !!! {check['text']}"
            speedup = f", speedup {row['plain_speedup']:.1f}x" if "plain_speedup" in row else ""
            notes.append(f"plain reference {plain['ms']:.1f} ms ({plain['peak_extra_mib']:.1f} MiB{speedup}), {agreement}")
    return "; ".join(notes)


def print_row(row: dict) -> None:
    def figure(result: dict, key: str, spec: str) -> str:
        return format(result[key], spec) if key in result else "-"

    ours, reference = row["ours"], row["reference"]
    ratio = f"{row['ratio']:.3f}x" if "ratio" in row else "-"
    speedup = f"{row['speedup']:.2f}x" if "speedup" in row else "-"
    print(
        f"{case_text(row['case']):>13} | {figure(ours, 'ms', '.3f'):>9} {figure(reference, 'ms', '.3f'):>9} {ratio:>8} {speedup:>8}"
        f" | {figure(ours, 'peak_extra_mib', '.1f'):>8} {figure(reference, 'peak_extra_mib', '.1f'):>8}"
        f" | {row['other_cpu_share']:>6.0%} | {row_note(row)}",
        flush=True,
    )


def benchmark_case(operator: Operator, case: dict, dtype_name: str, budget_seconds: float) -> dict:
    started = time.perf_counter(), machine_busy_seconds(), own_cpu_seconds()
    row = measure_case(operator, case, dtype_name, budget_seconds)
    finished = time.perf_counter(), machine_busy_seconds(), own_cpu_seconds()
    row["other_cpu_share"] = other_cpu_share(*(end - begin for begin, end in zip(started, finished)))
    return row


def measure_case(operator: Operator, case: dict, dtype_name: str, budget_seconds: float) -> dict:
    spec = {"operator": operator.name, "case": case, "dtype": dtype_name, "budget_seconds": budget_seconds}
    row: dict = {"case": case, "ours": measure_in_fresh_process({**spec, "implementation": "ours"})}
    needed = operator.reference_bytes(case, DTYPES[dtype_name])
    allowed = REFERENCE_MEMORY_SHARE * mem_available_bytes()
    if needed > allowed:
        row["reference"] = {
            "skipped": f"would need ~{needed / 2**30:.1f} GiB (> {allowed / 2**30:.1f} GiB, {REFERENCE_MEMORY_SHARE:.0%} of MemAvailable)",
            "estimated_gib": needed / 2**30,
        }
        return row
    row["reference"] = measure_in_fresh_process({**spec, "implementation": "reference"})
    if "ms" in row["ours"] and "ms" in row["reference"]:
        row["ratio"] = row["ours"]["ms"] / row["reference"]["ms"]
        row["speedup"] = row["reference"]["ms"] / row["ours"]["ms"]
    if operator.plain is not None:
        row["plain"] = measure_in_fresh_process({**spec, "implementation": "plain"})
        if "ms" in row["ours"] and "ms" in row["plain"]:
            row["plain_speedup"] = row["plain"]["ms"] / row["ours"]["ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description="Native operators against plain PyTorch references (CPU)")
    parser.add_argument("--quick", action="store_true", help="n in {1024, 4096}, w in {1, 64, n}, short timing (a demo)")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="input dtype (default float32)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return

    budget_seconds = TIME_BUDGET_SECONDS["quick" if args.quick else "full"]
    host = machine()
    print(f"machine: {host['cpu']}, torch.get_num_threads() = {host['threads']}, torch {host['torch']}, MemAvailable {host['mem_available_gib']:.1f} GiB")
    print("ms: median per call; MiB: peak resident growth of one call (fresh process each); speedup = ref / ours;")
    print("others: CPU share other processes took during the case (high = unreliable times)")
    results: dict = {"machine": host, "dtype": args.dtype, "quick": args.quick, "threshold": THRESHOLD, "tolerance": TOLERANCE}
    mismatches = []
    for operator in OPERATORS.values():
        print_header(operator, args.dtype)
        rows = []
        for case in cases(operator.name, args.quick):
            row = benchmark_case(operator, case, args.dtype, budget_seconds)
            print_row(row)
            rows.append(row)
            for side in ("reference", "plain"):
                check = row.get(side, {}).get("check")
                if check is not None and not check["agree"]:
                    mismatches.append(f"{operator.name} {row['case']} ({side}): {check['text']}")
        results[operator.name] = rows
    if mismatches:
        print("\n!!! results disagree with the reference in:\n  " + "\n  ".join(mismatches))

    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
