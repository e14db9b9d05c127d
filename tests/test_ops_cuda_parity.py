"""The CUDA kernels against the CPU kernels (and the float64 reference) on the
same inputs, with shapes chosen for the CUDA tiling: several key and query
tiles, partial tiles, causally skipped tiles, padding, every small-window row
count, head dims that are not a multiple of 16 bytes or that need several
head_dim chunks.

The generic operator suites (tests/test_ops_*.py) already run on CUDA when a
GPU is present; this module adds what is specific to the CUDA code paths.
"""

import math
import os
import random

import pytest
import torch

import refreekv
from refreekv import reference
from test_ops_adaptive_keep_count import assert_no_near_tie, attention_like_scores
from test_ops_attention_importance import make_inputs
from test_ops_mass_keep_count import assert_no_near_tie as assert_no_mass_near_tie

# Runs on CUDA; REFREEKV_PARITY_DEVICE=cpu runs the same checks CPU against
# CPU, which tests this module's own logic on a machine without a GPU.
DEVICE = os.environ.get("REFREEKV_PARITY_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float32", "float16", "bfloat16"]


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


# --------------------------------------------------------------------------
# attention_importance
# --------------------------------------------------------------------------


FLOAT32_EPS = torch.finfo(torch.float32).eps


def assert_importance_parity(query, key, scale, **options):
    """CUDA within float32 accuracy of the float64 truth, and close to CPU.

    The bound is that of tests/test_ops_attention_importance.py (twice the
    error of a plain float32 run of the reference) plus the float32 rounding
    of a length-d dot product, which grows with sqrt(d) for d-term sums: the
    shapes here reach d = 200, where one logit ulp no longer covers it (the
    CPU kernel needs the extra term too). Sinks join the logits in each
    row's normalizer, so the largest of them counts like the largest logit.
    """
    kv_valid = options.pop("kv_valid", None)
    sinks = options.pop("sinks", None)
    q, k, valid, device_sinks = on_device(query, key, kv_valid, sinks)
    ours = refreekv.attention_importance(q, k, scale, kv_valid=valid, sinks=device_sinks, **options)
    options.update(kv_valid=kv_valid, sinks=sinks)
    truth = reference.attention_importance(query, key, scale, dtype=torch.float64, **options)
    plain32 = reference.attention_importance(query, key, scale, dtype=torch.float32, **options)
    assert ours.dtype == torch.float32 and ours.shape == truth.shape and ours.device.type == DEVICE
    assert torch.isfinite(ours).all()
    group = query.shape[1] // key.shape[1]
    abs_dots = query.double().abs() @ key.double().abs().repeat_interleave(group, dim=1).transpose(-1, -2)
    largest = max(abs(scale) * abs_dots.max().item(), 0.0 if sinks is None else sinks.abs().max().item())
    dot_rounding = 4 * query.shape[-1] ** 0.5 * FLOAT32_EPS * max(1.0, largest)
    bound = 2 * (plain32.double() - truth).abs().max().item() + dot_rounding * truth.abs().max().item()
    error = (ours.cpu().double() - truth).abs().max().item()
    assert error <= bound, f"error {error:.3e} exceeds {bound:.3e}"
    cpu = refreekv.attention_importance(query, key, scale, **options)
    # Both devices compute in float32 but sum in different orders (GEMM tiles,
    # tensor-core accumulation); the principled bound is the one above, and
    # this only says the two kernels agree to float32 working precision.
    torch.testing.assert_close(ours.cpu(), cpu, rtol=1e-4, atol=1e-6)
    return ours


# Attention variants, each on every shape of both paths: a softcap of 2 caps
# the logits of these inputs (standard deviation 1) noticeably, and sinks of
# the same spread around log(keys), where exp(sink) rivals a row's sum over
# the keys, take anything from a few percent to most of a row's probability.
VARIANTS = {"plain": (0.0, False), "softcap": (2.0, False), "sinks": (0.0, True), "softcap+sinks": (2.0, True)}


def variant_options(variant, heads, keys, generator):
    softcap, with_sinks = VARIANTS[variant]
    sinks = torch.randn(heads, generator=generator) + math.log(keys) if with_sinks else None
    return dict(softcap=softcap, sinks=sinks)


