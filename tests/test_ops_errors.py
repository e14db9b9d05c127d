"""Bad input gets a clear error that says what was expected and what was given."""

import pytest
import torch

import refreekv


def importance_inputs(**changes):
    inputs = dict(
        query=torch.randn(2, 4, 3, 8),
        key=torch.randn(2, 2, 10, 8),
        scale=0.5,
        kv_valid=None,
        group_reduce=None,
        softcap=0.0,
        sinks=None,
    )
    inputs.update(changes)
    return inputs


IMPORTANCE_CASES = {
    "query rank": (dict(query=torch.randn(4, 3, 8)), r"expected query of shape \[batch, heads, window, head_dim\] \(4-D\), got a 3-D tensor of shape \[4, 3, 8\]"),
    "key rank": (dict(key=torch.randn(2, 10, 8)), r"expected key of shape .* \(4-D\), got a 3-D"),
    "integer query": (dict(query=torch.ones(2, 4, 3, 8, dtype=torch.int32)), r"expected query to be float32, float16 or bfloat16, got Int"),
    "dtype mismatch": (dict(key=torch.randn(2, 2, 10, 8, dtype=torch.float16)), r"expected query and key of the same dtype, got query Float and key Half"),
    "no query heads": (dict(query=torch.randn(2, 0, 3, 8)), r"expected at least one query head, got query of shape \[2, 0, 3, 8\]"),
    "heads not a multiple": (dict(key=torch.randn(2, 3, 10, 8)), r"expected the query heads to be a multiple of the key heads .* got 4 query heads and 3 key heads"),
    "batch mismatch": (dict(key=torch.randn(1, 2, 10, 8)), r"expected key.size\(0\) == 2 \(batch size of query\), got 1"),
    "head_dim mismatch": (dict(key=torch.randn(2, 2, 10, 16)), r"expected key.size\(3\) == 8 \(head_dim of query\), got 16"),
    "window larger than keys": (dict(key=torch.randn(2, 2, 2, 8)), r"expected window <= keys, .* got window = 3 and keys = 2"),
    "empty window": (dict(query=torch.randn(2, 4, 0, 8)), r"expected at least one query row \(window >= 1\), got window = 0"),
    "no keys": (dict(key=torch.randn(2, 2, 0, 8)), r"expected at least one key \(n >= 1\), got n = 0"),
    "non-finite scale": (dict(scale=float("nan")), r"expected a finite scale, got nan"),
    "mask dtype": (dict(kv_valid=torch.ones(2, 10)), r"expected kv_valid of dtype bool, got Float"),
    "mask shape": (dict(kv_valid=torch.ones(2, 9, dtype=torch.bool)), r"expected kv_valid.size\(1\) == 10 \(number of keys\), got 9"),
    "mask rank": (dict(kv_valid=torch.ones(10, dtype=torch.bool)), r"expected kv_valid of shape \[batch, keys\] \(2-D\), got a 1-D"),
    "group reduce": (dict(group_reduce="sum"), r"expected group_reduce to be 'none', 'mean' or 'max', got 'sum'"),
    "negative softcap": (dict(softcap=-1.0), r"expected softcap to be 0 \(no capping\) or positive and finite in float32, got -1"),
    "nan softcap": (dict(softcap=float("nan")), r"expected softcap to be 0 .* got nan"),
    "infinite softcap": (dict(softcap=float("inf")), r"expected softcap to be 0 .* got inf"),
    "softcap beyond float32": (dict(softcap=1e39), r"positive and finite in float32, got 1e\+39"),
    "softcap zero in float32": (dict(softcap=1e-50), r"positive and finite in float32, got 1e-50"),
    "sinks rank": (dict(sinks=torch.zeros(4, 1)), r"expected sinks of shape \[heads\] \(1-D\), got a 2-D tensor of shape \[4, 1\]"),
    "sinks per key head": (dict(sinks=torch.zeros(2)), r"expected sinks.size\(0\) == 4 \(query heads\), got 2"),
    "integer sinks": (dict(sinks=torch.zeros(4, dtype=torch.int64)), r"expected sinks of a floating dtype, got Long"),
    "nan sink": (dict(sinks=torch.tensor([0.0, float("nan"), 0.0, 0.0])), r"expected finite sinks \(in float32\), got sinks\[1\] = nan"),
    "infinite sink": (dict(sinks=torch.tensor([0.0, 0.0, float("-inf"), 0.0])), r"got sinks\[2\] = -inf"),
    "sink beyond float32": (dict(sinks=torch.tensor([0.0, 0.0, 0.0, 1e39], dtype=torch.float64)), r"got sinks\[3\] = inf"),
}


