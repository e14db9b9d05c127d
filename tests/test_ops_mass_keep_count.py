"""refreekv.mass_keep_count against its rule evaluated literally in float64.

Counts are integers, so they must be equal. The scores are seeded random
values; a count whose dropped share of the mass lies within 1e-12 of the
tolerance would make the rule ambiguous at float64 precision, and the seeds
used here have none (checked by `assert_no_near_tie`).
"""

import random

import pytest
import torch

import refreekv
from refreekv import reference
from test_ops_adaptive_keep_count import attention_like_scores


def assert_no_near_tie(scores, tolerance, valid_len=None):
    if tolerance == 0:
        return  # decided by the last non-zero score, not by a sum
    for b in range(scores.shape[0]):
        valid = scores.shape[2] if valid_len is None else int(valid_len[b])
        rows = scores[b, :, :valid].double()
        total = rows.sum(-1, keepdim=True)
        dropped = total - rows.cumsum(-1)  # r = 1..V
        share = dropped[total[:, 0] > 0] / total[total[:, 0] > 0]
        if share.numel():
            assert (share - tolerance).abs().min() > 1e-12, "ambiguous case; pick another seed"


def assert_matches_reference(scores, tolerance, valid_len=None):
    ours = refreekv.mass_keep_count(scores, tolerance, valid_len=valid_len)
    assert ours.dtype == torch.int64 and ours.shape == scores.shape[:2]
    assert ours.device == scores.device
    cpu_len = None if valid_len is None else valid_len.cpu()
    assert_no_near_tie(scores.cpu(), tolerance, cpu_len)
    expected = reference.mass_keep_count(scores.cpu(), tolerance, valid_len=cpu_len)
    assert torch.equal(ours.cpu(), expected), (ours, expected)
    return ours


@pytest.mark.parametrize("heads", [1, 3, 8, 32])
@pytest.mark.parametrize("candidates", [1, 2, 63, 64, 65, 1000, 4099])
@pytest.mark.parametrize("tolerance", [0.0, 0.001, 0.01, 0.05, 0.5, 0.999])
def test_matches_reference(device, generator, heads, candidates, tolerance):
    scores = attention_like_scores(3, heads, candidates, generator).to(device)
    assert_matches_reference(scores, tolerance)


def test_low_precision_inputs(device, dtype, generator):
    scores = attention_like_scores(4, 8, 777, generator).to(dtype=dtype, device=device)
    assert_matches_reference(scores, 0.01)


def test_valid_len(device, generator):
    scores = attention_like_scores(4, 4, 300, generator)
    valid_len = torch.tensor([300, 0, 1, 171])
    # Entries past valid_len must be ignored, whatever they hold: even values
    # that would be errors inside it.
    scores[1:, :, 171:] = 1e6
    scores[1:, 0, 200] = float("nan")
    scores[1:, 1, 250] = -3.0
    scores[1:, 2, 299] = float("inf")
    counts = assert_matches_reference(scores.to(device), 0.01, valid_len.to(device))
    assert (counts[1] == 0).all() and (counts[2] == 1).all()


def test_randomized_sweep(device):
    rng = random.Random(77)
    generator = torch.Generator().manual_seed(8)
    for case in range(300):
        batch, heads, candidates = rng.randint(1, 4), rng.randint(1, 12), rng.randint(0, 700)
        scores = attention_like_scores(batch, heads, candidates, generator, decay=rng.uniform(0, 8))
        if rng.random() < 0.3:
            scores[..., rng.randint(0, candidates) :] = 0  # zero tails
        valid_len = None
        if rng.random() < 0.5:
            valid_len = torch.tensor([rng.randint(0, candidates) for _ in range(batch)])
        tolerance = rng.choice([0.0, rng.uniform(0, 0.2), rng.uniform(0, 0.999)])
        try:
            assert_matches_reference(scores.to(device), tolerance, None if valid_len is None else valid_len.to(device))
        except AssertionError as failure:
            raise AssertionError(f"case {case}: {tuple(scores.shape)} delta={tolerance} valid_len={valid_len}") from failure


def test_keeps_at_least_one_and_shrinks_as_tolerance_grows(device, generator):
    scores = attention_like_scores(2, 8, 2000, generator).to(device)
    counts = [refreekv.mass_keep_count(scores, t) for t in (0.0, 0.001, 0.01, 0.1, 0.5, 0.99)]
    for larger, smaller in zip(counts, counts[1:]):
        assert (smaller <= larger).all()
    assert (counts[-1] >= 1).all()
    assert (counts[0] == 2000).all()