# (keys, window, group, head_dim): the small-window path takes w <= 4, a
# block holding up to 32 of a group's g * w rows (row counts 1, 4, 8, 16, 32
# are separate instantiations; larger groups take several blocks of 32); the
# tiled path (64 x 64 tiles) takes the rest.
SMALL_WINDOW_SHAPES = [
    (1, 1, 1, 8),  # a single key
    (127, 1, 1, 64),  # n just under one 128-key tile
    (129, 1, 4, 128),  # one key into a second tile
    (1000, 1, 8, 128),  # several tiles, last one partial
    (300, 2, 2, 24),  # 24 * 2 bytes: not a whole 16-byte word in half
    (300, 3, 5, 72),  # 15 rows -> 16-row instantiation, two head_dim chunks in half
    (257, 4, 8, 16),  # 32 rows
    (200, 1, 32, 8),  # MQA-like group of 32
    (90, 4, 2, 1),  # head_dim 1
    (70, 2, 3, 200),  # head_dim past one chunk in every dtype
    (300, 1, 64, 64),  # 64 rows: two blocks of 32 per group
    (150, 3, 24, 32),  # 72 rows: 32 + 32 + 8, chunks that split a head's window rows
    (130, 4, 9, 16),  # 36 rows: a full block and a 4-row one
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("keys,window,group,head_dim", SMALL_WINDOW_SHAPES)
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "left-padded"])
def test_small_window_path(dtype, keys, window, group, head_dim, padded, variant, generator):
    pad = [0, (2 * keys) // 3] if padded else None
    query, key, kv_valid = make_inputs(2, 2 * group, 2, window, keys, head_dim, dtype, "cpu", generator, pad)
    options = variant_options(variant, 2 * group, keys, generator)
    assert_importance_parity(query, key, head_dim**-0.5, kv_valid=kv_valid, **options)


TILED_SHAPES = [
    (64, 64, 1, 16),  # exactly one tile each way
    (65, 65, 2, 16),  # one row and one key into second tiles
    (200, 200, 4, 64),  # w = n, several tiles, partial last tiles
    (300, 130, 1, 128),  # w < n: key tiles before the window, skipped query tiles
    (700, 5, 4, 32),  # w just past the small path: one partial query tile
    (333, 100, 2, 24),  # head_dim not a multiple of 16 elements
    (150, 150, 1, 200),  # head_dim in two chunks (float32: four)
    (129, 129, 3, 1),  # head_dim 1
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("keys,window,group,head_dim", TILED_SHAPES)
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "left-padded"])
def test_tiled_path(dtype, keys, window, group, head_dim, padded, variant, generator):
    # Padding that blinds whole query tiles of sequence 1 (rows before its
    # first real key see nothing) and covers whole key tiles.
    pad = [0, keys - window + min(window - 1, 70)] if padded else None
    query, key, kv_valid = make_inputs(2, 2 * group, 2, window, keys, head_dim, dtype, "cpu", generator, pad)
    options = variant_options(variant, 2 * group, keys, generator)
    assert_importance_parity(query, key, head_dim**-0.5, kv_valid=kv_valid, **options)