@pytest.mark.parametrize("case", IMPORTANCE_CASES, ids=list(IMPORTANCE_CASES))
def test_attention_importance_rejects(case):
    changes, message = IMPORTANCE_CASES[case]
    inputs = importance_inputs(**changes)
    with pytest.raises(RuntimeError, match=message):
        refreekv.attention_importance(
            inputs["query"],
            inputs["key"],
            inputs["scale"],
            kv_valid=inputs["kv_valid"],
            group_reduce=inputs["group_reduce"],
            softcap=inputs["softcap"],
            sinks=inputs["sinks"],
        )


KEEP_COUNT_CASES = {
    "rank": (torch.rand(2, 10), 0.01, None, r"expected ranked_scores of shape \[batch, heads, candidates\] \(3-D\), got a 2-D"),
    "integer scores": (torch.ones(1, 2, 10, dtype=torch.int64), 0.01, None, r"expected ranked_scores to be float32, float16 or bfloat16, got Long"),
    "negative threshold": (torch.rand(1, 2, 10), -0.1, None, r"expected threshold in \[0, 1\), got -0.1"),
    "threshold one": (torch.rand(1, 2, 10), 1.0, None, r"expected threshold in \[0, 1\), got 1"),
    "nan threshold": (torch.rand(1, 2, 10), float("nan"), None, r"expected threshold in \[0, 1\), got nan"),
    "no heads": (torch.rand(1, 0, 10), 0.01, None, r"expected at least one head"),
    "valid_len dtype": (torch.rand(1, 2, 10), 0.01, torch.tensor([3], dtype=torch.int32), r"expected valid_len of dtype int64, got Int"),
    "valid_len shape": (torch.rand(2, 2, 10), 0.01, torch.tensor([3]), r"expected valid_len.size\(0\) == 2 \(batch size of ranked_scores\), got 1"),
    "valid_len too large": (torch.rand(2, 2, 10), 0.01, torch.tensor([3, 11]), r"expected valid_len\[1\] in \[0, 10\] \(the number of candidates\), got 11"),
    "valid_len negative": (torch.rand(1, 2, 10), 0.01, torch.tensor([-1]), r"expected valid_len\[0\] in \[0, 10\] .* got -1"),
    "nan scores": (torch.tensor([[[1.0, float("nan")]]]), 0.01, None, r"expected finite ranked_scores, got NaN or inf"),
}


@pytest.mark.parametrize("case", KEEP_COUNT_CASES, ids=list(KEEP_COUNT_CASES))
def test_adaptive_keep_count_rejects(case):
    scores, threshold, valid_len, message = KEEP_COUNT_CASES[case]
    with pytest.raises(RuntimeError, match=message):
        refreekv.adaptive_keep_count(scores, threshold, valid_len=valid_len)


