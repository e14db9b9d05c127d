"""refreekv.paged_attention against the reference: attention over the padded
cache read out of the pool, with the padding and the future masked.

Accuracy is judged as in test_ops_attention_importance: the operator's error
against a float64 ground truth (on the same rounded inputs) must stay within
twice the error of a plain PyTorch run of the reference in the input dtype
(what attention in that precision gives), plus what one rounding of the
output to its dtype and one float32 rounding of the largest logit (or sink)
can cause, which a lucky plain run may escape.
"""

import math
import random

import pytest
import torch

import refreekv
from refreekv import reference

FLOAT32_EPS = torch.finfo(torch.float32).eps
BLOCK_ROWS = 16
# Per (sequence, KV head): none, one, a block less one, a block and one, long
# enough for several splits and tiles, and a few tiles.
MIXED_LENGTHS = [[0, 1, BLOCK_ROWS - 1], [BLOCK_ROWS + 1, 5000, 150]]


def paged_layout(lengths, block_rows, generator, spare_blocks=5):
    """(block_table, blocks): each head's blocks taken in a shuffled order,
    with unused blocks between them and table entries past each head's last
    block pointing nowhere (-1), which the operator must not read."""
    batch, kv_heads = lengths.shape
    blocks_per_head = (lengths + block_rows - 1) // block_rows
    blocks = int(blocks_per_head.sum()) + spare_blocks
    order = torch.randperm(blocks, generator=generator)
    block_table = torch.full((batch, kv_heads, int(blocks_per_head.max()) + 1), -1, dtype=torch.int64)
    taken = 0
    for s in range(batch):
        for h in range(kv_heads):
            count = int(blocks_per_head[s, h])
            block_table[s, h, :count] = order[taken : taken + count]
            taken += count
    return block_table, blocks


def make_paged_cache(lengths, head_dim, value_dim, dtype, device, generator, block_rows=BLOCK_ROWS):
    """Random pools (unused blocks included) for heads of the given lengths."""
    lengths = torch.tensor(lengths, dtype=torch.int64)
    block_table, blocks = paged_layout(lengths, block_rows, generator)
    key_pool = torch.randn(blocks, block_rows, head_dim, generator=generator).to(dtype=dtype, device=device)
    value_pool = torch.randn(blocks, block_rows, value_dim, generator=generator).to(dtype=dtype, device=device)
    return key_pool, value_pool, block_table.to(device), lengths.to(device)


