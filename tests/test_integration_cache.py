"""GrowingLayer: the cache layer that appends decoded tokens in place must
hold exactly what transformers' concatenating layer holds, whatever
transformers does to it in between, and never write into the tensors it
was built from (a branched prefill shares them between caches)."""

import pytest
import torch

from refreekv.integration.cache import CompressedLayer, GrowingLayer
from refreekv.integration.forwards import patched_forward
from refreekv.integration.compat import DynamicLayer


@pytest.fixture(autouse=True)
def inside_a_patched_forward():
    """These tests append to compressed layers by hand, as a patched model's
    forward does (outside one they refuse; tests/test_integration_calls.py)."""
    with patched_forward():
        yield


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


def capacity(layer):
    return layer.keys.untyped_storage().nbytes() // (layer.keys.nbytes // layer.keys.shape[2])


def test_appends_equal_concatenation_and_reallocate_rarely():
    """A layer that evicted rows grows into them by an eighth at a time."""
    keys, values = kv(rows=1000)
    growing, plain = CompressedLayer(keys, values, None, evicted=1000), concatenating(keys, values)
    # Count reallocations as pointer changes: a freed buffer's address can be
    # handed out again, so distinct pointers would undercount them.
    buffers, pointer = 0, None
    for step in range(300):
        new_keys, new_values = kv(rows=1, seed=step + 1)
        out = growing.update(new_keys, new_values)
        plain.update(new_keys, new_values)
        assert out[0] is growing.keys and out[1] is growing.values
        assert torch.equal(growing.keys, plain.keys) and torch.equal(growing.values, plain.values)
        if growing.keys.data_ptr() != pointer:
            buffers, pointer = buffers + 1, growing.keys.data_ptr()
    # 1001 rows, then 1127 (1001 + 1001 // 8 is full), then 1268: three allocations for 300 appends.
    assert buffers == 3


def test_never_allocates_past_the_logical_length():
    """No more rows than transformers' layer holds at the same step: a
    layer that evicted nothing reallocates exactly on every append, one
    that evicted a few grows by no more than those."""
    for evicted in (0, 3):
        growing = CompressedLayer(*kv(rows=40), None, evicted=evicted)
        for step in range(20):
            growing.update(*kv(rows=1 + step % 3, seed=step + 1))
            assert growing.keys.shape[2] <= capacity(growing) <= growing.get_seq_length()
    growing = GrowingLayer(*kv(rows=40))
    growing.update(*kv(rows=2, seed=1))
    assert capacity(growing) == growing.get_seq_length() == 42


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
    assert capacity(growing) == growing.get_seq_length(), "the buffer the crop left is not kept"


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


def test_appends_after_inference_mode_go_into_ordinary_tensors():
    keys, values = kv(rows=8)
    with torch.inference_mode():
        growing = CompressedLayer(keys, values, None, evicted=8)
        growing.update(*kv(rows=1, seed=1))  # a buffer with free rows, made of inference tensors
    assert growing.keys.is_inference() and capacity(growing) > growing.keys.shape[2]
    growing.update(*kv(rows=1, seed=2))
    assert not growing.keys.is_inference() and not growing.values.is_inference()
    expected_keys = torch.cat([keys, kv(rows=1, seed=1)[0], kv(rows=1, seed=2)[0]], dim=2)
    assert torch.equal(growing.keys, expected_keys)


def test_crop_removes_appended_tokens_only():
    keys, values = kv(rows=6)
    compressed, plain = CompressedLayer(keys, values, None, evicted=10), concatenating(keys, values)
    for seed in (1, 2):
        compressed.update(*kv(rows=3, seed=seed))
        plain.update(*kv(rows=3, seed=seed))
    compressed.crop(-4)
    plain.crop(-4)
    assert torch.equal(compressed.keys, plain.keys) and torch.equal(compressed.values, plain.values)
    assert compressed.get_seq_length() == plain.get_seq_length() + 10
    compressed.crop(compressed.get_seq_length() - 1)  # transformers' older form: the length to keep
    assert compressed.keys.shape[-2] == 6 + 1
    with pytest.raises(NotImplementedError, match=r"cannot crop 2 tokens off a cache layer compressed by refreekv: it holds 1"):
        compressed.crop(-2)
    compressed.crop(0)
    assert compressed.keys.shape[-2] == 7


def test_the_layer_counts_the_rows_it_attends_to_appended_ones_included():
    keys, values = kv(batch=2, heads=2, rows=5)
    prompt_valid = torch.tensor([[[False, True, True, True, True], [False, False, True, True, True]], [[True] * 5] * 2])
    layer = CompressedLayer(keys, values, prompt_valid, evicted=3)
    layer.update(*kv(batch=2, heads=2, rows=2, seed=1))
    expected = torch.cat([prompt_valid, torch.ones(2, 2, 2, dtype=torch.bool)], dim=-1)
    assert torch.equal(layer.attended_prompt_rows(), prompt_valid)
    assert torch.equal(layer.attended_rows(), expected)
    assert layer.attended_counts().tolist() == [[6, 5], [7, 7]]
    assert layer.kept_per_sequence().tolist() == [5.5, 7.0] and layer.held_per_sequence().tolist() == [6, 7]


def test_a_layer_given_an_all_true_mask_attends_to_every_row_unmasked():
    keys, values = kv(rows=4)
    layer = CompressedLayer(keys, values, torch.ones(3, 1, 4, dtype=torch.bool), evicted=2)
    assert layer.prompt_valid is None  # the attention then skips masking the prompt
    assert torch.equal(layer.attended_rows(), torch.ones(3, 1, 4, dtype=torch.bool))
    assert layer.attended_counts().tolist() == [[4]] * 3