def test_zero_tolerance_keeps_every_nonzero_score(device):
    # M - P(r) is exactly 0 in double long before these tails (1 + 1e-30 is
    # 1), but they are not zero, so a lossless cut must keep them.
    scores = torch.zeros(2, 3, 50)
    scores[:, :, :10] = 1.0
    scores[0, 1, 40] = 1e-30
    scores[1, 2, 11] = 1e-20
    scores[1, 0, 49] = torch.finfo(torch.float32).tiny / 8  # a subnormal
    counts = refreekv.mass_keep_count(scores.to(device), 0.0)
    assert counts.tolist() == [[10, 41, 10], [50, 10, 12]]


def test_degenerate_signal_keeps_everything(device):
    scores = torch.zeros(2, 4, 25, device=device)
    assert (refreekv.mass_keep_count(scores, 0.01) == 25).all()
    valid_len = torch.tensor([7, 0], device=device)
    assert refreekv.mass_keep_count(scores, 0.01, valid_len=valid_len).tolist() == [[7] * 4, [0] * 4]
    # -0.0 carries no mass either.
    assert refreekv.mass_keep_count(-scores, 0.0).tolist() == [[25] * 4] * 2


def test_empty_shapes(device):
    assert refreekv.mass_keep_count(torch.rand(2, 3, 0, device=device), 0.1).tolist() == [[0] * 3] * 2
    assert refreekv.mass_keep_count(torch.rand(2, 0, 5, device=device), 0.1).shape == (2, 0)
    assert refreekv.mass_keep_count(torch.rand(0, 3, 5, device=device), 0.1).shape == (0, 3)


def test_rule_by_hand(device):
    # One head; M = 1 and every partial sum is exact in binary, so the ties
    # below are exact: dropped mass for r = 1..5 is 0.5, 0.1875, 0.1875,
    # 0.0625, 0.
    scores = torch.tensor([[[0.5, 0.3125, 0.0, 0.125, 0.0625]]], device=device)
    assert refreekv.mass_keep_count(scores, 0.5).item() == 1  # 0.5 <= 0.5
    assert refreekv.mass_keep_count(scores, 0.4999).item() == 2
    assert refreekv.mass_keep_count(scores, 0.1875).item() == 2  # 0.1875 <= 0.1875
    assert refreekv.mass_keep_count(scores, 0.18).item() == 4
    assert refreekv.mass_keep_count(scores, 0.0625).item() == 4
    assert refreekv.mass_keep_count(scores, 0.06).item() == 5
    assert refreekv.mass_keep_count(scores, 0.0).item() == 5


def test_heads_are_independent(device, generator):
    # A flat head needs almost every candidate, a peaked one few: one count
    # per head, each what that head alone would get.
    flat = torch.full((1, 1, 400), 0.01)
    peaked = attention_like_scores(1, 1, 400, generator, decay=40.0)
    scores = torch.cat([flat, peaked, attention_like_scores(1, 1, 400, generator)], dim=1).to(device)
    # 0.021 is no multiple of 1/400, so the flat head has no tie.
    counts = assert_matches_reference(scores, 0.021)
    assert counts.shape == (1, 3) and len(set(counts[0].tolist())) == 3
    assert counts[0, 0] == 392  # drops 8 of 400 equal scores: 2% <= 2.1%
    for h in range(3):
        assert refreekv.mass_keep_count(scores[:, h : h + 1], 0.021).item() == counts[0, h]


def test_non_contiguous_input(device, generator):
    scores = attention_like_scores(3, 5, 90, generator).to(device)
    strided = scores.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    assert torch.equal(refreekv.mass_keep_count(strided, 0.02), refreekv.mass_keep_count(scores, 0.02))


def test_opcheck(device, generator):
    scores = attention_like_scores(2, 4, 100, generator).to(device)
    valid_len = torch.tensor([100, 40], device=device)
    torch.library.opcheck(torch.ops.refreekv.mass_keep_count.default, (scores, 0.01, None))
    torch.library.opcheck(torch.ops.refreekv.mass_keep_count.default, (scores, 0.01, valid_len))
