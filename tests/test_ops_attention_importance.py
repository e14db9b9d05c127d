"""refreekv.attention_importance against the materialized-softmax reference.

Accuracy is judged the flash-attention way: the operator computes in float32
whatever the input dtype, so its error against a float64 ground truth (on the
same rounded inputs) must stay within twice the error of a plain float32
PyTorch run of the reference. A single float32 run can be luckier than
float32 arithmetic guarantees, so the bound also admits the error that one
float32 rounding of the largest logit (or sink, which joins the same
normalizer) causes in the largest score.
"""

import math
import random

import pytest
import torch

import refreekv
from refreekv import reference

FLOAT32_EPS = torch.finfo(torch.float32).eps


def make_inputs(batch, heads, kv_heads, window, keys, head_dim, dtype, device, generator, pad=None):
    query = torch.randn(batch, heads, window, head_dim, generator=generator).to(dtype=dtype, device=device)
    key = torch.randn(batch, kv_heads, keys, head_dim, generator=generator).to(dtype=dtype, device=device)
    kv_valid = None
    if pad is not None:
        positions = torch.arange(keys)
        kv_valid = (positions[None, :] >= torch.tensor(pad)[:, None]).to(device)
    return query, key, kv_valid


def largest_logit(query, key, scale, sinks=None):
    """The largest uncapped logit or sink in magnitude (a softcap only
    shrinks logits, so this bounds the capped ones too)."""
    group = query.shape[1] // key.shape[1]
    key = key.double().repeat_interleave(group, dim=1)
    largest = abs(scale) * (query.double() @ key.transpose(-1, -2)).abs().max().item()
    return largest if sinks is None else max(largest, sinks.double().abs().max().item())


def assert_matches_reference(query, key, scale, **options):
    ours = refreekv.attention_importance(query, key, scale, **options)
    query, key, options = query.cpu(), key.cpu(), _cpu(options)
    truth = reference.attention_importance(query, key, scale, dtype=torch.float64, **options)
    plain32 = reference.attention_importance(query, key, scale, dtype=torch.float32, **options)
    assert ours.dtype == torch.float32
    assert ours.shape == truth.shape
    assert torch.isfinite(ours).all()
    ours_error = (ours.cpu().double() - truth).abs().max().item()
    plain_error = (plain32.double() - truth).abs().max().item()
    largest = largest_logit(query, key, scale, options.get("sinks"))
    one_logit_ulp = FLOAT32_EPS * max(1.0, largest) * truth.abs().max().item()
    bound = 2 * plain_error + one_logit_ulp
    assert ours_error <= bound, f"error {ours_error:.3e} exceeds {bound:.3e} (float32 reference: {plain_error:.3e})"
    return ours


def _cpu(options):
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}


def make_sinks(heads, keys, logit_std, dtype, device, generator):
    """Sink logits with the logits' spread, centred on log(keys) where
    exp(sink) rivals a row's sum over the keys: the sinks take anything from
    a few percent to nearly all of a row's probability."""
    sinks = torch.randn(heads, generator=generator) * logit_std + math.log(keys)
    return sinks.to(dtype=dtype, device=device)


