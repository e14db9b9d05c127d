"""refreekv.paged_write against the reference, which writes one row at a
time: a write never changes a value, so whole pools must be bitwise equal,
the blocks it does not address included."""

import pytest
import torch

import refreekv
from refreekv import reference

BLOCK_ROWS = 8


def make_pools(blocks, head_dim, value_dim, dtype, device, generator):
    key_pool = torch.randn(blocks, BLOCK_ROWS, head_dim, generator=generator).to(dtype=dtype, device=device)
    value_pool = torch.randn(blocks, BLOCK_ROWS, value_dim, generator=generator).to(dtype=dtype, device=device)
    return key_pool, value_pool


def shuffled_table(batch, kv_heads, max_blocks, blocks, generator):
    """Each head gets max_blocks distinct blocks of the pool, in no order;
    blocks - batch * kv_heads * max_blocks of them stay unused."""
    return torch.randperm(blocks, generator=generator)[: batch * kv_heads * max_blocks].view(batch, kv_heads, max_blocks)


def make_rows(batch, kv_heads, rows, head_dim, value_dim, dtype, device, generator):
    key = torch.randn(batch, kv_heads, rows, head_dim, generator=generator).to(dtype=dtype, device=device)
    value = torch.randn(batch, kv_heads, rows, value_dim, generator=generator).to(dtype=dtype, device=device)
    return key, value


def assert_matches_reference(key_pool, value_pool, block_table, start, key, value, **options):
    """Runs the operator on the pools and the reference on copies of them, and
    compares the whole pools."""
    expected_keys, expected_values = key_pool.cpu().clone(), value_pool.cpu().clone()
    cpu_options = {k: v.cpu() for k, v in options.items() if v is not None}
    reference.paged_write(expected_keys, expected_values, block_table.cpu(), start.cpu(), key.cpu(), value.cpu(), **cpu_options)
    assert refreekv.paged_write(key_pool, value_pool, block_table, start, key, value, **options) is None
    assert torch.equal(key_pool.cpu(), expected_keys)
    assert torch.equal(value_pool.cpu(), expected_values)


@pytest.mark.parametrize("counts", [[5, 5, 5, 5], [0, 3, 17, 40]], ids=["equal", "mixed"])
def test_pack_matches_reference(device, dtype, generator, counts):
    # A prefill cut: each head keeps its own positions, written from row 0.
    # head_dim 16, value_dim 12: the two need not agree.
    keys, kept = 60, 40
    key_pool, value_pool = make_pools(30, 16, 12, dtype, device, generator)
    block_table = shuffled_table(2, 2, 5, 30, generator).to(device)
    key, value = make_rows(2, 2, keys, 16, 12, dtype, device, generator)
    row_index = torch.stack([torch.randperm(keys, generator=generator)[:kept].sort().values for _ in range(4)]).view(2, 2, kept)
    row_count = torch.tensor(counts).view(2, 2)
    start = torch.zeros(2, 2, dtype=torch.int64)
    before = key_pool.clone()
    assert_matches_reference(
        key_pool, value_pool, block_table, start.to(device), key, value, row_index=row_index.to(device), row_count=row_count.to(device)
    )
    # Exactly the addressed rows changed (random rows differ almost surely).
    changed = (key_pool != before).any(-1).sum().item()
    assert changed == sum(counts)


@pytest.mark.parametrize("new_rows", [1, 3, 11])
def test_append_matches_reference(device, dtype, generator, new_rows):
    # Decode steps: heads of different lengths (mid-block, at a block's end,
    # empty) each get the new rows after their own last.
    key_pool, value_pool = make_pools(40, 8, 8, dtype, device, generator)
    block_table = shuffled_table(2, 3, 6, 40, generator).to(device)
    key, value = make_rows(2, 3, new_rows, 8, 8, dtype, device, generator)
    start = torch.tensor([[3, 8, 0], [15, 31, 16]], device=device)
    assert_matches_reference(key_pool, value_pool, block_table, start, key, value)


def test_append_with_counts_matches_reference(device, dtype, generator):
    # Without row_index, row_count takes the first rows of each head.
    key_pool, value_pool = make_pools(20, 8, 4, dtype, device, generator)
    block_table = shuffled_table(1, 3, 5, 20, generator).to(device)
    key, value = make_rows(1, 3, 6, 8, 4, dtype, device, generator)
    start = torch.tensor([[7, 0, 30]], device=device)
    row_count = torch.tensor([[6, 0, 2]], device=device)
    assert_matches_reference(key_pool, value_pool, block_table, start, key, value, row_count=row_count)


def test_rows_land_in_their_blocks(device):
    # Head (0, 0) owns blocks 2 then 0; rows 6..9 from start 6 fill rows 6-7 of
    # block 2 and rows 0-1 of block 0. Block 1 and the rest stay as they were.
    key_pool = torch.zeros(3, BLOCK_ROWS, 1, device=device)
    value_pool = torch.zeros(3, BLOCK_ROWS, 1, device=device)
    block_table = torch.tensor([[[2, 0]]], device=device)
    key = torch.arange(1.0, 5.0, device=device).view(1, 1, 4, 1)
    refreekv.paged_write(key_pool, value_pool, block_table, torch.tensor([[6]], device=device), key, -key)
    expected = torch.zeros(3, BLOCK_ROWS)
    expected[2, 6:8] = torch.tensor([1.0, 2.0])
    expected[0, 0:2] = torch.tensor([3.0, 4.0])
    assert torch.equal(key_pool.squeeze(-1).cpu(), expected)
    assert torch.equal(value_pool.squeeze(-1).cpu(), -expected)


