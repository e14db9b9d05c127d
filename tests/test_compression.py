"""Compression methods on hand-made layer inputs (no model)."""

import subprocess
import sys

import pytest
import torch

import refreekv
from refreekv import reference
from refreekv.compression import H2O, LayerInputs, PyramidKV, ReFreeKV, SnapKV, StreamingLLM, fixed_budget_methods
from refreekv.compression.base import keep_top, resolve_budget


def layer_inputs(real_lengths, n=None, heads=4, kv_heads=2, head_dim=8, layer_idx=2, num_layers=6, seed=0):
    n = n or max(real_lengths)
    generator = torch.Generator().manual_seed(seed)
    real_len = torch.tensor(real_lengths)
    valid = torch.arange(n)[None, :] >= (n - real_len)[:, None]
    return LayerInputs(
        query=torch.randn(len(real_lengths), heads, n, head_dim, generator=generator) * 2,
        key=torch.randn(len(real_lengths), kv_heads, n, head_dim, generator=generator) * 2,
        scaling=head_dim**-0.5,
        layer_idx=layer_idx,
        num_layers=num_layers,
        prompt_valid=valid,
        real_len=real_len,
    )


def kept_positions(plan, b, head=0):
    return plan.keep_index[b, head, : plan.keep_len[b]].tolist()


def test_resolve_budget():
    real = torch.tensor([10, 3, 100])
    assert resolve_budget(0.5, real).tolist() == [5, 2, 50]  # round half to even: 1.5 -> 2
    assert resolve_budget(7, real).tolist() == [7, 3, 7]
    assert resolve_budget(0.001, real).tolist() == [1, 1, 1]


def test_streamingllm_keeps_sinks_and_recent_per_sequence():
    inputs = layer_inputs([12, 7], n=12)
    plan = StreamingLLM(budget=6, num_sinks=2).plan(inputs)
    assert plan.keep_len.tolist() == [6, 6]
    assert kept_positions(plan, 0) == [0, 1, 8, 9, 10, 11]
    assert kept_positions(plan, 1) == [5, 6, 8, 9, 10, 11]  # sinks counted from the first real token
    assert torch.equal(plan.keep_index[:, 0], plan.keep_index[:, 1]), "same positions for every head"


def test_short_prompts_keep_everything_real():
    inputs = layer_inputs([3, 12], n=12)
    plan = StreamingLLM(budget=8, num_sinks=4).plan(inputs)
    assert kept_positions(plan, 0) == [9, 10, 11]
    assert plan.keep_len.tolist() == [3, 8]


def test_refreekv_count_is_the_spec_rule_on_the_last_row():
    inputs = layer_inputs([40, 33], n=40)
    method = ReFreeKV(threshold=0.05)
    plan = method.plan(inputs)
    signal = reference.attention_importance(inputs.query[:, :, -1:], inputs.key, inputs.scaling, kv_valid=inputs.prompt_valid)
    recent = reference.adaptive_keep_count(signal.flip(-1), 0.05, valid_len=inputs.real_len - 4)
    assert torch.equal(plan.keep_len, recent + 4)
    for b in range(2):
        first = 40 - int(inputs.real_len[b])
        expected = list(range(first, first + 4)) + list(range(40 - int(recent[b]), 40))
        assert kept_positions(plan, b) == expected


def test_refreekv_sinks_in_norm_and_window_rows():
    inputs = layer_inputs([30], n=30)
    plan = ReFreeKV(threshold=0.05, include_sinks_in_norm=True, window_rows=0.2).plan(inputs)
    signal = reference.attention_importance(inputs.query[:, :, -6:], inputs.key, inputs.scaling)
    ranked = torch.cat([signal[..., :4], signal[..., 4:].flip(-1)], dim=-1)
    expected_recent = max(int(reference.adaptive_keep_count(ranked, 0.05)[0]) - 4, 1)
    assert plan.keep_len.tolist() == [4 + expected_recent]


def test_refreekv_threshold_zero_keeps_all():
    inputs = layer_inputs([25, 18], n=25)
    plan = ReFreeKV(threshold=0.0).plan(inputs)
    assert torch.equal(plan.keep_len, inputs.real_len)


def test_refreekv_attention_ranking_keeps_top_candidates_per_kv_head():
    inputs = layer_inputs([30], n=30)
    plan = ReFreeKV(threshold=0.1, ranking="attention").plan(inputs)
    scores = reference.attention_importance(inputs.query[:, :, -1:], inputs.key, inputs.scaling, group_reduce="mean")
    candidates = scores[0, :, 4:]
    ranked = candidates.sort(dim=-1, descending=True).values[None]
    count = int(reference.adaptive_keep_count(ranked, 0.1)[0])
    assert plan.keep_len.tolist() == [4 + count]
    for head in range(2):
        top = set((candidates[head].topk(count).indices + 4).tolist())
        assert kept_positions(plan, 0, head) == [0, 1, 2, 3] + sorted(top)


def test_keep_top_selects_by_score_and_forces_positions():
    scores = torch.tensor([[[0.1, 0.9, 0.3, 0.8, 0.2, 0.05]]])
    candidates = torch.tensor([[True, True, True, True, False, False]])
    forced = torch.tensor([[False, False, False, False, True, True]])
    plan = keep_top(scores, torch.tensor([2]), candidates, forced)
    assert kept_positions(plan, 0) == [1, 3, 4, 5] and plan.keep_len.tolist() == [4]