def paged_cache_from_rows(keys, values, lengths, block_rows, generator):
    """The rows [b, Hkv, n, d] (each head's first lengths[s, h]) laid out in
    blocks of `block_rows`, the rest of the pools random."""
    key_pool, value_pool, block_table, lengths = make_paged_cache(
        lengths.tolist(), keys.shape[3], values.shape[3], keys.dtype, keys.device, generator, block_rows
    )
    for s, h in torch.cartesian_prod(torch.arange(keys.shape[0]), torch.arange(keys.shape[1])).tolist():
        for j in range(int(lengths[s, h])):
            block = block_table[s, h, j // block_rows]
            key_pool[block, j % block_rows] = keys[s, h, j]
            value_pool[block, j % block_rows] = values[s, h, j]
    return key_pool, value_pool, block_table, lengths


def make_query(batch, heads, queries, head_dim, dtype, device, generator):
    return torch.randn(batch, heads, queries, head_dim, generator=generator).to(dtype=dtype, device=device)


def make_sinks(heads, logit_std, dtype, device, generator):
    """Sink logits with the logits' spread around log(100), where exp(sink)
    rivals the sum over a hundred keys: from negligible to dominant."""
    sinks = torch.randn(heads, generator=generator) * logit_std + math.log(100)
    return sinks.to(dtype=dtype, device=device)


def largest_logit(query, key_pool, scale, sinks=None):
    largest = abs(scale) * (query.double().flatten(0, 2) @ key_pool.double().flatten(0, 1).T).abs().max().item()
    return largest if sinks is None else max(largest, sinks.double().abs().max().item())


def assert_matches_reference(query, key_pool, value_pool, block_table, lengths, scale, **options):
    ours = refreekv.paged_attention(query, key_pool, value_pool, block_table, lengths, scale, **options)
    assert ours.dtype == query.dtype and ours.device == query.device
    assert ours.shape == (*query.shape[:3], value_pool.shape[2])
    assert torch.isfinite(ours).all()
    query, key_pool, value_pool, block_table, lengths = (t.cpu() for t in (query, key_pool, value_pool, block_table, lengths))
    options = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    sinks = options.get("sinks")
    truth = reference.paged_attention(
        query.double(),
        key_pool.double(),
        value_pool.double(),
        block_table,
        lengths,
        scale,
        softcap=options.get("softcap"),
        sinks=None if sinks is None else sinks.double(),
        dtype=torch.float64,
    )
    plain = reference.paged_attention(query, key_pool, value_pool, block_table, lengths, scale, dtype=query.dtype, **options)
    ours_error = (ours.cpu().double() - truth).abs().max().item()
    plain_error = (plain.double() - truth).abs().max().item()
    one_rounding = torch.finfo(query.dtype).eps / 2 + FLOAT32_EPS * max(1.0, largest_logit(query, key_pool, scale, sinks))
    bound = 2 * plain_error + one_rounding * truth.abs().max().item()
    assert ours_error <= bound, f"error {ours_error:.3e} exceeds {bound:.3e} (plain {query.dtype} run: {plain_error:.3e})"
    return ours


# (scale, softcap, sinks). Logits of q . k with d = 16 have standard deviation
# 4 * scale: 1 uncapped, 4 under a softcap of 5, so that many are squeezed
# well below their value.
OPTIONS = {"plain": (0.25, 0.0, False), "softcap": (1.0, 5.0, False), "sinks": (0.25, 0.0, True)}


@pytest.mark.parametrize("options", OPTIONS, ids=list(OPTIONS))
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("queries", [1, 3, 17])
def test_matches_reference(device, dtype, generator, queries, group, options):
    # head_dim 16, value_dim 24: the two need not agree.
    key_pool, value_pool, block_table, lengths = make_paged_cache(MIXED_LENGTHS, 16, 24, dtype, device, generator)
    heads = 3 * group
    query = make_query(2, heads, queries, 16, dtype, device, generator)
    scale, softcap, with_sinks = OPTIONS[options]
    sinks = make_sinks(heads, 4 * scale, dtype, device, generator) if with_sinks else None
    ours = assert_matches_reference(query, key_pool, value_pool, block_table, lengths, scale, softcap=softcap, sinks=sinks)
    # Head (0, 0) holds no row, and (0, 1) one: only the newest query row sees it.
    assert (ours[0, :group] == 0).all()
    assert (ours[0, group : 2 * group, : queries - 1] == 0).all()


def test_rows_that_see_nothing_are_zero(device, generator):
    # 5 query rows over heads of 2 and 0 rows: in the first head rows 0-2 see
    # no key, in the second none does. Sinks add no value, so those rows stay
    # exactly zero with them too.
    key_pool, value_pool, block_table, lengths = make_paged_cache([[2, 0]], 8, 8, torch.float32, device, generator)
    query = make_query(1, 4, 5, 8, torch.float32, device, generator)
    for sinks in (None, torch.zeros(4, device=device)):
        ours = refreekv.paged_attention(query, key_pool, value_pool, block_table, lengths, 0.5, sinks=sinks)
        assert (ours[0, :2, :3] == 0).all() and (ours[0, 2:] == 0).all()
        assert (ours[0, :2, 3:] != 0).all()


def test_sink_takes_its_share_of_every_row(device):
    # d = 1, query 1, keys (0, ln 2, ln 3), scale 1: exp(logits) = (1, 2, 3),
    # values (10, 20, 30). Row 0 of q = 2 sees keys 0-1, row 1 all three. A
    # sink with exp(sink) = E adds E to the denominator and nothing above it.
    key_pool = torch.log(torch.tensor([1.0, 2.0, 3.0, 1.0], device=device)).view(2, 2, 1)
    value_pool = torch.tensor([10.0, 20.0, 30.0, -1.0], device=device).view(2, 2, 1)
    block_table = torch.tensor([[[0, 1]]], device=device)
    lengths = torch.tensor([[3]], device=device)
    query = torch.ones(1, 2, 2, 1, device=device)
    sink_exps = (9.0, 30.0)
    sinks = torch.log(torch.tensor(sink_exps, dtype=torch.float64, device=device))
    expected = torch.tensor(
        [[[(10 + 40) / (3 + e), (10 + 40 + 90) / (6 + e)] for e in sink_exps]],
    ).unsqueeze(-1)
    ours = refreekv.paged_attention(query, key_pool, value_pool, block_table, lengths, 1.0, sinks=sinks)
    torch.testing.assert_close(ours.cpu(), expected)


def test_infinite_sinks(device, generator):
    # -inf is no sink; +inf takes all of its rows' weight, and carries no value.
    key_pool, value_pool, block_table, lengths = make_paged_cache([[30, 700]], 8, 8, torch.float32, device, generator)
    query = make_query(1, 4, 2, 8, torch.float32, device, generator)
    plain = refreekv.paged_attention(query, key_pool, value_pool, block_table, lengths, 0.3)
    sinks = torch.tensor([float("-inf"), float("inf"), float("inf"), float("-inf")], device=device)
    ours = refreekv.paged_attention(query, key_pool, value_pool, block_table, lengths, 0.3, sinks=sinks)
    assert torch.equal(ours[:, [0, 3]], plain[:, [0, 3]])
    assert (ours[:, [1, 2]] == 0).all()


def test_block_layout_does_not_change_the_result(device, generator):
    # The same rows in blocks of 1, 7 and 64 rows, each layout shuffled its own way.
    lengths = torch.tensor([[700, 3], [64, 129]])
    keys = torch.randn(2, 2, 700, 8, generator=generator).to(device)
    values = torch.randn(2, 2, 700, 8, generator=generator).to(device)
    query = make_query(2, 4, 3, 8, torch.float32, device, generator)
    results = [
        refreekv.paged_attention(query, *paged_cache_from_rows(keys, values, lengths, block_rows, generator), 0.3)
        for block_rows in (1, 7, 64)
    ]
    for ours in results[1:]:
        torch.testing.assert_close(ours, results[0])


def test_randomized_sweep(device):
    rng = random.Random(20260301)
    generator = torch.Generator().manual_seed(11)
    for case in range(40):
        batch, kv_heads, group = rng.randint(1, 2), rng.randint(1, 3), rng.choice([1, 2, 4, 8])
        block_rows = rng.choice([1, 5, 16, 64])
        queries = rng.choice([1, rng.randint(1, 150)])
        lengths = [[rng.choice([0, rng.randint(1, 1100)]) for _ in range(kv_heads)] for _ in range(batch)]
        head_dim, value_dim = rng.choice([1, 8, 24, 64]), rng.choice([1, 8, 40])
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        key_pool, value_pool, block_table, length_tensor = make_paged_cache(
            lengths, head_dim, value_dim, dtype, device, generator, block_rows=block_rows
        )
        query = make_query(batch, kv_heads * group, queries, head_dim, dtype, device, generator)
        options = {}
        if rng.random() < 0.3:
            options["softcap"] = rng.uniform(1.0, 20.0)
        if rng.random() < 0.3:
            options["sinks"] = torch.randn(kv_heads * group, generator=generator).to(device) * 2
        try:
            assert_matches_reference(query, key_pool, value_pool, block_table, length_tensor, rng.uniform(0.05, 0.5), **options)
        except AssertionError as failure:
            raise AssertionError(
                f"case {case}: query {tuple(query.shape)}, lengths {lengths}, block_rows {block_rows}, {dtype}, {list(options)}"
            ) from failure


def test_non_contiguous_inputs(device, generator):
    key_pool, value_pool, block_table, lengths = make_paged_cache([[40, 200]], 8, 8, torch.float32, device, generator)
    query = make_query(1, 4, 3, 8, torch.float32, device, generator)
    sinks = torch.randn(8, device=device)
    expected = refreekv.paged_attention(query, key_pool, value_pool, block_table, lengths, 0.3, sinks=sinks[::2].contiguous())
    strided = (
        query.transpose(2, 3).contiguous().transpose(2, 3),
        key_pool.transpose(0, 1).contiguous().transpose(0, 1),
        value_pool.transpose(1, 2).contiguous().transpose(1, 2),
        block_table.transpose(0, 2).contiguous().transpose(0, 2),
        lengths.t().contiguous().t(),
    )
    assert not any(t.is_contiguous() for t in (*strided[:3], sinks[::2]))
    ours = refreekv.paged_attention(*strided, 0.3, sinks=sinks[::2])
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_inputs_are_not_modified(device, dtype, generator):
    key_pool, value_pool, block_table, lengths = make_paged_cache([[30, 3]], 8, 8, dtype, device, generator)
    query = make_query(1, 4, 2, 8, dtype, device, generator)
    sinks = torch.randn(4, device=device)
    inputs = (query, key_pool, value_pool, block_table, lengths, sinks)
    before = [t.clone() for t in inputs]
    refreekv.paged_attention(query, key_pool, value_pool, block_table, lengths, 0.7, softcap=3.0, sinks=sinks)
    assert all(torch.equal(a, b) for a, b in zip(before, inputs))


def test_softcap_none_means_no_capping(device, generator):
    key_pool, value_pool, block_table, lengths = make_paged_cache([[20]], 8, 8, torch.float32, device, generator)
    query = make_query(1, 2, 1, 8, torch.float32, device, generator)
    plain = refreekv.paged_attention(query, key_pool, value_pool, block_table, lengths, 2.0)
    assert torch.equal(refreekv.paged_attention(query, key_pool, value_pool, block_table, lengths, 2.0, softcap=None), plain)


def test_opcheck(device, generator):
    key_pool, value_pool, block_table, lengths = make_paged_cache([[0, 37], [600, 5]], 8, 4, torch.float32, device, generator)
    query = make_query(2, 4, 3, 8, torch.float32, device, generator)
    sinks = torch.randn(4, generator=generator).to(device)
    for softcap, op_sinks in ((0.0, None), (1.5, sinks)):
        args = (query, key_pool, value_pool, block_table, lengths, 0.5, softcap, op_sinks)
        torch.library.opcheck(torch.ops.refreekv.paged_attention.default, args)


def test_traceable_by_torch_compile(device, generator):
    key_pool, value_pool, block_table, lengths = make_paged_cache([[20, 9]], 8, 8, torch.float32, device, generator)
    query = make_query(1, 4, 1, 8, torch.float32, device, generator)

    def attend(query):
        return refreekv.paged_attention(query, key_pool, value_pool, block_table, lengths, 0.5).sum(-1)

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(query), attend(query))