MASS_KEEP_COUNT_CASES = {
    "rank": (torch.rand(2, 10), 0.01, None, r"mass_keep_count: expected ranked_scores of shape \[batch, heads, candidates\] \(3-D\), got a 2-D"),
    "integer scores": (torch.ones(1, 2, 10, dtype=torch.int64), 0.01, None, r"expected ranked_scores to be float32, float16 or bfloat16, got Long"),
    "negative tolerance": (torch.rand(1, 2, 10), -0.1, None, r"mass_keep_count: expected tolerance in \[0, 1\), got -0.1"),
    "tolerance one": (torch.rand(1, 2, 10), 1.0, None, r"expected tolerance in \[0, 1\), got 1"),
    "nan tolerance": (torch.rand(1, 2, 10), float("nan"), None, r"expected tolerance in \[0, 1\), got nan"),
    "valid_len dtype": (torch.rand(1, 2, 10), 0.01, torch.tensor([3], dtype=torch.int32), r"expected valid_len of dtype int64, got Int"),
    "valid_len rank": (torch.rand(1, 2, 10), 0.01, torch.tensor([[3]]), r"expected valid_len of shape \[batch\] \(1-D\), got a 2-D"),
    "valid_len shape": (torch.rand(2, 2, 10), 0.01, torch.tensor([3]), r"expected valid_len.size\(0\) == 2 \(batch size of ranked_scores\), got 1"),
    "valid_len too large": (torch.rand(2, 2, 10), 0.01, torch.tensor([3, 11]), r"mass_keep_count: expected valid_len\[1\] in \[0, 10\] \(the number of candidates\), got 11"),
    "valid_len negative": (torch.rand(1, 2, 10), 0.01, torch.tensor([-1]), r"expected valid_len\[0\] in \[0, 10\] .* got -1"),
    "nan score": (torch.tensor([[[1.0, float("nan")]]]), 0.01, None, r"expected finite, non-negative ranked_scores, got ranked_scores\[0, 0, 1\] = nan"),
    "inf score": (torch.tensor([[[1.0, 2.0], [float("inf"), 1.0]]]), 0.01, None, r"expected finite, non-negative ranked_scores, got ranked_scores\[0, 1, 0\] = inf"),
    "negative score": (torch.tensor([[[1.0, 2.0]], [[0.5, -0.25]]]), 0.0, None, r"expected finite, non-negative ranked_scores, got ranked_scores\[1, 0, 1\] = -0.25"),
    # The first bad score in row-major order is named, whatever the threads did.
    "first of many": (torch.full((4, 8, 100), -1.0), 0.5, None, r"got ranked_scores\[0, 0, 0\] = -1"),
}


@pytest.mark.parametrize("case", MASS_KEEP_COUNT_CASES, ids=list(MASS_KEEP_COUNT_CASES))
def test_mass_keep_count_rejects(case):
    scores, tolerance, valid_len, message = MASS_KEEP_COUNT_CASES[case]
    with pytest.raises(RuntimeError, match=message):
        refreekv.mass_keep_count(scores, tolerance, valid_len=valid_len)


def test_mass_keep_count_checks_bad_scores_at_any_tolerance():
    # Validation does not depend on which path (lossless or searched) runs.
    scores = torch.rand(2, 3, 70)
    scores[1, 2, 65] = -1e-3
    for tolerance in (0.0, 0.3):
        with pytest.raises(RuntimeError, match=r"ranked_scores\[1, 2, 65\] = -0.001"):
            refreekv.mass_keep_count(scores, tolerance)


def compact_inputs(**changes):
    inputs = dict(
        key=torch.randn(2, 2, 10, 4),
        value=torch.randn(2, 2, 10, 4),
        keep_index=torch.zeros(2, 2, 5, dtype=torch.int64),
        keep_len=torch.tensor([5, 3]),
    )
    inputs.update(changes)
    return inputs


def index_with(position, value):
    index = torch.zeros(2, 2, 5, dtype=torch.int64)
    index[position] = value
    return index