@pytest.mark.parametrize("window", [1, 3, 150], ids=["w=1", "w=3", "w=150"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("group_reduce", [None, "mean", "max"])
def test_options_on_both_paths(window, normalize, group_reduce, generator):
    query, key, kv_valid = make_inputs(2, 8, 2, window, 150, 32, torch.bfloat16, "cpu", generator, pad=[0, 20])
    ours = assert_importance_parity(
        query, key, 0.2, kv_valid=kv_valid, normalize=normalize, group_reduce=group_reduce
    )
    assert ours.shape == (2, 8 if group_reduce is None else 2, 150)


def test_scattered_padding(generator):
    # A mask with holes, not only left padding: every path masks key by key.
    for window in (1, 2, 40):
        query, key, _ = make_inputs(2, 4, 2, window, 170, 16, torch.float32, "cpu", generator)
        kv_valid = torch.rand(2, 170, generator=generator) < 0.6
        assert_importance_parity(query, key, 0.4, kv_valid=kv_valid)


def test_fully_padded_sequence_scores_zero(generator):
    for window in (1, 90):
        query, key, _ = make_inputs(2, 2, 1, window, 90, 8, torch.float16, "cpu", generator)
        kv_valid = torch.ones(2, 90, dtype=torch.bool)
        kv_valid[1] = False
        for sinks in (None, torch.tensor([0.5, -3.0])):
            ours = assert_importance_parity(query, key, 0.5, kv_valid=kv_valid, sinks=sinks)
            assert (ours[1] == 0).all()


def test_attention_importance_is_deterministic(generator):
    for window in (1, 300):
        query, key, kv_valid = on_device(*make_inputs(1, 8, 2, window, 300, 64, torch.bfloat16, "cpu", generator, pad=[5]))
        first = refreekv.attention_importance(query, key, 0.125, kv_valid=kv_valid)
        again = refreekv.attention_importance(query, key, 0.125, kv_valid=kv_valid)
        assert torch.equal(first, again)


def test_randomized_sweep_against_cpu():
    rng = random.Random(4242)
    generator = torch.Generator().manual_seed(11)
    for case in range(120):
        batch, kv_heads, group = rng.randint(1, 2), rng.randint(1, 3), rng.choice([1, 2, 3, 4, 8])
        keys = rng.randint(1, 400)
        window = rng.choice([1, 2, 4, 5, keys, rng.randint(1, keys)])
        window = min(window, keys)
        head_dim = rng.choice([1, 8, 20, 64, 128, 136])
        dtype = rng.choice(DTYPES)
        pad = [rng.randint(0, keys) for _ in range(batch)] if rng.random() < 0.5 else None
        query, key, kv_valid = make_inputs(batch, kv_heads * group, kv_heads, window, keys, head_dim, dtype, "cpu", generator, pad)
        options = dict(normalize=rng.random() < 0.5, group_reduce=rng.choice([None, "mean", "max"]))
        try:
            assert_importance_parity(query, key, rng.uniform(0.05, 0.5), kv_valid=kv_valid, **options)
        except AssertionError as failure:
            raise AssertionError(f"case {case}: {tuple(query.shape)} {tuple(key.shape)} {dtype} {options} pad={pad}") from failure


def test_rejects_like_cpu():
    with pytest.raises(RuntimeError, match=r"expected window <= keys, .* got window = 3 and keys = 2"):
        refreekv.attention_importance(torch.randn(2, 4, 3, 8, device=DEVICE), torch.randn(2, 2, 2, 8, device=DEVICE), 0.5)
    with pytest.raises(RuntimeError, match=r"expected at least one query head, got query of shape \[1, 0, 1, 8\]"):
        refreekv.attention_importance(torch.randn(1, 0, 1, 8, device=DEVICE), torch.randn(1, 1, 8, 8, device=DEVICE), 0.5)
    with pytest.raises(RuntimeError, match=r"expected threshold in \[0, 1\), got 1"):
        refreekv.adaptive_keep_count(torch.rand(1, 2, 10, device=DEVICE), 1.0)
    with pytest.raises(RuntimeError, match=r"expected tolerance in \[0, 1\), got -0.5"):
        refreekv.mass_keep_count(torch.rand(1, 2, 10, device=DEVICE), -0.5)


# --------------------------------------------------------------------------
# adaptive_keep_count: integers, so CUDA == CPU == float64 reference exactly
# --------------------------------------------------------------------------


def assert_keep_count_parity(scores, threshold, valid_len=None):
    assert_no_near_tie(scores.float(), threshold, valid_len)
    expected = reference.adaptive_keep_count(scores, threshold, valid_len=valid_len)
    cpu = refreekv.adaptive_keep_count(scores, threshold, valid_len=valid_len)
    s, lens = on_device(scores, valid_len)
    ours = refreekv.adaptive_keep_count(s, threshold, valid_len=lens)
    assert ours.device.type == DEVICE and ours.dtype == torch.int64
    assert torch.equal(ours.cpu(), cpu), (ours, cpu)
    assert torch.equal(ours.cpu(), expected), (ours, expected)


@pytest.mark.parametrize("heads", [1, 5, 32])
@pytest.mark.parametrize("candidates", [1, 2047, 2048, 2049, 9000])
@pytest.mark.parametrize("threshold", [0.0, 0.001, 0.01, 0.3, 0.999])
def test_keep_count_chunks(heads, candidates, threshold, generator):
    # Candidates around the CUDA chunk (512 threads x 4 items = 2048).
    scores = attention_like_scores(3, heads, candidates, generator)
    assert_keep_count_parity(scores, threshold)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_keep_count_valid_len_and_dtypes(dtype, generator):
    scores = attention_like_scores(5, 4, 5000, generator).to(dtype)
    scores[:, :, 4000:] = 0  # trailing zeros: T = 0 stops at the last non-zero
    scores[4] = 0  # a degenerate sequence keeps everything
    valid_len = torch.tensor([5000, 0, 1, 3001, 4500])
    for threshold in (0.0, 0.01, 0.2):
        assert_keep_count_parity(scores, threshold, valid_len)
    assert_keep_count_parity(scores, 0.05)


def test_keep_count_randomized_sweep():
    rng = random.Random(31)
    generator = torch.Generator().manual_seed(3)
    for case in range(150):
        batch, heads, candidates = rng.randint(1, 4), rng.randint(1, 40), rng.randint(0, 6000)
        scores = attention_like_scores(batch, heads, candidates, generator, decay=rng.uniform(0, 8))
        valid_len = torch.tensor([rng.randint(0, candidates) for _ in range(batch)]) if rng.random() < 0.5 else None
        threshold = rng.choice([0.0, rng.uniform(0, 0.05), rng.uniform(0, 0.999)])
        try:
            assert_keep_count_parity(scores, threshold, valid_len)
        except AssertionError as failure:
            raise AssertionError(f"case {case}: {tuple(scores.shape)} T={threshold} valid_len={valid_len}") from failure


# --------------------------------------------------------------------------
# mass_keep_count: integers, so CUDA == CPU == float64 reference exactly
# --------------------------------------------------------------------------


def assert_mass_parity(scores, tolerance, valid_len=None):
    assert_no_mass_near_tie(scores, tolerance, valid_len)
    expected = reference.mass_keep_count(scores, tolerance, valid_len=valid_len)
    cpu = refreekv.mass_keep_count(scores, tolerance, valid_len=valid_len)
    s, lens = on_device(scores, valid_len)
    ours = refreekv.mass_keep_count(s, tolerance, valid_len=lens)
    assert ours.device.type == DEVICE and ours.dtype == torch.int64
    assert torch.equal(ours.cpu(), cpu), (ours, cpu)
    assert torch.equal(ours.cpu(), expected), (ours, expected)


@pytest.mark.parametrize("heads", [1, 5, 32])
@pytest.mark.parametrize("candidates", [1, 1023, 1024, 1025, 9000])
@pytest.mark.parametrize("tolerance", [0.0, 0.001, 0.01, 0.3, 0.999])
def test_mass_keep_count_chunks(heads, candidates, tolerance, generator):
    # Candidates around the CUDA chunk (256 threads x 4 items = 1024).
    scores = attention_like_scores(3, heads, candidates, generator)
    assert_mass_parity(scores, tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_mass_keep_count_valid_len_and_dtypes(dtype, generator):
    scores = attention_like_scores(5, 4, 5000, generator).to(dtype)
    scores[:, :, 4000:] = 0  # trailing zeros: delta = 0 stops at the last non-zero
    scores[3, 1, 3500] = 1e-30  # a tail no sum notices
    scores[4] = 0  # a degenerate sequence keeps everything
    scores[2, :, 1:] = float("nan")  # past valid_len: never read
    valid_len = torch.tensor([5000, 0, 1, 3001, 4500])
    for tolerance in (0.0, 0.01, 0.2):
        assert_mass_parity(scores, tolerance, valid_len)
    scores[2] = attention_like_scores(1, 4, 5000, generator)[0].to(dtype)
    assert_mass_parity(scores, 0.05)


def test_mass_keep_count_randomized_sweep():
    rng = random.Random(57)
    generator = torch.Generator().manual_seed(21)
    for case in range(150):
        batch, heads, candidates = rng.randint(1, 4), rng.randint(1, 40), rng.randint(0, 6000)
        scores = attention_like_scores(batch, heads, candidates, generator, decay=rng.uniform(0, 8))
        if rng.random() < 0.3:
            scores[..., rng.randint(0, candidates) :] = 0
        valid_len = torch.tensor([rng.randint(0, candidates) for _ in range(batch)]) if rng.random() < 0.5 else None
        tolerance = rng.choice([0.0, rng.uniform(0, 0.05), rng.uniform(0, 0.999)])
        try:
            assert_mass_parity(scores, tolerance, valid_len)
        except AssertionError as failure:
            raise AssertionError(f"case {case}: {tuple(scores.shape)} delta={tolerance} valid_len={valid_len}") from failure


def per_head_zero_tails(scores, tail_starts):
    """Scores ranked per head (descending), then zero from tail_starts[b][h]
    on: heads whose last non-zero score comes at different ranks, as when
    float32 exp underflows in some heads' attention rows and not others."""
    scores = scores.sort(dim=-1, descending=True).values
    for b, starts in enumerate(tail_starts):
        for h, start in enumerate(starts):
            scores[b, h, start:] = 0
    return scores


@pytest.mark.parametrize("assert_parity", [assert_keep_count_parity, assert_mass_parity], ids=["adaptive", "mass"])
def test_keep_counts_with_per_head_zero_tails(assert_parity, generator):
    # A later head whose last non-zero score comes earlier in a thread's
    # stride must not shorten T = 0's extent: 1024 here, not 512.
    scores = torch.rand(1, 2, 1024, generator=generator) + 0.5
    scores[0, 1, 512:] = 0
    assert_parity(scores, 0.0)
    scores = per_head_zero_tails(
        attention_like_scores(3, 4, 3000, generator),
        [[2900, 100, 2500, 700], [3000, 2049, 1, 2048], [10, 20, 30, 2999]],
    )
    for fraction in (0.0, 0.001, 0.05):
        assert_parity(scores, fraction)
    assert_parity(scores, 0.0, torch.tensor([2600, 3000, 25]))


def test_mass_keep_count_is_deterministic(generator):
    scores = on_device(attention_like_scores(4, 32, 7000, generator, decay=0.5))[0]
    first = refreekv.mass_keep_count(scores, 0.003)
    assert torch.equal(first, refreekv.mass_keep_count(scores, 0.003))


# --------------------------------------------------------------------------
# compact_kv: a copy, so CUDA == CPU bit for bit
# --------------------------------------------------------------------------


def assert_compact_parity(key, value, keep_index, keep_len):
    cpu = refreekv.compact_kv(key, value, keep_index, keep_len)
    ours = refreekv.compact_kv(*on_device(key, value, keep_index, keep_len))
    for got, want in zip(ours, cpu):
        assert got.device.type == DEVICE and got.dtype == want.dtype
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("key_dim,value_dim", [(128, 128), (64, 96), (1, 3), (12, 8), (0, 4)])
def test_compact_kv_matches_cpu(dtype, key_dim, value_dim, generator):
    # 16-byte rows take the vectorized copy; odd rows the element copy.
    batch, kv_heads, keys, kept_rows = 3, 4, 300, 120
    key = torch.randn(batch, kv_heads, keys, key_dim, generator=generator).to(dtype)
    value = torch.randn(batch, kv_heads, keys, value_dim, generator=generator).to(dtype)
    keep_index = torch.stack([torch.randperm(keys, generator=generator)[:kept_rows] for _ in range(batch * kv_heads)])
    keep_index = keep_index.view(batch, kv_heads, kept_rows)
    keep_len = torch.tensor([120, 0, 57])
    keep_index[2, :, 57:] = -5  # past keep_len: never read
    assert_compact_parity(key, value, keep_index, keep_len)


def test_compact_kv_edge_shapes(generator):
    key = torch.randn(2, 2, 10, 8, generator=generator)
    empty_index = torch.zeros(2, 2, 0, dtype=torch.int64)
    assert_compact_parity(key, key.clone(), empty_index, torch.tensor([0, 0]))
    no_heads = torch.randn(2, 0, 10, 8)
    assert_compact_parity(no_heads, no_heads.clone(), torch.zeros(2, 0, 3, dtype=torch.int64), torch.tensor([3, 1]))


@pytest.mark.parametrize(
    "keep_len,position,bad,message",
    [
        ([6, 3], None, None, r"expected keep_len\[0\] in \[0, 5\] \(keep_index.size\(2\)\), got 6"),
        ([5, -2], None, None, r"expected keep_len\[1\] in \[0, 5\] .* got -2"),
        ([5, 3], (1, 1, 2), 10, r"expected keep_index\[1, 1, 2\] in \[0, 10\) \(the number of cached positions\), got 10"),
        ([5, 3], (0, 0, 4), -1, r"expected keep_index\[0, 0, 4\] in \[0, 10\) .* got -1"),
    ],
    ids=["keep_len above r_max", "keep_len negative", "index too large", "index negative"],
)
def test_compact_kv_rejects_like_cpu(keep_len, position, bad, message):
    key, value = torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 4)
    keep_index = torch.zeros(2, 2, 5, dtype=torch.int64)
    if position is not None:
        keep_index[position] = bad
    inputs = (key, value, keep_index, torch.tensor(keep_len))
    with pytest.raises(RuntimeError, match=message):
        refreekv.compact_kv(*inputs)
    with pytest.raises(RuntimeError, match=message):
        refreekv.compact_kv(*on_device(*inputs))


# --------------------------------------------------------------------------
# Bad values found on the device: a catchable error with the CPU's words,
# and the device stays usable (a device-side assertion would end CUDA for
# the whole process).
# --------------------------------------------------------------------------


def bad_value_calls():
    scores = torch.rand(2, 3, 50)
    nan_scores, negative_scores = scores.clone(), scores.clone()
    nan_scores[1, 2, 7] = float("nan")
    negative_scores[1, 0, 40] = -0.5
    query, key = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 20, 8)
    return {
        "nan sink": (
            lambda q, k, sinks: refreekv.attention_importance(q, k, 0.5, sinks=sinks),
            (query, key, torch.tensor([0.0, float("nan"), 0.0, 0.0])),
            r"attention_importance: expected finite sinks \(in float32\), got sinks\[1\] = nan",
        ),
        "keep count valid_len": (
            lambda s, lens: refreekv.adaptive_keep_count(s, 0.01, valid_len=lens),
            (scores, torch.tensor([50, 51])),
            r"adaptive_keep_count: expected valid_len\[1\] in \[0, 50\] \(the number of candidates\), got 51",
        ),
        "keep count negative valid_len": (
            lambda s, lens: refreekv.adaptive_keep_count(s, 0.0, valid_len=lens),
            (scores, torch.tensor([-1, 3])),
            r"adaptive_keep_count: expected valid_len\[0\] in \[0, 50\] .* got -1",
        ),
        "keep count nan score": (
            lambda s: refreekv.adaptive_keep_count(s, 0.01),
            (nan_scores,),
            r"adaptive_keep_count: expected finite ranked_scores, got NaN or inf",
        ),
        "mass valid_len": (
            lambda s, lens: refreekv.mass_keep_count(s, 0.01, valid_len=lens),
            (scores, torch.tensor([50, 60])),
            r"mass_keep_count: expected valid_len\[1\] in \[0, 50\] \(the number of candidates\), got 60",
        ),
        "mass nan score": (
            lambda s: refreekv.mass_keep_count(s, 0.01),
            (nan_scores,),
            r"mass_keep_count: expected finite, non-negative ranked_scores, got ranked_scores\[1, 2, 7\] = nan",
        ),
        "mass negative score": (
            lambda s: refreekv.mass_keep_count(s, 0.0),
            (negative_scores,),
            r"mass_keep_count: expected finite, non-negative ranked_scores, got ranked_scores\[1, 0, 40\] = -0.5",
        ),
    }


BAD_VALUE_CASES = list(bad_value_calls())


@pytest.mark.parametrize("case", BAD_VALUE_CASES)
def test_bad_values_raise_and_the_device_stays_usable(case, generator):
    call, inputs, message = bad_value_calls()[case]
    with pytest.raises(RuntimeError, match=message):
        call(*inputs)  # the CPU's words ...
    with pytest.raises(RuntimeError, match=message):
        call(*on_device(*inputs))  # ... on the device too
    # The next valid calls on the same device run and agree with the CPU.
    query, key, kv_valid = make_inputs(1, 4, 2, 1, 300, 16, torch.float32, "cpu", generator, pad=[7])
    assert_importance_parity(query, key, 0.25, kv_valid=kv_valid, sinks=torch.zeros(4))
    scores = attention_like_scores(2, 3, 500, generator)
    assert_keep_count_parity(scores, 0.01, torch.tensor([500, 321]))
    assert_mass_parity(scores, 0.01, torch.tensor([500, 321]))


# --------------------------------------------------------------------------
# paged_attention: split-K over a paged cache (SPEC 10)
#
# Bad lengths and block ids are device-side assertions on CUDA (a decode step
# must not wait for the host), which end CUDA for the process, so the range
# checks are tested on the CPU only (tests/test_ops_errors.py style), not here.
# --------------------------------------------------------------------------


def paged_cache(lengths, block_rows, head_dim, value_dim, dtype, generator, spare_blocks=2):
    """A paged cache whose heads hold `lengths` [b, Hkv] rows: each head's
    blocks drawn from a shuffled pool, so neighbours in a head are scattered;
    table slots past a head's last block are -1 and every pool row no head
    holds is NaN, so reading either would show."""
    lengths = torch.tensor(lengths, dtype=torch.int64)
    batch, kv_heads = lengths.shape
    needed = (lengths + block_rows - 1) // block_rows
    max_blocks = int(needed.max()) + 1  # one slot past the longest head
    blocks = int(needed.sum()) + spare_blocks
    order = torch.randperm(blocks, generator=generator).tolist()
    table = torch.full((batch, kv_heads, max_blocks), -1, dtype=torch.int64)
    key_pool = torch.full((blocks, block_rows, head_dim), float("nan"), dtype=dtype)
    value_pool = torch.full((blocks, block_rows, value_dim), float("nan"), dtype=dtype)
    for s in range(batch):
        for h in range(kv_heads):
            length = int(lengths[s, h])
            for slot in range(int(needed[s, h])):
                block = order.pop()
                table[s, h, slot] = block
                rows = min(block_rows, length - slot * block_rows)
                key_pool[block, :rows] = torch.randn(rows, head_dim, generator=generator).to(dtype)
                value_pool[block, :rows] = torch.randn(rows, value_dim, generator=generator).to(dtype)
    return key_pool, value_pool, table, lengths


def paged_inputs(lengths, group, queries, block_rows, head_dim, value_dim, dtype, generator):
    key_pool, value_pool, table, lengths = paged_cache(lengths, block_rows, head_dim, value_dim, dtype, generator)
    batch, kv_heads = lengths.shape
    query = torch.randn(batch, kv_heads * group, queries, head_dim, generator=generator).to(dtype)
    return query, key_pool, value_pool, table, lengths


def assert_paged_attention_parity(query, key_pool, value_pool, table, lengths, scale, softcap=0.0, sinks=None):
    """The device within float32 accuracy of the float64 truth (plus the
    rounding of the output to the query's dtype), and close to the CPU.

    The float32 bound is twice the error of a plain float32 run of the
    reference, plus the float32 rounding of a length-d dot product (as in
    assert_importance_parity) and of a sum over a head's rows (which grows
    with the square root of the length), both in units of the largest value,
    which bounds every output."""
    options = dict(softcap=softcap, sinks=sinks)
    truth = reference.paged_attention(
        query.double(), key_pool.double(), value_pool.double(), table, lengths, scale, dtype=torch.float64, **options
    )
    plain32 = reference.paged_attention(
        query.float(), key_pool.float(), value_pool.float(), table, lengths, scale, dtype=torch.float32, **options
    )
    cpu = refreekv.paged_attention(query, key_pool, value_pool, table, lengths, scale, **options)
    q, k, v, t, lens, device_sinks = on_device(query, key_pool, value_pool, table, lengths, sinks)
    ours = refreekv.paged_attention(q, k, v, t, lens, scale, softcap=softcap, sinks=device_sinks)
    assert ours.dtype == query.dtype and ours.shape == truth.shape and ours.device.type == DEVICE
    assert torch.isfinite(ours).all()

    # Bounds from the pools' held rows (the others are NaN): the largest value
    # and, for the logits, the largest |q| times the largest row sum of |k|.
    largest_value = max(1.0, value_pool.double().nan_to_num(0.0).abs().max().item())
    key_sums = key_pool.double().nan_to_num(0.0).abs().sum(-1).max().item()
    largest = abs(scale) * query.double().abs().max().item() * key_sums
    if sinks is not None:
        largest = max(largest, sinks.abs().max().item())
    dot_rounding = 4 * query.shape[-1] ** 0.5 * FLOAT32_EPS * max(1.0, largest)
    sum_rounding = 8 * max(1, int(lengths.max())) ** 0.5 * FLOAT32_EPS
    output_rounding = 0.0 if query.dtype == torch.float32 else torch.finfo(query.dtype).eps
    bound = (
        2 * (plain32.double() - truth).abs().max().item()
        + (dot_rounding + sum_rounding) * largest_value
        + output_rounding * truth.abs().max().item()
    )
    error = (ours.cpu().double() - truth).abs().max().item()
    assert error <= bound, f"error {error:.3e} exceeds {bound:.3e}"
    # Both devices compute in float32, summing in different orders; rounded
    # to a 16-bit dtype they may differ by an ulp.
    ulp = 1e-4 if query.dtype == torch.float32 else 2 * torch.finfo(query.dtype).eps
    torch.testing.assert_close(ours.cpu(), cpu, rtol=ulp, atol=1e-4)
    return ours


# (lengths [b, Hkv], group, queries, block_rows, head_dim, value_dim). On
# CUDA a CTA holds up to 8 (16-bit) or 16 (float32) of a group's g * q rows
# and tiles of up to 64 rows; its split count follows max_blocks * block_rows
# and the GPU's size, so long heads take many splits.
PAGED_SHAPES = {
    "q=1 g=1 around a block": ([[0, 1], [15, 17]], 1, 1, 16, 64, 64),
    "q=1 g=4 many splits": ([[5000, 1], [0, 63]], 4, 1, 16, 128, 128),
    "q=1 g=8 big blocks": ([[5000, 4095]], 8, 1, 256, 128, 128),
    "q=3 g=4 rows that see nothing": ([[0, 2], [3, 130]], 4, 3, 16, 64, 64),
    "q=5 g=8 several row chunks": ([[700, 4, 65]], 8, 5, 32, 32, 48),
    "odd rows": ([[100, 13], [6, 0]], 2, 2, 7, 20, 12),
    "d=256": ([[300, 129]], 2, 2, 16, 256, 256),
    "dv past one value chunk": ([[200, 70]], 2, 1, 16, 16, 1100),
    "a block per row": ([[37, 0, 1]], 1, 1, 1, 8, 8),
    "head_dim 1": ([[90, 65]], 3, 2, 8, 1, 3),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", PAGED_SHAPES)
def test_paged_attention_matches(shape, dtype, variant, generator):
    lengths, group, queries, block_rows, head_dim, value_dim = PAGED_SHAPES[shape]
    query, key_pool, value_pool, table, lengths = paged_inputs(
        lengths, group, queries, block_rows, head_dim, value_dim, dtype, generator
    )
    heads = query.shape[1]
    options = variant_options(variant, heads, max(2, int(lengths.max())), generator)
    assert_paged_attention_parity(query, key_pool, value_pool, table, lengths, head_dim**-0.5, **options)


@pytest.mark.parametrize("batch", [1, 8])
def test_paged_attention_decode_shapes(batch, generator):
    # The benchmark's decode step (H = 32, Hkv = 8, d = 128), 8k rows at most,
    # heads of very different lengths: b = 1 takes many splits per head on
    # CUDA, b = 8 fewer.
    head_lengths = [8192, 8000, 1, 0, 4097, 513, 64, 65]
    lengths = [head_lengths[s:] + head_lengths[:s] for s in range(batch)]
    inputs = paged_inputs(lengths, 4, 1, 16, 128, 128, torch.bfloat16, generator)
    sinks = torch.randn(32, generator=generator) + math.log(4096)
    assert_paged_attention_parity(*inputs, 128**-0.5, sinks=sinks)


def test_paged_attention_is_deterministic(generator):
    inputs = on_device(*paged_inputs([[3000, 700]], 4, 2, 16, 64, 64, torch.float16, generator))
    first = refreekv.paged_attention(*inputs, 0.125, softcap=5.0)
    assert torch.equal(first, refreekv.paged_attention(*inputs, 0.125, softcap=5.0))


def test_paged_attention_equals_padded_attention(generator):
    # A padded cache written into a paged one with paged_write: attention over
    # the pool is attention over each head's own rows of the padded cache.
    batch, kv_heads, keys, block_rows, d = 2, 2, 300, 16, 32
    key = torch.randn(batch, kv_heads, keys, d, generator=generator)
    value = torch.randn(batch, kv_heads, keys, d, generator=generator)
    kept = torch.tensor([[300, 41], [0, 17]])
    row_index = torch.stack([torch.randperm(keys, generator=generator).sort().values for _ in range(batch * kv_heads)])
    row_index = row_index.view(batch, kv_heads, keys)
    max_blocks = keys // block_rows + 1
    table = torch.randperm(batch * kv_heads * max_blocks, generator=generator).view(batch, kv_heads, max_blocks)
    key_pool = torch.zeros(batch * kv_heads * max_blocks, block_rows, d)
    value_pool = torch.zeros_like(key_pool)
    query = torch.randn(batch, 2 * kv_heads, 1, d, generator=generator)
    kp, vp, t, k, v, idx, count, q = on_device(key_pool, value_pool, table, key, value, row_index, kept, query)
    refreekv.paged_write(kp, vp, t, torch.zeros_like(count), k, v, row_index=idx, row_count=count)
    ours = refreekv.paged_attention(q, kp, vp, t, count, d**-0.5)
    for s in range(batch):
        for h in range(kv_heads):
            rows = row_index[s, h, : kept[s, h]]
            for hq in (2 * h, 2 * h + 1):
                logits = query[s, hq] @ key[s, h, rows].T * d**-0.5
                expected = torch.softmax(logits, dim=-1) @ value[s, h, rows] if len(rows) else torch.zeros(1, d)
                torch.testing.assert_close(ours[s, hq].cpu(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# paged_write: a copy, so device == CPU == reference bit for bit
# --------------------------------------------------------------------------


def assert_paged_write_parity(key_pool, value_pool, table, start, key, value, row_index=None, row_count=None):
    options = dict(row_index=row_index, row_count=row_count)
    expected = key_pool.clone(), value_pool.clone()
    reference.paged_write(*expected, table, start, key, value, **options)
    cpu = key_pool.clone(), value_pool.clone()
    refreekv.paged_write(*cpu, table, start, key, value, **options)
    ours = [pool.clone() for pool in on_device(key_pool, value_pool)]
    t, first, k, v, index, count = on_device(table, start, key, value, row_index, row_count)
    assert refreekv.paged_write(*ours, t, first, k, v, row_index=index, row_count=count) is None
    for got, from_cpu, want in zip(ours, cpu, expected):
        assert got.device.type == DEVICE
        assert torch.equal(got.cpu(), from_cpu) and torch.equal(from_cpu, want)


def empty_paged_pools(batch, kv_heads, max_blocks, block_rows, key_dim, value_dim, dtype, generator):
    """Pools of random rows (a write must leave all but its own alone) and a
    table of scattered blocks, max_blocks per head."""
    blocks = batch * kv_heads * max_blocks + 3
    key_pool = torch.randn(blocks, block_rows, key_dim, generator=generator).to(dtype)
    value_pool = torch.randn(blocks, block_rows, value_dim, generator=generator).to(dtype)
    table = torch.randperm(blocks, generator=generator)[: batch * kv_heads * max_blocks]
    return key_pool, value_pool, table.view(batch, kv_heads, max_blocks)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("key_dim,value_dim", [(128, 128), (64, 96), (20, 12), (1, 3)])
def test_paged_write_pack_matches(dtype, key_dim, value_dim, generator):
    # A prefill cut: each head's kept positions, in order, from row 0.
    # 16-byte rows take the vectorized copy; odd rows the element copy.
    batch, kv_heads, keys, kept_rows, block_rows = 2, 3, 200, 150, 16
    key = torch.randn(batch, kv_heads, keys, key_dim, generator=generator).to(dtype)
    value = torch.randn(batch, kv_heads, keys, value_dim, generator=generator).to(dtype)
    pools = empty_paged_pools(batch, kv_heads, -(-kept_rows // block_rows), block_rows, key_dim, value_dim, dtype, generator)
    row_index = torch.stack(
        [torch.randperm(keys, generator=generator)[:kept_rows].sort().values for _ in range(batch * kv_heads)]
    ).view(batch, kv_heads, kept_rows)
    start = torch.zeros(batch, kv_heads, dtype=torch.int64)
    assert_paged_write_parity(*pools, start, key, value, row_index)  # every listed row
    row_count = torch.tensor([[150, 0, 1], [16, 17, 99]])
    row_index[1, 1, 17:] = -3  # past row_count: never read
    assert_paged_write_parity(*pools, start, key, value, row_index, row_count)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("new_rows", [1, 3, 40])
def test_paged_write_append_matches(dtype, new_rows, generator):
    # A decode append at each head's length: mid-block, at a block's end and
    # across block boundaries.
    batch, kv_heads, block_rows, d = 2, 2, 16, 64
    pools = empty_paged_pools(batch, kv_heads, 6, block_rows, d, d, dtype, generator)
    start = torch.tensor([[0, 15], [16, 47]])
    key = torch.randn(batch, kv_heads, new_rows, d, generator=generator).to(dtype)
    value = torch.randn(batch, kv_heads, new_rows, d, generator=generator).to(dtype)
    assert_paged_write_parity(*pools, start, key, value)
    assert_paged_write_parity(*pools, start, key, value, row_count=torch.tensor([[new_rows, 0], [1, new_rows]]))


def test_paged_write_rejects_like_cpu():
    key_pool = torch.zeros(4, 8, 16)
    value_pool = torch.zeros(4, 16, 8).transpose(1, 2)  # [4, 8, 16], not contiguous
    table = torch.arange(4).view(1, 2, 2)
    inputs = (key_pool, value_pool, table, torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16))
    message = r"paged_write: expected contiguous key_pool and value_pool \(they are written in place\)"
    with pytest.raises(RuntimeError, match=message):
        refreekv.paged_write(*inputs)
    with pytest.raises(RuntimeError, match=message):
        refreekv.paged_write(*on_device(*inputs))
