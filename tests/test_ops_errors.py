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
