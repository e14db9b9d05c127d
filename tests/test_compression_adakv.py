"""AdaKV (refreekv/compression/adakv.py): SnapKV's layer budget shared
unevenly among the KV heads, on hand-made layer inputs against the rule
written out here with plain loops, and end to end on a tiny model."""

import math

import pytest
import torch

import refreekv
from refreekv.compression import AdaKV, SnapKV, fixed_budget_methods
from refreekv.compression.base import resolve_budget
from refreekv.integration.cache import compress_layer

from integration_models import assert_batch_equals_each_alone, float32_logit_error, greedy, tiny_model
from test_compression import layer_inputs


def with_scores(method, scores):
    """`method` ranking by the given [b, Hkv, n] scores instead of SnapKV's."""
    method.scores = lambda inputs: scores
    return method


def head_rows(plan, b, head):
    return plan.keep_index[b, head, : int(plan.head_len[b, head])].tolist()


def even_share(inputs, b, window, budget):
    """What SnapKV keeps per head beyond its window, for sequence b."""
    real = int(inputs.real_len[b])
    budget_rows = int(resolve_budget(budget, inputs.real_len)[b])
    return min(max(budget_rows - min(window, real), 0), real - min(window, real))


def adakv_by_loops(scores, inputs, window, budget, floor):
    """The rule, per sequence: every head's top floor(floor * s) candidates,
    then the best Hkv * (s - floor) of the rest over all heads, ranked by
    score, then head, then position; plus the window. {(b, head): rows}."""
    batch, kv_heads, n = scores.shape
    kept = {}
    for b in range(batch):
        real = int(inputs.real_len[b])
        recent = min(window, real)
        window_rows = list(range(n - recent, n))
        candidates = list(range(n - real, n - recent))
        share = even_share(inputs, b, window, budget)
        floor_count = math.floor(floor * share)
        ranked = {h: sorted(candidates, key=lambda p: (-float(scores[b, h, p]), p)) for h in range(kv_heads)}
        rest = [(h, p) for h in range(kv_heads) for p in ranked[h][floor_count:]]
        rest.sort(key=lambda hp: (-float(scores[b, hp[0], hp[1]]), hp[0], hp[1]))
        won = rest[: kv_heads * (share - floor_count)]
        for h in range(kv_heads):
            kept[b, h] = sorted(ranked[h][:floor_count] + [p for head, p in won if head == h] + window_rows)
    return kept


@pytest.mark.parametrize("floor", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("budget", [0.5, 13])
@pytest.mark.parametrize("seed", range(3))
def test_the_plan_is_the_rule_with_ties_and_padding(floor, budget, seed):
    # Scores on a coarse grid tie often, within and across heads, as
    # max-pooled scores do; the shorter sequences are left-padded.
    inputs = layer_inputs([50, 37, 12], n=50, heads=8, kv_heads=4)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (3, 4, 50), generator=generator).float() / 5
    plan = with_scores(AdaKV(budget=budget, window=4, floor=floor), scores).plan(inputs)
    expected = adakv_by_loops(scores, inputs, 4, budget, floor)
    for (b, head), rows in expected.items():
        assert head_rows(plan, b, head) == rows, f"sequence {b}, head {head}"
    assert torch.equal(plan.keep_len, plan.head_len.amax(1))


@pytest.mark.parametrize("budget", [0.3, 0.5, 20])
@pytest.mark.parametrize("floor", [0.0, 0.2])
def test_heads_keep_snapkvs_count_on_average_per_sequence(budget, floor):
    inputs = layer_inputs([64, 45, 20], n=64, heads=8, kv_heads=4)
    plan = AdaKV(budget=budget, floor=floor).plan(inputs)
    snapkv = SnapKV(budget=budget).plan(inputs)
    assert torch.equal(plan.head_len.sum(1), 4 * snapkv.keep_len), "the same total as SnapKV, per sequence"
    assert not (plan.head_len == snapkv.keep_len[:, None]).all(), "the test needs heads that differ"


def test_every_head_keeps_its_floor():
    inputs = layer_inputs([64, 45, 20], n=64, heads=8, kv_heads=4)
    window, floor = 8, 0.5
    plan = AdaKV(budget=0.5, window=window, floor=floor).plan(inputs)
    for b in range(3):
        fewest = min(window, int(inputs.real_len[b])) + math.floor(floor * even_share(inputs, b, window, 0.5))
        assert int(plan.head_len[b].min()) >= fewest, f"sequence {b}"


def test_a_head_that_loses_every_ranking_keeps_exactly_its_floor():
    inputs = layer_inputs([40], n=40, heads=4, kv_heads=2)
    scores = torch.rand(1, 2, 40, generator=torch.Generator().manual_seed(3))
    scores[:, 1] -= 2  # head 1 scores below all of head 0
    plan = with_scores(AdaKV(budget=0.5, window=4, floor=0.2), scores).plan(inputs)
    share = 20 - 4
    assert plan.head_len.tolist() == [[4 + 2 * share - 3, 4 + 3]]  # floor(0.2 * 16) = 3


@pytest.mark.parametrize("budget", [0.25, 0.5, 17])
def test_floor_one_is_snapkv(budget):
    inputs = layer_inputs([60, 41, 9], n=60, heads=8, kv_heads=4)
    plan = AdaKV(budget=budget, floor=1.0).plan(inputs)
    snapkv = SnapKV(budget=budget).plan(inputs)
    assert torch.equal(plan.head_len, snapkv.keep_len[:, None].expand(-1, 4))
    for b in range(3):
        for head in range(4):
            assert head_rows(plan, b, head) == snapkv.keep_index[b, head, : int(snapkv.keep_len[b])].tolist()


