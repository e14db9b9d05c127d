"""GrowingLayer: the cache layer that appends decoded tokens in place must
hold exactly what transformers' concatenating layer holds, whatever
transformers does to it in between, and never write into the tensors it
was built from (a branched prefill shares them between caches)."""

import torch

from refreekv.integration.cache import GrowingLayer
from refreekv.integration.compat import DynamicLayer


def kv(batch=3, heads=2, rows=5, dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, rows, dim, generator=generator), torch.randn(batch, heads, rows, dim, generator=generator)


def concatenating(keys, values):
    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


def assert_same(growing, plain):
    assert torch.equal(growing.keys, plain.keys) and torch.equal(growing.values, plain.values)
    assert growing.get_seq_length() == plain.get_seq_length()


def test_appends_equal_concatenation_and_reallocate_rarely():
    keys, values = kv(rows=1000)
    growing, plain = GrowingLayer(keys, values), concatenating(keys, values)
    buffers = set()
    for step in range(300):
        new_keys, new_values = kv(rows=1, seed=step + 1)
        out = growing.update(new_keys, new_values)
        plain.update(new_keys, new_values)
        assert out[0] is growing.keys and out[1] is growing.values
        assert_same(growing, plain)
        buffers.add(growing.keys.data_ptr())
    # 1000 rows, then 256 spare rows, then an eighth more: two allocations for 300 appends.
    assert len(buffers) == 2


def test_never_writes_into_the_tensors_it_starts_from():
    keys, values = kv(rows=8)
    original = keys.clone(), values.clone()
    growing = GrowingLayer(keys, values)
    growing.update(*kv(rows=2, seed=1))
    growing.crop(-5)  # a view of the start it was given would be written into next
    growing.update(*kv(rows=3, seed=2))
    assert torch.equal(keys, original[0]) and torch.equal(values, original[1])


def test_crop_then_append_matches_concatenation():
    growing, plain = GrowingLayer(*kv()), concatenating(*kv())
    for seed in (1, 2):
        growing.update(*kv(rows=4, seed=seed))
        plain.update(*kv(rows=4, seed=seed))
    growing.crop(-3)
    plain.crop(-3)
    growing.update(*kv(rows=2, seed=3))
    plain.update(*kv(rows=2, seed=3))
    assert_same(growing, plain)


def test_batch_selection_and_reordering_then_append_match_concatenation():
    growing, plain = GrowingLayer(*kv()), concatenating(*kv())
    growing.update(*kv(rows=1, seed=1))
    plain.update(*kv(rows=1, seed=1))
    selected = torch.tensor([2, 0])
    growing.batch_select_indices(selected)
    plain.batch_select_indices(selected)
    growing.update(*kv(batch=2, rows=1, seed=2))
    plain.update(*kv(batch=2, rows=1, seed=2))
    assert_same(growing, plain)
    growing.batch_repeat_interleave(2)
    plain.batch_repeat_interleave(2)
    growing.update(*kv(batch=4, rows=3, seed=3))
    plain.update(*kv(batch=4, rows=3, seed=3))
    assert_same(growing, plain)