# Logits of q . k with d = 16 have standard deviation 4 * scale: 1 uncapped,
# 4 under a softcap of 5, so that many are squeezed well below their value.
@pytest.mark.parametrize("scale,softcap", [(0.25, 0.0), (1.0, 5.0)], ids=["uncapped", "softcap"])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("keys,window", [(37, 1), (37, 5), (37, 37), (131, 1), (131, 17), (131, 131)])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "left-padded"])
def test_matches_reference(device, dtype, generator, group, keys, window, padded, scale, softcap, with_sinks):
    pad = [0, keys // 3] if padded else None
    query, key, kv_valid = make_inputs(2, 2 * group, 2, window, keys, 16, dtype, device, generator, pad)
    sinks = make_sinks(2 * group, keys, 4 * scale, dtype, device, generator) if with_sinks else None
    assert_matches_reference(query, key, scale, kv_valid=kv_valid, softcap=softcap, sinks=sinks)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("group_reduce", [None, "mean", "max"])
def test_options_match_reference(device, dtype, generator, normalize, group_reduce):
    query, key, kv_valid = make_inputs(2, 8, 2, 9, 53, 32, dtype, device, generator, pad=[4, 0])
    ours = assert_matches_reference(
        query, key, 1 / math.sqrt(32), kv_valid=kv_valid, normalize=normalize, group_reduce=group_reduce
    )
    assert ours.shape == (2, 8 if group_reduce is None else 2, 53)


@pytest.mark.parametrize(
    "keys,window,group",
    [(1500, 1500, 1), (1100, 700, 4), (2600, 3, 8)],
    ids=["w=n, several row blocks", "w<n, GQA 4, blocks", "long keys, small window"],
)
def test_row_blocks_match_reference(device, generator, keys, window, group):
    # Large enough that a worker splits the window into several row blocks,
    # with padding that blinds whole rows of the first block.
    query, key, kv_valid = make_inputs(2, group, 1, window, keys, 8, torch.float32, device, generator, pad=[keys - window + 2, 0])
    assert_matches_reference(query, key, 0.3, kv_valid=kv_valid)


def test_randomized_sweep(device):
    rng = random.Random(20260214)
    generator = torch.Generator().manual_seed(7)
    for case in range(300):
        batch, kv_heads = rng.randint(1, 3), rng.randint(1, 3)
        group = rng.choice([1, 2, 4, 8])
        keys = rng.randint(1, 160)
        window = rng.choice([1, keys, rng.randint(1, keys)])
        head_dim = rng.choice([1, 4, 24, 64])
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        pad = [rng.randint(0, keys) for _ in range(batch)] if rng.random() < 0.5 else None
        query, key, kv_valid = make_inputs(batch, kv_heads * group, kv_heads, window, keys, head_dim, dtype, device, generator, pad)
        options = dict(
            kv_valid=kv_valid,
            normalize=rng.random() < 0.5,
            group_reduce=rng.choice([None, "mean", "max"]),
        )
        try:
            assert_matches_reference(query, key, rng.uniform(0.05, 1.0), **options)
        except AssertionError as failure:
            raise AssertionError(f"case {case}: shapes {tuple(query.shape)} {tuple(key.shape)} {dtype} {options}") from failure


def test_probability_mass_is_conserved(device, generator):
    # Each unpadded row distributes exactly one unit of probability.
    window, keys = 6, 40
    query, key, kv_valid = make_inputs(1, 4, 2, window, keys, 16, torch.float32, device, generator)
    summed = refreekv.attention_importance(query, key, 0.2, normalize=False)
    torch.testing.assert_close(summed.sum(-1).cpu(), torch.full((1, 4), float(window)))


def test_padding_keys_score_zero_and_blind_rows_contribute_nothing(device, generator):
    # The window reaches into the padding of sequence 0: its first rows see
    # only padding keys.
    keys, window = 12, 6
    query, key, kv_valid = make_inputs(2, 2, 1, window, keys, 8, torch.float32, device, generator, pad=[9, 0])
    summed = refreekv.attention_importance(query, key, 0.5, kv_valid=kv_valid, normalize=False)
    assert (summed[0, :, :9] == 0).all()
    torch.testing.assert_close(summed.sum(-1).cpu(), torch.tensor([[3.0, 3.0], [6.0, 6.0]]))


def test_inert_softcap_and_sinks_give_the_plain_result(device, generator):
    # A softcap far above every logit leaves c * tanh(x / c) = x to float32
    # precision, and a sink of -1e4 adds exp(-1e4) = 0 to every normalizer.
    # Padding blinds the first two window rows of sequence 0: with a sink
    # they still contribute nothing.
    query, key, kv_valid = make_inputs(2, 4, 2, 5, 40, 16, torch.float32, device, generator, pad=[37, 0])
    plain = refreekv.attention_importance(query, key, 0.3, kv_valid=kv_valid)
    sinks = torch.full((4,), -1e4, device=device)
    for options in ({"softcap": 1e4}, {"sinks": sinks}, {"softcap": 1e4, "sinks": sinks}):
        ours = refreekv.attention_importance(query, key, 0.3, kv_valid=kv_valid, **options)
        torch.testing.assert_close(ours, plain, msg=lambda m: f"{options}: {m}")


def test_softcap_none_means_no_capping(device, generator):
    query, key, _ = make_inputs(1, 2, 1, 3, 10, 8, torch.float32, device, generator)
    plain = refreekv.attention_importance(query, key, 2.0)
    assert torch.equal(refreekv.attention_importance(query, key, 2.0, softcap=None), plain)


def test_sink_scales_every_probability_of_its_head(device):
    # d = 1, q = 1, k = (0, ln 2, ln 3), scale 1: exp(logits) = (1, 2, 3).
    # Window row 0 (position 1) sees keys 0-1, normalizer Z = 3; row 1 sees
    # all three, Z = 6. A sink with exp(sink) = E turns each probability e / Z
    # into e / (Z + E): lower by the factor Z / (Z + E). Two query heads share
    # the key head, each with its own sink; float64 sinks are used in float32.
    query = torch.ones(1, 2, 2, 1, device=device)
    key = torch.log(torch.tensor([1.0, 2.0, 3.0], device=device)).view(1, 1, 3, 1)
    sink_exps = (9.0, 30.0)
    sinks = torch.log(torch.tensor(sink_exps, dtype=torch.float64, device=device))
    expected = torch.zeros(1, 2, 3)
    for head, sink_exp in enumerate(sink_exps):
        for visible, row_sum in ((2, 3.0), (3, 6.0)):
            plain_probs = torch.tensor([1.0, 2.0, 3.0])[:visible] / row_sum
            expected[0, head, :visible] += plain_probs * (row_sum / (row_sum + sink_exp))
    ours = refreekv.attention_importance(query, key, 1.0, normalize=False, sinks=sinks)
    torch.testing.assert_close(ours.cpu(), expected)


def test_window_of_one_is_the_last_attention_row(device, generator):
    query, key, _ = make_inputs(1, 4, 4, 1, 29, 16, torch.float32, device, generator)
    expected = torch.softmax((query @ key.transpose(-1, -2)).squeeze(2) * 0.125, dim=-1)
    torch.testing.assert_close(refreekv.attention_importance(query, key, 0.125), expected)


def test_non_contiguous_and_expanded_inputs(device, generator):
    query, key, kv_valid = make_inputs(2, 4, 2, 5, 30, 8, torch.float32, device, generator, pad=[3, 0])
    strided_query = query.transpose(2, 3).contiguous().transpose(2, 3)
    expanded_key = key[:, :1].expand(2, 2, 30, 8)
    sinks = torch.randn(8, device=device)
    expected = refreekv.attention_importance(
        query, expanded_key.contiguous(), 0.3, kv_valid=kv_valid, sinks=sinks[::2].contiguous()
    )
    strided_valid = kv_valid.t().contiguous().t()
    ours = refreekv.attention_importance(strided_query, expanded_key, 0.3, kv_valid=strided_valid, sinks=sinks[::2])
    assert not any(t.is_contiguous() for t in (strided_query, expanded_key, strided_valid, sinks[::2]))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_inputs_that_require_grad_on_several_threads(device, generator):
    """A model's query and keys require grad; scoring them under no_grad on
    several threads must not fail in the worker threads, which do not
    inherit the caller's grad mode unless the kernel carries it over."""
    query, key, kv_valid = make_inputs(2, 8, 2, 17, 300, 16, torch.float32, device, generator, pad=[5, 0])
    expected = refreekv.attention_importance(query, key, 0.25, kv_valid=kv_valid)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            ours = refreekv.attention_importance(query.requires_grad_(), key.requires_grad_(), 0.25, kv_valid=kv_valid)
    finally:
        torch.set_num_threads(before)
    assert not ours.requires_grad
    torch.testing.assert_close(ours, expected)


def test_inputs_are_not_modified(device, dtype, generator):
    query, key, kv_valid = make_inputs(1, 4, 2, 3, 20, 8, dtype, device, generator, pad=[2])
    before = (query.clone(), key.clone(), kv_valid.clone())
    refreekv.attention_importance(query, key, 0.7, kv_valid=kv_valid)
    for original, after in zip(before, (query, key, kv_valid)):
        assert torch.equal(original, after)


def test_opcheck(device, generator):
    query, key, kv_valid = make_inputs(2, 4, 2, 3, 20, 8, torch.float32, device, generator, pad=[2, 0])
    sinks = torch.randn(4, generator=generator).to(device)
    for options in (
        {},
        {"kv_valid": kv_valid, "normalize": False, "group_reduce": "max"},
        {"kv_valid": kv_valid, "group_reduce": "mean", "softcap": 1.5, "sinks": sinks},
    ):
        args = (
            query,
            key,
            0.5,
            options.get("kv_valid"),
            options.get("normalize", True),
            options.get("group_reduce", "none"),
            options.get("softcap", 0.0),
            options.get("sinks"),
        )
        torch.library.opcheck(torch.ops.refreekv.attention_importance.default, args)


def test_traceable_by_torch_compile(device, generator):
    query, key, kv_valid = make_inputs(1, 4, 2, 3, 20, 8, torch.float32, device, generator, pad=[2])

    def keep_top(query, key, kv_valid):
        scores = refreekv.attention_importance(query, key, 0.5, kv_valid=kv_valid, group_reduce="mean")
        return scores.topk(4, dim=-1).indices

    compiled = torch.compile(keep_top, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(query, key, kv_valid), keep_top(query, key, kv_valid))
