"""refreekv.compact_kv against torch.gather: a gather never changes a value, so
results must be bitwise equal."""

import random

import pytest
import torch

import refreekv
from refreekv import reference


def make_cache(batch, kv_heads, keys, key_dim, value_dim, dtype, device, generator):
    key = torch.randn(batch, kv_heads, keys, key_dim, generator=generator).to(dtype=dtype, device=device)
    value = torch.randn(batch, kv_heads, keys, value_dim, generator=generator).to(dtype=dtype, device=device)
    return key, value


def sinks_and_recent(batch, kv_heads, keys, kept, sinks=4):
    """keep_index for StreamingLLM-like cuts: per sequence, the first sinks plus
    the most recent positions, padded with -1 (ignored) past each count."""
    rows = max(kept)
    index = torch.full((batch, kv_heads, rows), -1, dtype=torch.int64)
    for b, count in enumerate(kept):
        head = list(range(min(sinks, count))) + list(range(keys - (count - min(sinks, count)), keys))
        index[b, :, :count] = torch.tensor(head, dtype=torch.int64)
    return index, torch.tensor(kept, dtype=torch.int64)


def assert_matches_reference(key, value, keep_index, keep_len):
    ours = refreekv.compact_kv(key, value, keep_index, keep_len)
    expected = reference.compact_kv(key.cpu(), value.cpu(), keep_index.cpu(), keep_len.cpu())
    for got, want in zip(ours, expected):
        assert got.dtype == want.dtype and got.shape == want.shape and got.device == key.device
        assert torch.equal(got.cpu(), want)
    return ours


@pytest.mark.parametrize("kept", [[10, 10], [10, 4], [0, 7], [25, 25]])
def test_sinks_and_recent(device, dtype, generator, kept):
    key, value = make_cache(2, 3, 25, 16, 16, dtype, device, generator)
    keep_index, keep_len = sinks_and_recent(2, 3, 25, kept)
    assert_matches_reference(key, value, keep_index.to(device), keep_len.to(device))


def test_per_head_indices_and_value_dim(device, dtype, generator):
    # SnapKV-style cuts choose different positions per head; values may have
    # their own head dimension.
    key, value = make_cache(2, 4, 40, 8, 12, dtype, device, generator)
    keep_index = torch.stack([torch.randperm(40, generator=generator)[:15] for _ in range(8)]).view(2, 4, 15)
    keep_len = torch.tensor([15, 9])
    key_out, value_out, valid = assert_matches_reference(key, value, keep_index.to(device), keep_len.to(device))
    assert valid.tolist() == [[True] * 15, [True] * 9 + [False] * 6]
    assert (key_out[1, :, 9:] == 0).all() and (value_out[1, :, 9:] == 0).all()


def test_randomized_sweep(device):
    rng = random.Random(3)
    generator = torch.Generator().manual_seed(3)
    for case in range(200):
        batch, kv_heads, keys = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 90)
        rows = rng.randint(0, 2 * keys)
        keep_index = torch.randint(0, keys, (batch, kv_heads, rows), generator=generator)
        keep_len = torch.tensor([rng.randint(0, rows) for _ in range(batch)], dtype=torch.int64)
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        key, value = make_cache(batch, kv_heads, keys, rng.choice([1, 8, 64]), rng.choice([1, 8, 64]), dtype, device, generator)
        try:
            assert_matches_reference(key, value, keep_index.to(device), keep_len.to(device))
        except AssertionError as failure:
            raise AssertionError(f"case {case}: {tuple(key.shape)} rows={rows} keep_len={keep_len.tolist()}") from failure


def test_non_contiguous_and_expanded_inputs(device, generator):
    key, value = make_cache(2, 1, 30, 8, 8, torch.float32, device, generator)
    wide_key, wide_value = key.expand(2, 3, 30, 8), value.transpose(2, 3).contiguous().transpose(2, 3).expand(2, 3, 30, 8)
    keep_index, keep_len = sinks_and_recent(2, 3, 30, [12, 6])
    strided_index = keep_index.transpose(1, 2).contiguous().transpose(1, 2).to(device)
    assert not strided_index.is_contiguous()
    assert_matches_reference(wide_key, wide_value, strided_index, keep_len.to(device))


def test_inputs_are_not_modified(device, generator):
    key, value = make_cache(1, 2, 10, 4, 4, torch.float16, device, generator)
    keep_index, keep_len = sinks_and_recent(1, 2, 10, [6])
    inputs = (key, value, keep_index.to(device), keep_len.to(device))
    before = [t.clone() for t in inputs]
    refreekv.compact_kv(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(before, inputs))


def test_opcheck(device, generator):
    key, value = make_cache(2, 2, 20, 8, 4, torch.float32, device, generator)
    keep_index, keep_len = sinks_and_recent(2, 2, 20, [9, 5])
    torch.library.opcheck(torch.ops.refreekv.compact_kv.default, (key, value, keep_index.to(device), keep_len.to(device)))