def test_pack_then_append_round_trip(device, dtype, generator):
    # A cut keeps its positions of a prompt (mixed counts), then two decode
    # steps append: each head's rows read back are the kept rows, then the new.
    keys, kept = 50, 30
    key_pool, value_pool = make_pools(40, 8, 8, dtype, device, generator)
    block_table = shuffled_table(2, 2, 8, 40, generator).to(device)
    key, value = make_rows(2, 2, keys, 8, 8, dtype, device, generator)
    row_index = torch.stack([torch.randperm(keys, generator=generator)[:kept].sort().values for _ in range(4)]).view(2, 2, kept)
    counts = torch.tensor([[30, 9], [0, 21]])
    refreekv.paged_write(
        key_pool, value_pool, block_table, torch.zeros_like(counts).to(device), key, value,
        row_index=row_index.to(device), row_count=counts.to(device),
    )
    expected_keys = [[key[s, h, row_index[s, h, : counts[s, h]]].cpu() for h in range(2)] for s in range(2)]
    expected_values = [[value[s, h, row_index[s, h, : counts[s, h]]].cpu() for h in range(2)] for s in range(2)]
    lengths = counts.clone()
    for _ in range(2):
        new_key, new_value = make_rows(2, 2, 1, 8, 8, dtype, device, generator)
        refreekv.paged_write(key_pool, value_pool, block_table, lengths.to(device), new_key, new_value)
        lengths += 1
        for s in range(2):
            for h in range(2):
                expected_keys[s][h] = torch.cat([expected_keys[s][h], new_key[s, h].cpu()])
                expected_values[s][h] = torch.cat([expected_values[s][h], new_value[s, h].cpu()])
    read_keys = reference.paged_rows(key_pool.cpu(), block_table.cpu(), lengths)
    read_values = reference.paged_rows(value_pool.cpu(), block_table.cpu(), lengths)
    for s in range(2):
        for h in range(2):
            length = int(lengths[s, h])
            assert torch.equal(read_keys[s, h, :length], expected_keys[s][h])
            assert torch.equal(read_values[s, h, :length], expected_values[s][h])


def test_non_contiguous_inputs(device, generator):
    key_pool, value_pool = make_pools(20, 8, 8, torch.float32, device, generator)
    block_table = shuffled_table(2, 2, 4, 20, generator).to(device)
    key, value = make_rows(2, 2, 10, 8, 8, torch.float32, device, generator)
    row_index = torch.randint(0, 10, (2, 2, 7), generator=generator).to(device)
    start = torch.tensor([[0, 5], [9, 20]], device=device)
    strided = (
        block_table.transpose(0, 2).contiguous().transpose(0, 2),
        start.t().contiguous().t(),
        key.transpose(2, 3).contiguous().transpose(2, 3),
        value[:, :1].expand(2, 2, 10, 8),
    )
    strided_index = row_index.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (*strided, strided_index))
    assert_matches_reference(key_pool, value_pool, *strided, row_index=strided_index)


def test_only_the_pools_are_modified(device, dtype, generator):
    key_pool, value_pool = make_pools(20, 8, 8, dtype, device, generator)
    block_table = shuffled_table(1, 2, 4, 20, generator).to(device)
    key, value = make_rows(1, 2, 10, 8, 8, dtype, device, generator)
    inputs = (block_table, torch.tensor([[2, 4]], device=device), key, value)
    row_index, row_count = torch.randint(0, 10, (1, 2, 6), generator=generator).to(device), torch.tensor([[6, 3]], device=device)
    before = [t.clone() for t in (*inputs, row_index, row_count)]
    refreekv.paged_write(key_pool, value_pool, *inputs, row_index=row_index, row_count=row_count)
    assert all(torch.equal(a, b) for a, b in zip(before, (*inputs, row_index, row_count)))


def test_opcheck(device, generator):
    key_pool, value_pool = make_pools(20, 8, 4, torch.float32, device, generator)
    block_table = shuffled_table(2, 2, 4, 20, generator).to(device)
    key, value = make_rows(2, 2, 10, 8, 4, torch.float32, device, generator)
    row_index = torch.randint(0, 10, (2, 2, 7), generator=generator).to(device)
    row_count = torch.tensor([[7, 0], [3, 5]], device=device)
    start = torch.tensor([[0, 5], [9, 20]], device=device)
    for options in ((None, None), (row_index, row_count), (None, torch.tensor([[1, 10], [0, 4]], device=device))):
        args = (key_pool, value_pool, block_table, start, key, value, *options)
        torch.library.opcheck(torch.ops.refreekv.paged_write.default, args)
