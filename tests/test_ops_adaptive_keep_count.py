"""refreekv.adaptive_keep_count against SPEC 2.3 evaluated literally in float64.

Counts are integers, so they must be equal. The scores are seeded random
values; a candidate whose relative loss lies within 1e-12 of the threshold
would make the rule ambiguous at float64 precision, and the seeds used here
have none (checked by `assert_no_near_tie`).
"""

import random

import pytest
import torch

import refreekv
from refreekv import reference


def attention_like_scores(batch, heads, candidates, generator, decay=3.0):
    # Positive, decaying with rank and noisy, like attention rows ranked by
    # recency: a realistic shape for the stopping rule.
    ranks = torch.arange(candidates, dtype=torch.float64) / max(candidates, 1)
    noise = torch.rand(batch, heads, candidates, generator=generator, dtype=torch.float64)
    return (noise * torch.exp(-decay * ranks)).float()


def assert_no_near_tie(scores, threshold, valid_len=None):
    for b in range(scores.shape[0]):
        valid = scores.shape[2] if valid_len is None else int(valid_len[b])
        if valid == 0 or threshold == 0:
            continue
        norms = scores[b, :, :valid].double().square().cumsum(-1).sqrt().mean(0)
        if norms[-1] > 0:
            loss = (norms[-1] - norms) / norms[-1]
            assert (loss - threshold).abs().min() > 1e-12, "ambiguous case; pick another seed"


def assert_matches_reference(scores, threshold, valid_len=None):
    ours = refreekv.adaptive_keep_count(scores, threshold, valid_len=valid_len)
    assert ours.dtype == torch.int64 and ours.shape == (scores.shape[0],)
    assert ours.device == scores.device
    assert_no_near_tie(scores.cpu(), threshold, None if valid_len is None else valid_len.cpu())
    expected = reference.adaptive_keep_count(scores.cpu(), threshold, valid_len=None if valid_len is None else valid_len.cpu())
    assert torch.equal(ours.cpu(), expected), (ours, expected)
    return ours


@pytest.mark.parametrize("heads", [1, 3, 8, 32])
@pytest.mark.parametrize("candidates", [1, 2, 63, 64, 65, 1000, 4099])
@pytest.mark.parametrize("threshold", [0.0, 0.001, 0.01, 0.05, 0.5, 0.999])
def test_matches_reference(device, generator, heads, candidates, threshold):
    scores = attention_like_scores(3, heads, candidates, generator).to(device)
    assert_matches_reference(scores, threshold)


def test_low_precision_inputs(device, dtype, generator):
    scores = attention_like_scores(4, 8, 777, generator).to(dtype=dtype, device=device)
    assert_matches_reference(scores, 0.01)


def test_valid_len(device, generator):
    scores = attention_like_scores(4, 4, 300, generator)
    valid_len = torch.tensor([300, 0, 1, 171])
    # Entries past valid_len must be ignored, whatever they hold.
    scores[1:, :, 171:] = 1e6
    counts = assert_matches_reference(scores.to(device), 0.01, valid_len.to(device))
    assert counts[1] == 0 and counts[2] == 1


def test_randomized_sweep(device):
    rng = random.Random(99)
    generator = torch.Generator().manual_seed(5)
    for case in range(300):
        batch, heads, candidates = rng.randint(1, 4), rng.randint(1, 12), rng.randint(0, 700)
        scores = attention_like_scores(batch, heads, candidates, generator, decay=rng.uniform(0, 8))
        valid_len = None
        if rng.random() < 0.5:
            valid_len = torch.tensor([rng.randint(0, candidates) for _ in range(batch)])
        threshold = rng.choice([0.0, rng.uniform(0, 0.2), rng.uniform(0, 0.999)])
        try:
            assert_matches_reference(scores.to(device), threshold, None if valid_len is None else valid_len.to(device))
        except AssertionError as failure:
            raise AssertionError(f"case {case}: {tuple(scores.shape)} T={threshold} valid_len={valid_len}") from failure


def test_keeps_at_least_one_and_shrinks_as_threshold_grows(device, generator):
    scores = attention_like_scores(2, 8, 2000, generator).to(device)
    counts = [refreekv.adaptive_keep_count(scores, t) for t in (0.0, 0.001, 0.01, 0.1, 0.5, 0.99)]
    for larger, smaller in zip(counts, counts[1:]):
        assert (smaller <= larger).all()
    assert (counts[-1] >= 1).all()
    assert (counts[0] == 2000).all()


def test_zero_threshold_keeps_every_nonzero_score(device):
    # A float32 running sum of squares stops growing long before these tails,
    # but they are not zero, so a lossless cut must keep them.
    scores = torch.zeros(2, 3, 50)
    scores[:, :, :10] = 1.0
    scores[0, 1, 40] = 1e-30
    scores[1, 2, 11] = 1e-20
    counts = refreekv.adaptive_keep_count(scores.to(device), 0.0)
    assert counts.tolist() == [41, 12]


def test_degenerate_signal_keeps_everything(device):
    scores = torch.zeros(2, 4, 25, device=device)
    assert refreekv.adaptive_keep_count(scores, 0.01).tolist() == [25, 25]
    valid_len = torch.tensor([7, 0], device=device)
    assert refreekv.adaptive_keep_count(scores, 0.01, valid_len=valid_len).tolist() == [7, 0]


def test_stopping_rule_by_hand(device):
    # One head, scores [3, 4, 0, 0, 1e-3]: ||a|| = sqrt(25 + 1e-6).
    # K(1) = 3 loses 40%; K(2) = 5 loses 2e-8 relative; K(5) loses nothing.
    scores = torch.tensor([[[3.0, 4.0, 0.0, 0.0, 1e-3]]], device=device)
    assert refreekv.adaptive_keep_count(scores, 0.5).item() == 1
    assert refreekv.adaptive_keep_count(scores, 0.39).item() == 2
    assert refreekv.adaptive_keep_count(scores, 1e-9).item() == 5
    assert refreekv.adaptive_keep_count(scores, 0.0).item() == 5


def test_heads_are_averaged_not_pooled(device):
    # Difference of head-averaged norms (SPEC 2.3), not the norm of all heads
    # pooled: head 0 is flat, head 1 has all its mass first.
    scores = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [10.0, 0.0, 0.0, 0.0]]], device=device)
    # B = (2 + 10) / 2 = 6. K(1) = (1 + 10) / 2 = 5.5 (loss 8.3%),
    # K(2) = (sqrt 2 + 10) / 2 = 5.707 (loss 4.9%), K(3) = 5.866 (loss 2.2%).
    assert refreekv.adaptive_keep_count(scores, 0.05).item() == 2
    assert refreekv.adaptive_keep_count(scores, 0.03).item() == 3


def test_non_contiguous_input(device, generator):
    scores = attention_like_scores(3, 5, 90, generator).to(device)
    strided = scores.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    assert torch.equal(refreekv.adaptive_keep_count(strided, 0.02), refreekv.adaptive_keep_count(scores, 0.02))


def test_opcheck(device, generator):
    scores = attention_like_scores(2, 4, 100, generator).to(device)
    valid_len = torch.tensor([100, 40], device=device)
    torch.library.opcheck(torch.ops.refreekv.adaptive_keep_count.default, (scores, 0.01, None))
    torch.library.opcheck(torch.ops.refreekv.adaptive_keep_count.default, (scores, 0.01, valid_len))