def test_heads_with_more_score_mass_get_more_rows():
    # One decreasing profile of scores, scaled by each head's mass: a head's
    # every candidate outranks the same-ranked one of a lighter head.
    inputs = layer_inputs([80], n=80, heads=8, kv_heads=4)
    profile = torch.rand(80, generator=torch.Generator().manual_seed(0)).sort(descending=True).values
    mass = torch.tensor([4.0, 1.0, 3.0, 2.0])
    plan = with_scores(AdaKV(budget=0.5, window=8), (mass[:, None] * profile)[None]).plan(inputs)
    by_rows = plan.head_len[0].argsort(descending=True).tolist()
    assert by_rows == mass.argsort(descending=True).tolist()
    assert len(set(plan.head_len[0].tolist())) == 4, "every head a different count"


def test_no_dropped_candidate_outscores_a_won_one_in_any_head():
    inputs = layer_inputs([64, 45, 30], n=64, heads=8, kv_heads=4, seed=5)
    window, floor = 8, 0.2
    method = AdaKV(budget=0.4, window=window, floor=floor)
    plan, scores = method.plan(inputs), method.scores(inputs)
    for b in range(3):
        real, n = int(inputs.real_len[b]), inputs.prompt_len
        candidates = range(n - real, n - min(window, real))
        floor_count = math.floor(floor * even_share(inputs, b, window, 0.4))
        won, dropped = [], []
        for head in range(4):
            kept = set(head_rows(plan, b, head))
            by_score = sorted(candidates, key=lambda p: (-float(scores[b, head, p]), p))
            won += [float(scores[b, head, p]) for p in by_score[floor_count:] if p in kept]
            dropped += [float(scores[b, head, p]) for p in by_score if p not in kept]
        assert won and dropped, "the test needs both"
        assert max(dropped) <= min(won), f"sequence {b}"


def test_the_per_head_cut_is_padded_and_masked_in_the_cache():
    inputs = layer_inputs([64, 50], n=64, heads=4, kv_heads=2)
    method = AdaKV(budget=0.5)
    value = torch.randn_like(inputs.key)
    plan = method.plan(inputs)
    layer = compress_layer(method, inputs, value)
    assert layer.keys.shape[2] == int(plan.keep_len.max())
    assert torch.equal(layer.prompt_valid.sum(-1), plan.head_len)
    assert torch.equal(layer.held_per_sequence(), plan.keep_len), "memory holds the largest head's rows"
    assert torch.allclose(layer.kept_per_sequence(), SnapKV(budget=0.5).plan(inputs).keep_len.double())


def test_it_is_listed_as_a_fixed_budget_method_with_its_defaults():
    assert refreekv.methods()["adakv"] == {
        "budget": 0.5, "window": 8, "kernel": 7, "pooling": "max", "floor": 0.2, "protected_layers": (),
    }  # fmt: skip
    assert "adakv" in fixed_budget_methods()


BAD = [
    ({"floor": 1.5}, ValueError, r"^floor must be in \[0, 1\] .*, got 1.5$"),
    ({"floor": -0.1}, ValueError, r"^floor must be a number >= 0, got -0.1$"),
    ({"floor": float("nan")}, ValueError, r"^floor must be a number >= 0, got nan$"),
    ({"floor": "0.2"}, TypeError, r"^floor must be a number >= 0, got '0.2' of type str$"),
    ({"budget": 1.5}, ValueError, r"^budget as a fraction of the prompt must be in \(0, 1\], got 1.5$"),
    ({"budget": 0}, ValueError, r"^budget as a token count must be >= 1, got 0$"),
]


@pytest.mark.parametrize("options,error,message", BAD, ids=[f"{k}={v!r}" for (o, *_) in BAD for k, v in o.items()])
def test_bad_options_say_what_they_take_and_got(options, error, message):
    with pytest.raises(error, match=message):
        AdaKV(**options)


# -- end to end on a tiny model (GQA: 4 query heads, 2 KV heads) -----------------


@pytest.fixture(scope="module")
def model(one_thread):
    return tiny_model("llama", "sdpa")


def test_eviction_equals_masking_and_the_first_token_never_changes(model, batch):
    with refreekv.patch(model, "adakv", budget=0.4) as evicting:
        tokens, logits = greedy(model, *batch)
    with refreekv.patch(model, "adakv", budget=0.4, evict=False) as masking:
        masked_tokens, masked_logits = greedy(model, *batch)
    with refreekv.patch(model, "snapkv", budget=0.4) as snapkv:
        greedy(model, *batch, new_tokens=1)
    unpatched_tokens, unpatched_logits = greedy(model, *batch, new_tokens=1)
    assert torch.equal(tokens, masked_tokens)
    assert (logits - masked_logits).abs().max() <= 2 * float32_logit_error(model, batch, new_tokens=6)
    assert torch.equal(evicting.stats.kept, masking.stats.kept)
    assert torch.equal(evicting.stats.kept, snapkv.stats.kept), "SnapKV's rows per layer and sequence, on average"
    assert torch.equal(tokens[:, 0], unpatched_tokens[:, 0])
    assert torch.equal(logits[:, 0], unpatched_logits[:, 0]), "prefill must attend over the full prompt"


def test_batching_is_transparent(model, batch):
    assert_batch_equals_each_alone(model, batch, "adakv", {"budget": 0.4})


def test_decode_time_cuts_are_refused(model):
    with pytest.raises(ValueError, match=r"recompress_every is not available for this method: adakv cuts each KV head"):
        refreekv.patch(model, "adakv", recompress_every=8, max_cache_tokens=64)
    assert getattr(model, "_refreekv_handle", None) is None