COMPACT_CASES = {
    "key rank": (dict(key=torch.randn(2, 10, 4)), r"expected key of shape \[batch, kv_heads, keys, head_dim\] \(4-D\), got a 3-D"),
    "value dtype": (dict(value=torch.randn(2, 2, 10, 4, dtype=torch.bfloat16)), r"expected key and value of the same dtype, got key Float and value BFloat16"),
    "integer cache": (dict(key=torch.ones(2, 2, 10, 4, dtype=torch.int32), value=torch.ones(2, 2, 10, 4, dtype=torch.int32)), r"expected key to be float32, float16 or bfloat16, got Int"),
    "value positions": (dict(value=torch.randn(2, 2, 9, 4)), r"expected value.size\(2\) == 10 \(positions of key\), got 9"),
    "index dtype": (dict(keep_index=torch.zeros(2, 2, 5, dtype=torch.int32)), r"expected keep_index of dtype int64, got Int"),
    "index heads": (dict(keep_index=torch.zeros(2, 3, 5, dtype=torch.int64)), r"expected keep_index.size\(1\) == 2 \(kv_heads of key\), got 3"),
    "keep_len shape": (dict(keep_len=torch.tensor([5])), r"expected keep_len.size\(0\) == 2 \(batch size of key\), got 1"),
    "keep_len above r_max": (dict(keep_len=torch.tensor([6, 3])), r"expected keep_len\[0\] in \[0, 5\] \(keep_index.size\(2\)\), got 6"),
    "keep_len negative": (dict(keep_len=torch.tensor([5, -2])), r"expected keep_len\[1\] in \[0, 5\] .* got -2"),
    "index too large": (dict(keep_index=index_with((1, 1, 2), 10)), r"expected keep_index\[1, 1, 2\] in \[0, 10\) \(the number of cached positions\), got 10"),
    "index negative": (dict(keep_index=index_with((0, 0, 4), -1)), r"expected keep_index\[0, 0, 4\] in \[0, 10\) .* got -1"),
}


@pytest.mark.parametrize("case", COMPACT_CASES, ids=list(COMPACT_CASES))
def test_compact_kv_rejects(case):
    changes, message = COMPACT_CASES[case]
    with pytest.raises(RuntimeError, match=message):
        refreekv.compact_kv(**compact_inputs(**changes))


def test_compact_kv_ignores_indices_past_keep_len():
    # Row 4 of sequence 1 is padding (keep_len 3): its index is never read.
    inputs = compact_inputs(keep_index=index_with((1, 0, 4), 10_000))
    key_out, _, valid = refreekv.compact_kv(**inputs)
    assert not valid[1, 4] and (key_out[1, :, 3:] == 0).all()


def call_cpu_kernel(op, *args):
    # A tensor on another device would make the dispatcher pick that device's
    # kernel; calling the CPU kernel directly shows what it does with a
    # foreign tensor (this machine may have no second real device).
    return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)