def stable_sort_keep_top(scores, counts, candidates, forced):
    """Plain per-head reference: candidates in descending score order, ties
    by position (a stable sort), the first `count` of them, plus forced;
    ascending positions."""
    batch, kv_heads, n = scores.shape
    kept = []
    for b in range(batch):
        for head in range(kv_heads):
            count = int(counts[b, head] if counts.dim() == 2 else counts[b])
            ranked = sorted((p for p in range(n) if candidates[b, p]), key=lambda p: -float(scores[b, head, p]))
            kept.append(sorted(ranked[:count] + [p for p in range(n) if forced[b, p]]))
    return kept


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_keep_top_equals_a_stable_sort_with_ties(per_head, seed):
    # Scores on a coarse grid tie often, as max-pooled scores do; the padding,
    # forced tail, zero counts and counts up to every candidate are all in play.
    generator = torch.Generator().manual_seed(seed)
    batch, kv_heads, n = 3, 4, 40
    scores = torch.randint(0, 5, (batch, kv_heads, n), generator=generator).float() / 4
    real = torch.tensor([40, 31, 12])
    valid = torch.arange(n)[None, :] >= (n - real)[:, None]
    forced = valid & (torch.arange(n)[None, :] >= n - 3)
    candidates = valid & ~forced
    available = candidates.sum(-1)
    if per_head:
        counts = torch.stack([torch.randint(0, int(a) + 1, (kv_heads,), generator=generator) for a in available])
        counts[0, 0], counts[1, 1] = 0, available[1]
    else:
        counts = torch.stack([torch.randint(0, int(a) + 1, (), generator=generator) for a in available])
    plan = keep_top(scores, counts, candidates, forced)
    expected = stable_sort_keep_top(scores, counts, candidates, forced)
    lengths = plan.kept_lengths().expand(batch, kv_heads)
    for b in range(batch):
        for head in range(kv_heads):
            kept = plan.keep_index[b, head, : int(lengths[b, head])].tolist()
            assert kept == expected[b * kv_heads + head], f"sequence {b}, head {head}"


def test_keep_top_refuses_nan_scores():
    scores = torch.tensor([[[0.1, float("nan"), 0.3, 0.8]]])
    candidates = torch.tensor([[True, True, True, False]])
    forced = ~candidates
    with pytest.raises(ValueError, match="expected finite scores, got NaN"):
        keep_top(scores, torch.tensor([2]), candidates, forced)


def test_snapkv_and_h2o_keep_the_window_and_the_budget():
    inputs = layer_inputs([50, 20], n=50)
    for method in (SnapKV(budget=0.5, window=4), H2O(budget=0.5, window=4), H2O(budget=0.5, window=4, observation="all")):
        plan = method.plan(inputs)
        assert plan.keep_len.tolist() == [25, 10]
        for b in range(2):
            for head in range(2):
                kept = kept_positions(plan, b, head)
                assert kept == sorted(kept) and kept[-4:] == [46, 47, 48, 49]
                assert min(kept) >= 50 - int(inputs.real_len[b]), "padding is never kept"


def test_snapkv_scores_match_a_plain_computation():
    inputs = layer_inputs([40], n=40)
    plan = SnapKV(budget=20, window=8, kernel=5).plan(inputs)
    scores = reference.attention_importance(inputs.query[:, :, -8:], inputs.key, inputs.scaling, normalize=False)
    pooled = torch.nn.functional.max_pool1d(scores, 5, stride=1, padding=2).view(1, 2, 2, 40).mean(2)
    for head in range(2):
        # Max pooling makes ties; they go to the earlier position.
        top = pooled[0, head, :32].sort(descending=True, stable=True).indices[:12].tolist()
        assert kept_positions(plan, 0, head) == sorted(top) + list(range(32, 40))


def test_pyramidkv_budgets_shrink_with_depth_around_the_mean():
    layers = 8
    budgets = []
    for layer in range(layers):
        inputs = layer_inputs([200], n=200, layer_idx=layer, num_layers=layers)
        budgets.append(int(PyramidKV(budget=0.5, window=8, beta=20).plan(inputs).keep_len))
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    assert abs(sum(budgets) / layers - 100) <= 1
    assert budgets[-1] == 8 + round(92 / 20)


def test_methods_listing():
    listing = refreekv.methods()
    assert list(listing) == ["refreekv", "coverage", "fullkv", "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv"]
    assert listing["refreekv"]["threshold"] == 0.01 and listing["refreekv"]["protected_layers"] == (0, 1)
    assert listing["snapkv"] == {"budget": 0.5, "window": 8, "kernel": 7, "pooling": "max", "protected_layers": ()}
    assert listing["fullkv"] == {}
    assert listing["coverage"]["stop"] == "mass" and listing["coverage"]["protected_layers"] == ()


def test_fixed_budget_methods_are_read_from_the_methods_in_listing_order():
    assert fixed_budget_methods() == ("streamingllm", "h2o", "snapkv", "pyramidkv", "adakv")


def test_the_methods_are_reachable_after_a_plain_import_without_transformers():
    """`refreekv.patch`'s docstring sends users to
    `refreekv.compression.fixed_budget_methods()`; it must work right after
    `import refreekv`, which leaves transformers unloaded."""
    code = (
        "import sys, refreekv; print(refreekv.compression.fixed_budget_methods()); "
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == [str(fixed_budget_methods()), "False"]
