"""Coverage (docs/coverage.md) on hand-made layer inputs, against its
definition computed here with the plain PyTorch references."""

import pytest
import torch

from refreekv import reference
from refreekv.compression import Coverage, LayerInputs
from refreekv.compression.coverage import expected_attention
from refreekv.integration.cache import compress_layer

from test_compression import kept_positions, layer_inputs


def with_values(inputs: LayerInputs, seed=1, dim=8) -> LayerInputs:
    generator = torch.Generator().manual_seed(seed)
    batch, kv_heads, n, _ = inputs.key.shape
    fields = {name: getattr(inputs, name) for name in inputs.__dataclass_fields__}
    return LayerInputs(**{**fields, "value": torch.randn(batch, kv_heads, n, dim, generator=generator)})


def signal_of(inputs, window, kernel, weight=None):
    """The method's signal: visible-row averaged attention of the last
    `window` rows, group mean, times `weight` [b, Hkv, n] where given,
    max-pooled, zero on padding."""
    rows = min(window, inputs.prompt_len)
    signal = reference.attention_importance(
        inputs.query[:, :, -rows:], inputs.key, inputs.scaling, kv_valid=inputs.prompt_valid, group_reduce="mean"
    )
    if weight is not None:
        signal = signal * weight
    if kernel > 1:
        signal = torch.nn.functional.max_pool1d(signal, kernel, stride=1, padding=kernel // 2)
    return signal.masked_fill(~inputs.prompt_valid[:, None, :], 0.0)


def forced_and_candidates(inputs, b, num_sinks, window):
    n, real = inputs.prompt_len, int(inputs.real_len[b])
    first = n - real
    sinks = list(range(first, first + min(num_sinks, real)))
    recent = list(range(max(n - min(window, real - len(sinks)), first + len(sinks)), n))
    candidates = [p for p in range(first, n) if p not in sinks and p not in recent]
    return sinks + recent, candidates


def mass_count(masses, tolerance):
    """Smallest r >= 1 whose dropped rest is within tolerance of the total."""
    total = sum(masses)
    if not masses:
        return 0
    if total == 0:
        return len(masses)
    for r in range(1, len(masses) + 1):
        if sum(masses[r:]) <= tolerance * total:
            return r
    return len(masses)


@pytest.mark.parametrize("window,kernel", [(8, 7), (1, 1), (5, 3)])
def test_mass_rule_per_head_by_score(window, kernel):
    inputs = layer_inputs([60, 41], n=60, heads=6, kv_heads=2)
    method = Coverage(tolerance=0.1, allocation="layer", ranking="score", window=window, kernel=kernel, num_sinks=3)
    plan = method.plan(inputs)
    signal = signal_of(inputs, window, kernel).double()
    assert plan.head_len is not None and plan.head_len.shape == (2, 2)
    for b in range(2):
        forced, candidates = forced_and_candidates(inputs, b, 3, window)
        for head in range(2):
            scores = {p: float(signal[b, head, p]) for p in candidates}
            ranked = sorted(candidates, key=lambda p: -scores[p])
            count = mass_count([scores[p] for p in ranked], 0.1)
            expected = sorted(forced + ranked[:count])
            assert plan.head_len[b, head] == len(expected)
            assert plan.keep_index[b, head, : len(expected)].tolist() == expected
        assert plan.keep_len[b] == plan.head_len[b].max()


def test_position_ranking_at_layer_granularity_keeps_sinks_and_the_newest():
    inputs = layer_inputs([50, 37], n=50)
    plan = Coverage(tolerance=0.2, allocation="layer", ranking="position", granularity="layer", window=4, kernel=1).plan(inputs)
    signal = signal_of(inputs, 4, 1).double()
    assert plan.head_len is None
    for b in range(2):
        forced, candidates = forced_and_candidates(inputs, b, 4, 4)
        newest_first = candidates[::-1]
        count = max(mass_count([float(signal[b, h, p]) for p in newest_first], 0.2) for h in range(2))
        expected = sorted(forced + newest_first[:count])
        for head in range(2):
            assert kept_positions(plan, b, head) == expected


def test_norm_rule_is_the_papers_ratio_per_head():
    inputs = layer_inputs([45], n=45)
    plan = Coverage(tolerance=0.05, allocation="layer", stop="norm", ranking="score", window=1, kernel=1).plan(inputs)
    signal = signal_of(inputs, 1, 1)
    forced, candidates = forced_and_candidates(inputs, 0, 4, 1)
    for head in range(2):
        ranked = signal[0, head, candidates].sort(descending=True).values
        count = int(reference.adaptive_keep_count(ranked[None, None], 0.05)[0])
        assert plan.head_len[0, head] == len(forced) + count


def test_output_rule_bounds_the_dropped_share_of_the_output():
    inputs = with_values(layer_inputs([40, 29], n=40))
    tolerance = 0.1
    plan = Coverage(tolerance=tolerance, allocation="layer", stop="output", ranking="score", window=4, kernel=1).plan(inputs)
    signal = signal_of(inputs, 4, 1).double()
    value = inputs.value.double()
    for b in range(2):
        forced, candidates = forced_and_candidates(inputs, b, 4, 4)
        for head in range(2):
            p = signal[b, head] / signal[b, head].sum()
            output = (p[:, None] * value[b, head]).sum(0).norm()
            ranked = sorted(candidates, key=lambda q: -float(signal[b, head, q]))
            dropped = [(p[ranked[r:], None] * value[b, head, ranked[r:]]).sum(0).norm() for r in range(1, len(ranked) + 1)]
            count = next(r for r, error in enumerate(dropped, start=1) if error <= tolerance * output)
            assert plan.head_len[b, head] == len(forced) + count


def test_output_rule_needs_values():
    with pytest.raises(ValueError, match=r"stop='output' needs the layer's values"):
        Coverage(stop="output").plan(layer_inputs([20]))


def test_zero_tolerance_keeps_every_real_token():
    inputs = layer_inputs([33, 20], n=33)
    for stop in ("mass", "norm"):
        plan = Coverage(tolerance=0.0, stop=stop).plan(inputs)
        assert plan.keeps_everything(inputs.real_len)


def test_defaults_are_the_studies_choice():
    """docs/coverage.md: mass rule, positional ranking, a budget per KV head,
    the last 32 queries' attention max-pooled with kernel 7, 4 sinks (C.8),
    delta = 60% for the whole model, compounded over the layers, no floor
    per head (C.9)."""
    method = Coverage()
    assert method.options() == {
        "tolerance": 0.6, "stop": "mass", "ranking": "position", "granularity": "head", "signal": "attention",
        "allocation": "model", "head_floor": 0.0, "window": 32, "kernel": 7, "num_sinks": 4, "protected_layers": (),
    }  # fmt: skip


def expected_attention_reference(inputs, rows):
    """C.2's expected attention, key by key in float64: the Gaussian's
    moment generating function at s * k, normalized over the real keys."""
    batch, heads, _, _ = inputs.query.shape
    kv_heads, n = inputs.key.shape[1], inputs.key.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, kv_heads, n, dtype=torch.float64)
    for b in range(batch):
        first = n - int(inputs.real_len[b])
        real_rows = [p for p in range(n - rows, n) if p >= first]
        for h in range(heads):
            q = inputs.query[b, h, real_rows].double()
            mean = q.mean(0)
            covariance = (q - mean).T @ (q - mean) / len(real_rows)
            k = inputs.key[b, h // group, first:].double()
            s = inputs.scaling
            weights = torch.exp(s * k @ mean + 0.5 * s**2 * ((k @ covariance) * k).sum(-1))
            out[b, h // group, first:] += weights / weights.sum() / group
    return out


@pytest.mark.parametrize("rows", [1, 6, 40])
def test_expected_attention_is_the_gaussian_expectation(rows):
    inputs = layer_inputs([40, 23], n=40, heads=6, kv_heads=2)
    expected = expected_attention(inputs, rows)
    truth = expected_attention_reference(inputs, min(rows, 40))
    # float32 against float64: softmax of logits of size ~|s q.k| (~10) in float32.
    assert torch.allclose(expected.double(), truth, rtol=1e-4, atol=1e-6)
    assert torch.allclose(expected.sum(-1), torch.ones(2, 2))
    assert (expected[1, :, : 40 - 23] == 0).all(), "padding keys get nothing"


def test_expected_attention_of_one_query_is_its_attention():
    """One row: no spread, so the expectation is that row's own attention
    over every key (a future query sees them all)."""
    inputs = layer_inputs([30], n=30)
    logits = torch.einsum("bhd,bhnd->bhn", inputs.query[:, :, -1], inputs.key.repeat_interleave(2, 1)) * inputs.scaling
    own = logits.softmax(-1).view(1, 2, 2, 30).mean(2)
    assert torch.allclose(expected_attention(inputs, 1), own, atol=1e-6)


def test_expected_attention_matches_sampled_queries():
    """Monte Carlo: the mean attention of queries drawn from the window's
    Gaussian approaches the closed form."""
    inputs = layer_inputs([24], n=24, heads=2, kv_heads=1, head_dim=4)
    inputs = LayerInputs(**{**{f: getattr(inputs, f) for f in inputs.__dataclass_fields__}, "query": inputs.query * 0.3})
    rows = 12
    q = inputs.query[0, :, -rows:].double()
    mean = q.mean(1, keepdim=True)
    covariance = (q - mean).transpose(1, 2) @ (q - mean) / rows
    generator = torch.Generator().manual_seed(3)
    draws = torch.distributions.MultivariateNormal(mean[:, 0], covariance + 1e-9 * torch.eye(4)).sample((200_000,))
    weights = torch.exp(inputs.scaling * torch.einsum("shd,nd->shn", draws, inputs.key[0, 0].double()))
    sampled = (weights.mean(0) / weights.mean(0).sum(-1, keepdim=True)).mean(0)
    del generator
    assert torch.allclose(expected_attention(inputs, rows)[0, 0].double(), sampled, rtol=0.02, atol=1e-4)


@pytest.mark.parametrize("ranking", ["score", "position"])
def test_value_signal_weighs_attention_by_the_value_norm(ranking):
    inputs = with_values(layer_inputs([60, 41], n=60, heads=6, kv_heads=2))
    plan = Coverage(tolerance=0.1, allocation="layer", signal="value", ranking=ranking, window=8, kernel=3).plan(inputs)
    signal = signal_of(inputs, 8, 3, weight=inputs.value.norm(dim=-1)).double()
    for b in range(2):
        forced, candidates = forced_and_candidates(inputs, b, 4, 8)
        for head in range(2):
            if ranking == "score":
                ranked = sorted(candidates, key=lambda p: -float(signal[b, head, p]))
            else:
                ranked = candidates[::-1]
            count = mass_count([float(signal[b, head, p]) for p in ranked], 0.1)
            assert plan.head_len[b, head] == len(forced) + count
            assert kept_positions(plan, b, head)[: int(plan.head_len[b, head])] == sorted(forced + ranked[:count])


def test_expected_signal_is_the_mean_of_window_and_expected_attention():
    inputs = layer_inputs([60, 41], n=60, heads=6, kv_heads=2)
    plan = Coverage(tolerance=0.1, allocation="layer", signal="expected", ranking="score", window=8, kernel=1).plan(inputs)
    signal = 0.5 * (signal_of(inputs, 8, 1).double() + expected_attention_reference(inputs, 8))
    for b in range(2):
        forced, candidates = forced_and_candidates(inputs, b, 4, 8)
        for head in range(2):
            ranked = sorted(candidates, key=lambda p: -float(signal[b, head, p]))
            count = mass_count([float(signal[b, head, p]) for p in ranked], 0.1)
            assert plan.head_len[b, head] == len(forced) + count


def test_value_signal_needs_values():
    with pytest.raises(ValueError, match=r"signal='value' needs the layer's values"):
        Coverage(signal="value").plan(layer_inputs([20]))


@pytest.mark.parametrize("protected", [(), (0, -1)])
def test_model_allocation_compounds_to_the_tolerance_and_grows_with_depth(protected):
    method = Coverage(tolerance=0.6, allocation="model", protected_layers=protected)
    layers = [i for i in range(12) if not method.is_protected(i, 12)]
    deltas = [method.layer_tolerance(i, 12) for i in layers]
    kept = 1.0
    for delta in deltas:
        kept *= 1 - delta
    assert kept == pytest.approx(0.4, rel=1e-12)
    assert deltas == sorted(deltas) and deltas[0] < deltas[-1]
    # rank r of L compressed layers gets share r / (L (L + 1) / 2) of the log-kept budget
    assert deltas[0] == pytest.approx(1 - 0.4 ** (2 / (len(layers) * (len(layers) + 1))))
    assert Coverage(tolerance=0.6, allocation="layer").layer_tolerance(5, 12) == 0.6


@pytest.mark.parametrize("layer_idx", [0, 3, 5])
def test_model_allocation_cuts_each_layer_at_its_share(layer_idx):
    inputs = layer_inputs([60, 41], n=60, layer_idx=layer_idx, num_layers=6)
    method = Coverage(tolerance=0.7, allocation="model", ranking="score", window=4)
    delta = method.layer_tolerance(layer_idx, 6)
    same = Coverage(tolerance=delta, allocation="layer", ranking="score", window=4).plan(inputs)
    plan = method.plan(inputs)
    assert torch.equal(plan.head_len, same.head_len) and torch.equal(plan.keep_index, same.keep_index)


@pytest.mark.parametrize("granularity", ["head", "layer"])
def test_head_floor_keeps_a_share_of_every_heads_candidates(granularity):
    inputs = layer_inputs([80, 51], n=80)
    options = dict(tolerance=0.5, allocation="layer", ranking="score", window=4, kernel=1, granularity=granularity)
    bare = Coverage(**{**options, "granularity": "head"}).plan(inputs)
    plan = Coverage(head_floor=0.4, **options).plan(inputs)
    bound = False
    for b in range(2):
        forced, candidates = forced_and_candidates(inputs, b, 4, 4)
        least = -(-len(candidates) * 4 // 10)  # ceil(0.4 * candidates)
        counts = [max(int(bare.head_len[b, h]) - len(forced), least) for h in range(2)]
        bound |= any(int(bare.head_len[b, h]) - len(forced) < least for h in range(2))
        if granularity == "layer":
            assert plan.head_len is None and int(plan.keep_len[b]) == len(forced) + max(counts)
        else:
            assert plan.head_len[b].tolist() == [len(forced) + c for c in counts]
    assert bound, "the test needs a head below the floor"


def test_default_positional_cut_keeps_the_newest_per_head():
    """At its defaults the layer's share of the model's tolerance (C.9)
    decides the count of each head, newest first."""
    inputs = layer_inputs([90, 70], n=90)
    method = Coverage()
    delta = method.layer_tolerance(inputs.layer_idx, inputs.num_layers)
    plan = method.plan(inputs)
    signal = signal_of(inputs, 32, 7).double()
    for b in range(2):
        forced, candidates = forced_and_candidates(inputs, b, 4, 32)
        newest_first = candidates[::-1]
        for head in range(2):
            count = mass_count([float(signal[b, head, p]) for p in newest_first], delta)
            assert kept_positions(plan, b, head)[: int(plan.head_len[b, head])] == sorted(forced + newest_first[:count])


def test_per_head_cut_is_padded_and_masked_in_the_cache():
    inputs = layer_inputs([64, 50], n=64, heads=4, kv_heads=2)
    method = Coverage(tolerance=0.3, allocation="layer", ranking="score")
    value = torch.randn_like(inputs.key)
    plan = method.plan(inputs)
    assert not torch.equal(plan.head_len[:, 0], plan.head_len[:, 1]), "the test needs heads that differ"
    layer = compress_layer(method, inputs, value)
    assert layer.keys.shape[2] == int(plan.keep_len.max())
    assert torch.equal(layer.prompt_valid.sum(-1), plan.head_len)
    assert torch.allclose(layer.kept_per_sequence(), plan.head_len.double().mean(1))
    assert torch.equal(layer.held_per_sequence(), plan.keep_len), "memory holds the largest head's rows"
    masked = compress_layer(method, inputs, value, evict=False)
    assert torch.equal(masked.prompt_valid.sum(-1), plan.head_len)


BAD = [
    ({"tolerance": 1.0}, r"tolerance must be in \[0, 1\), got 1.0"),
    ({"tolerance": -0.1}, r"tolerance must be in \[0, 1\), got -0.1"),
    ({"stop": "l3"}, r"stop must be one of 'mass', 'norm', 'output'; got 'l3'"),
    ({"ranking": "random"}, r"ranking must be 'score' or 'position', got 'random'"),
    ({"granularity": "token"}, r"granularity must be 'head' or 'layer', got 'token'"),
    ({"window": 0}, r"window must be an integer >= 1, got 0"),
    ({"kernel": 2}, r"kernel must be an odd integer >= 1, got 2"),
    ({"num_sinks": -1}, r"num_sinks must be an integer >= 0, got -1"),
    ({"signal": "keys"}, r"signal must be one of 'attention', 'value', 'expected'; got 'keys'"),
    ({"allocation": "head"}, r"allocation must be 'layer' or 'model', got 'head'"),
    ({"head_floor": 1.0}, r"head_floor must be in \[0, 1\), got 1.0"),
    ({"head_floor": -0.2}, r"head_floor must be in \[0, 1\), got -0.2"),
    ({"head_floor": float("nan")}, r"head_floor must be in \[0, 1\), got nan"),
]


@pytest.mark.parametrize("options,message", BAD)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        Coverage(**options)