def test_device_mismatch_is_rejected():
    cpu_query, meta_key = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 10, 8, device="meta")
    with pytest.raises(RuntimeError, match=r"expected key on the same device as query \(cpu\), got meta"):
        call_cpu_kernel(torch.ops.refreekv.attention_importance.default, cpu_query, meta_key, 0.5, None, True, "none")
    meta_sinks = torch.zeros(4, device="meta")
    with pytest.raises(RuntimeError, match=r"expected sinks on the same device as query \(cpu\), got meta"):
        call_cpu_kernel(
            torch.ops.refreekv.attention_importance.default, cpu_query, torch.randn(2, 2, 10, 8), 0.5, None, True, "none", 0.0, meta_sinks
        )
    meta_lengths = torch.tensor([5, 3], device="meta")
    with pytest.raises(RuntimeError, match=r"expected valid_len on the same device as ranked_scores \(cpu\), got meta"):
        call_cpu_kernel(torch.ops.refreekv.adaptive_keep_count.default, torch.rand(2, 2, 10), 0.01, meta_lengths)
    with pytest.raises(RuntimeError, match=r"mass_keep_count: expected valid_len on the same device as ranked_scores \(cpu\), got meta"):
        call_cpu_kernel(torch.ops.refreekv.mass_keep_count.default, torch.rand(2, 2, 10), 0.01, meta_lengths)
    inputs = compact_inputs(keep_len=meta_lengths)
    with pytest.raises(RuntimeError, match=r"expected keep_len on the same device as key \(cpu\), got meta"):
        call_cpu_kernel(torch.ops.refreekv.compact_kv.default, *inputs.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to hold the mismatched tensor")
def test_cpu_and_cuda_tensors_are_not_mixed():
    with pytest.raises(RuntimeError, match=r"expected key on the same device as query"):
        refreekv.attention_importance(torch.randn(2, 4, 3, 8, device="cuda"), torch.randn(2, 2, 10, 8), 0.5)
    cuda_query, cuda_key = torch.randn(2, 4, 3, 8, device="cuda"), torch.randn(2, 2, 10, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"expected sinks on the same device as query \(cuda:0\), got cpu"):
        refreekv.attention_importance(cuda_query, cuda_key, 0.5, sinks=torch.zeros(4))


def paged_attention_inputs(**changes):
    # Blocks of 4 rows, 3 per head: heads hold up to 12 rows.
    inputs = dict(
        query=torch.randn(2, 4, 3, 8),
        key_pool=torch.randn(6, 4, 8),
        value_pool=torch.randn(6, 4, 8),
        block_table=torch.tensor([[[0, 1, 2], [3, 4, 5]], [[5, 4, 3], [2, 1, 0]]]),
        lengths=torch.tensor([[5, 3], [12, 0]]),
        scale=0.5,
        softcap=0.0,
        sinks=None,
    )
    inputs.update(changes)
    return inputs


def table_with(position, block):
    table = paged_attention_inputs()["block_table"].clone()
    table[position] = block
    return table


PAGED_ATTENTION_CASES = {
    "query rank": (dict(query=torch.randn(4, 3, 8)), r"paged_attention: expected query of shape \[batch, heads, queries, head_dim\] \(4-D\), got a 3-D tensor of shape \[4, 3, 8\]"),
    "key_pool rank": (dict(key_pool=torch.randn(24, 8)), r"expected key_pool of shape \[blocks, block_rows, head_dim\] \(3-D\), got a 2-D tensor of shape \[24, 8\]"),
    "value_pool rank": (dict(value_pool=torch.randn(1, 6, 4, 8)), r"expected value_pool of shape \[blocks, block_rows, value_dim\] \(3-D\), got a 4-D"),
    "integer query": (dict(query=torch.ones(2, 4, 3, 8, dtype=torch.int32)), r"expected query to be float32, float16 or bfloat16, got Int"),
    "pools not in the query's dtype": (
        dict(key_pool=torch.randn(6, 4, 8, dtype=torch.float16), value_pool=torch.randn(6, 4, 8, dtype=torch.float16)),
        r"expected query and key_pool of the same dtype, got query Float and key_pool Half",
    ),
    "pools of different dtypes": (dict(value_pool=torch.randn(6, 4, 8, dtype=torch.bfloat16)), r"expected key_pool and value_pool of the same dtype, got key_pool Float and value_pool BFloat16"),
    "pools of different block counts": (dict(value_pool=torch.randn(5, 4, 8)), r"expected value_pool.size\(0\) == 6 \(blocks of key_pool\), got 5"),
    "pools of different block rows": (dict(value_pool=torch.randn(6, 3, 8)), r"expected value_pool.size\(1\) == 4 \(block_rows of key_pool\), got 3"),
    "empty blocks": (dict(key_pool=torch.randn(6, 0, 8), value_pool=torch.randn(6, 0, 8)), r"expected at least one row per block \(block_rows >= 1\), got key_pool of shape \[6, 0, 8\]"),
    "head_dim mismatch": (dict(key_pool=torch.randn(6, 4, 16)), r"expected key_pool.size\(2\) == 8 \(head_dim of query\), got 16"),
    "no query rows": (dict(query=torch.randn(2, 4, 0, 8)), r"expected at least one query row \(queries >= 1\), got queries = 0"),
    "empty head_dim": (dict(query=torch.randn(2, 4, 3, 0), key_pool=torch.randn(6, 4, 0)), r"expected head_dim >= 1, got 0"),
    "block_table rank": (dict(block_table=torch.zeros(2, 6, dtype=torch.int64)), r"expected block_table of shape \[batch, kv_heads, max_blocks\] \(3-D\), got a 2-D"),
    "block_table not int64": (dict(block_table=torch.zeros(2, 2, 3, dtype=torch.int32)), r"expected block_table of dtype int64, got Int"),
    "block_table batch": (dict(block_table=torch.zeros(1, 2, 3, dtype=torch.int64)), r"expected block_table.size\(0\) == 2 \(batch size of query\), got 1"),
    "heads not a multiple": (
        dict(block_table=torch.zeros(2, 3, 3, dtype=torch.int64), lengths=torch.zeros(2, 3, dtype=torch.int64)),
        r"expected the query heads to be a multiple of the key heads .* got 4 query heads and 3 key heads",
    ),
    "lengths rank": (dict(lengths=torch.tensor([5, 3])), r"expected lengths of shape \[batch, kv_heads\] \(2-D\), got a 1-D"),
    "lengths shape": (dict(lengths=torch.zeros(2, 3, dtype=torch.int64)), r"expected lengths.size\(1\) == 2 \(kv_heads of block_table\), got 3"),
    "lengths dtype": (dict(lengths=torch.tensor([[5, 3], [12, 0]], dtype=torch.int32)), r"expected lengths of dtype int64, got Int"),
    "non-finite scale": (dict(scale=float("inf")), r"paged_attention: expected a finite scale, got inf"),
    "negative softcap": (dict(softcap=-1.0), r"paged_attention: expected softcap to be 0 \(no capping\) or positive and finite in float32, got -1"),
    "softcap beyond float32": (dict(softcap=1e39), r"positive and finite in float32, got 1e\+39"),
    "sinks per key head": (dict(sinks=torch.zeros(2)), r"paged_attention: expected sinks.size\(0\) == 4 \(query heads\), got 2"),
    "integer sinks": (dict(sinks=torch.zeros(4, dtype=torch.int64)), r"expected sinks of a floating dtype, got Long"),
    "length past the table": (dict(lengths=torch.tensor([[5, 3], [13, 0]])), r"paged_attention: expected lengths\[1, 0\] in \[0, 12\] \(max_blocks \* block_rows\), got 13"),
    "negative length": (dict(lengths=torch.tensor([[5, -1], [12, 0]])), r"expected lengths\[0, 1\] in \[0, 12\] .* got -1"),
    "block id past the pool": (dict(block_table=table_with((1, 0, 2), 6)), r"paged_attention: expected block_table\[1, 0, 2\] in \[0, 6\) \(the blocks in the pool\), got 6"),
    "negative block id": (dict(block_table=table_with((0, 0, 1), -1)), r"expected block_table\[0, 0, 1\] in \[0, 6\) .* got -1"),
}


@pytest.mark.parametrize("case", PAGED_ATTENTION_CASES, ids=list(PAGED_ATTENTION_CASES))
def test_paged_attention_rejects(case):
    changes, message = PAGED_ATTENTION_CASES[case]
    inputs = paged_attention_inputs(**changes)
    with pytest.raises(RuntimeError, match=message):
        refreekv.paged_attention(
            inputs["query"],
            inputs["key_pool"],
            inputs["value_pool"],
            inputs["block_table"],
            inputs["lengths"],
            inputs["scale"],
            softcap=inputs["softcap"],
            sinks=inputs["sinks"],
        )


def test_paged_attention_ignores_table_entries_past_a_head():
    # Head (0, 1) holds 3 rows, all in its first block: its other entries are never read.
    inputs = paged_attention_inputs(block_table=table_with((0, 1, 2), 10_000))
    refreekv.paged_attention(**inputs)


def paged_write_inputs(**changes):
    inputs = dict(
        key_pool=torch.randn(6, 4, 8),
        value_pool=torch.randn(6, 4, 8),
        block_table=paged_attention_inputs()["block_table"],
        start=torch.tensor([[0, 2], [5, 0]]),
        key=torch.randn(2, 2, 5, 8),
        value=torch.randn(2, 2, 5, 8),
        row_index=None,
        row_count=None,
    )
    inputs.update(changes)
    return inputs


def row_index_with(position, row):
    index = torch.zeros(2, 2, 3, dtype=torch.int64)
    index[position] = row
    return index


PAGED_WRITE_CASES = {
    "key_pool rank": (dict(key_pool=torch.randn(24, 8)), r"paged_write: expected key_pool of shape \[blocks, block_rows, head_dim\] \(3-D\), got a 2-D"),
    "integer pools": (dict(key_pool=torch.ones(6, 4, 8, dtype=torch.int32), value_pool=torch.ones(6, 4, 8, dtype=torch.int32)), r"expected key_pool to be float32, float16 or bfloat16, got Int"),
    "pools of different dtypes": (dict(value_pool=torch.randn(6, 4, 8, dtype=torch.float16)), r"expected key_pool and value_pool of the same dtype, got key_pool Float and value_pool Half"),
    "pools of different block counts": (dict(value_pool=torch.randn(7, 4, 8)), r"expected value_pool.size\(0\) == 6 \(blocks of key_pool\), got 7"),
    "rows not in the pools' dtype": (dict(key=torch.randn(2, 2, 5, 8, dtype=torch.float16)), r"expected key and value of the pools' dtype \(Float\), got key Half and value Float"),
    "key rank": (dict(key=torch.randn(2, 5, 8)), r"expected key of shape \[batch, kv_heads, rows, head_dim\] \(4-D\), got a 3-D"),
    "value rank": (dict(value=torch.randn(2, 5, 8)), r"expected value of shape \[batch, kv_heads, rows, value_dim\] \(4-D\), got a 3-D"),
    "key batch": (dict(key=torch.randn(1, 2, 5, 8), value=torch.randn(1, 2, 5, 8)), r"expected key.size\(0\) == 2 \(batch size of block_table\), got 1"),
    "key heads": (dict(key=torch.randn(2, 4, 5, 8), value=torch.randn(2, 4, 5, 8)), r"expected key.size\(1\) == 2 \(kv_heads of block_table\), got 4"),
    "key head_dim": (dict(key=torch.randn(2, 2, 5, 16)), r"expected key.size\(3\) == 8 \(head_dim of key_pool\), got 16"),
    "value rows": (dict(value=torch.randn(2, 2, 4, 8)), r"expected value.size\(2\) == 5 \(rows of key\), got 4"),
    "value_dim": (dict(value=torch.randn(2, 2, 5, 6)), r"expected value.size\(3\) == 8 \(value_dim of value_pool\), got 6"),
    "block_table not int64": (dict(block_table=torch.zeros(2, 2, 3, dtype=torch.int32)), r"paged_write: expected block_table of dtype int64, got Int"),
    "start dtype": (dict(start=torch.zeros(2, 2, dtype=torch.int32)), r"expected start of dtype int64, got Int"),
    "start rank": (dict(start=torch.zeros(2, dtype=torch.int64)), r"expected start of shape \[batch, kv_heads\] \(2-D\), got a 1-D"),
    "start shape": (dict(start=torch.zeros(2, 3, dtype=torch.int64)), r"expected start.size\(1\) == 2 \(kv_heads of block_table\), got 3"),
    "row_index dtype": (dict(row_index=torch.zeros(2, 2, 3, dtype=torch.int32)), r"expected row_index of dtype int64, got Int"),
    "row_index rank": (dict(row_index=torch.zeros(2, 3, dtype=torch.int64)), r"expected row_index of shape \[batch, kv_heads, written\] \(3-D\), got a 2-D"),
    "row_index heads": (dict(row_index=torch.zeros(2, 1, 3, dtype=torch.int64)), r"expected row_index.size\(1\) == 2 \(kv_heads of block_table\), got 1"),
    "row_count shape": (dict(row_count=torch.zeros(1, 2, dtype=torch.int64)), r"expected row_count.size\(0\) == 2 \(batch size of block_table\), got 1"),
    "row_count dtype": (dict(row_count=torch.zeros(2, 2, dtype=torch.float32)), r"expected row_count of dtype int64, got Float"),
    "negative start": (dict(start=torch.tensor([[0, 2], [-1, 0]])), r"paged_write: expected start\[1, 0\] >= 0, got -1"),
    "row_count past row_index": (
        dict(row_index=torch.zeros(2, 2, 3, dtype=torch.int64), row_count=torch.tensor([[3, 4], [0, 0]])),
        r"paged_write: expected row_count\[0, 1\] in \[0, 3\] \(the rows row_index lists, or key.size\(2\)\), got 4",
    ),
    "row_count past key": (dict(row_count=torch.tensor([[0, 0], [6, 0]])), r"expected row_count\[1, 0\] in \[0, 5\] .* got 6"),
    "negative row_count": (dict(row_count=torch.tensor([[0, 0], [0, -2]])), r"expected row_count\[1, 1\] in \[0, 5\] .* got -2"),
    "row_index past key": (dict(row_index=row_index_with((1, 1, 2), 5)), r"paged_write: expected row_index\[1, 1, 2\] in \[0, 5\) \(the rows of key\), got 5"),
    "negative row_index": (dict(row_index=row_index_with((0, 1, 0), -1)), r"expected row_index\[0, 1, 0\] in \[0, 5\) .* got -1"),
    "write past the table": (
        dict(start=torch.tensor([[0, 8], [5, 0]])),
        r"paged_write: expected the written rows \[8, 8 \+ 5\) of head \[0, 1\] within the block table's max_blocks \* block_rows = 12 rows, got start\[0, 1\] = 8 and 5 rows",
    ),
    "block id past the pool": (dict(block_table=table_with((1, 0, 2), 6)), r"paged_write: expected block_table\[1, 0, 2\] in \[0, 6\) \(the blocks in the pool\), got 6"),
    "negative block id": (dict(block_table=table_with((0, 1, 1), -3)), r"expected block_table\[0, 1, 1\] in \[0, 6\) .* got -3"),
    "strided pool": (dict(key_pool=torch.randn(4, 6, 8).transpose(0, 1)), r"paged_write: expected contiguous key_pool and value_pool \(they are written in place\), got strides"),
}


@pytest.mark.parametrize("case", PAGED_WRITE_CASES, ids=list(PAGED_WRITE_CASES))
def test_paged_write_rejects(case):
    changes, message = PAGED_WRITE_CASES[case]
    with pytest.raises(RuntimeError, match=message):
        refreekv.paged_write(**paged_write_inputs(**changes))


def test_rejected_paged_write_changes_nothing():
    # Head (1, 1) is bad; the rows of every other head are not written either.
    inputs = paged_write_inputs(row_index=row_index_with((1, 1, 2), 5))
    before = inputs["key_pool"].clone(), inputs["value_pool"].clone()
    with pytest.raises(RuntimeError, match=r"row_index\[1, 1, 2\]"):
        refreekv.paged_write(**inputs)
    assert torch.equal(inputs["key_pool"], before[0]) and torch.equal(inputs["value_pool"], before[1])


def test_paged_device_mismatch_is_rejected():
    meta_lengths = torch.zeros(2, 2, dtype=torch.int64, device="meta")
    inputs = paged_attention_inputs(lengths=meta_lengths)
    with pytest.raises(RuntimeError, match=r"paged_attention: expected lengths on the same device as key_pool \(cpu\), got meta"):
        call_cpu_kernel(torch.ops.refreekv.paged_attention.default, *inputs.values())
    inputs = paged_attention_inputs(sinks=torch.zeros(4, device="meta"))
    with pytest.raises(RuntimeError, match=r"paged_attention: expected sinks on the same device as query \(cpu\), got meta"):
        call_cpu_kernel(torch.ops.refreekv.paged_attention.default, *inputs.values())
    inputs = paged_write_inputs(row_index=torch.zeros(2, 2, 3, dtype=torch.int64, device="meta"))
    with pytest.raises(RuntimeError, match=r"paged_write: expected row_index on the same device as key_pool \(cpu\), got meta"):
        call_cpu_kernel(torch.ops.refreekv.paged_write.default, *inputs.values())
