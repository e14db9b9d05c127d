"""Coverage (docs/coverage.md) on hand-made layer inputs, against its
definition computed here with the plain PyTorch references."""

import pytest
import torch

from refreekv import reference
from refreekv.compression import Coverage, LayerInputs
from refreekv.integration.cache import compress_layer

from test_compression import kept_positions, layer_inputs


def with_values(inputs: LayerInputs, seed=1, dim=8) -> LayerInputs:
    generator = torch.Generator().manual_seed(seed)
    batch, kv_heads, n, _ = inputs.key.shape
    fields = {name: getattr(inputs, name) for name in inputs.__dataclass_fields__}
    return LayerInputs(**{**fields, "value": torch.randn(batch, kv_heads, n, dim, generator=generator)})


def signal_of(inputs, window, kernel):
    """The method's signal: visible-row averaged attention of the last
    `window` rows, group mean, max-pooled, zero on padding."""
    rows = min(window, inputs.prompt_len)
    signal = reference.attention_importance(
        inputs.query[:, :, -rows:], inputs.key, inputs.scaling, kv_valid=inputs.prompt_valid, group_reduce="mean"
    )
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
    method = Coverage(tolerance=0.1, ranking="score", window=window, kernel=kernel, num_sinks=3)
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
    plan = Coverage(tolerance=0.2, ranking="position", granularity="layer", window=4, kernel=1).plan(inputs)
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
    plan = Coverage(tolerance=0.05, stop="norm", ranking="score", window=1, kernel=1).plan(inputs)
    signal = signal_of(inputs, 1, 1)
    forced, candidates = forced_and_candidates(inputs, 0, 4, 1)
    for head in range(2):
        ranked = signal[0, head, candidates].sort(descending=True).values
        count = int(reference.adaptive_keep_count(ranked[None, None], 0.05)[0])
        assert plan.head_len[0, head] == len(forced) + count


def test_output_rule_bounds_the_dropped_share_of_the_output():
    inputs = with_values(layer_inputs([40, 29], n=40))
    tolerance = 0.1
    plan = Coverage(tolerance=tolerance, stop="output", ranking="score", window=4, kernel=1).plan(inputs)
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


def test_defaults_are_the_studys_choice():
    """docs/coverage.md: mass rule, positional ranking, a budget per KV head,
    the last 32 queries max-pooled with kernel 7, 4 sinks, delta = 5%."""
    method = Coverage()
    assert method.options() == {
        "tolerance": 0.05, "stop": "mass", "ranking": "position", "granularity": "head", "window": 32, "kernel": 7,
        "num_sinks": 4, "protected_layers": (),
    }  # fmt: skip


def test_default_positional_cut_keeps_the_newest_per_head():
    inputs = layer_inputs([90, 70], n=90)
    plan = Coverage().plan(inputs)
    signal = signal_of(inputs, 32, 7).double()
    for b in range(2):
        forced, candidates = forced_and_candidates(inputs, b, 4, 32)
        newest_first = candidates[::-1]
        for head in range(2):
            count = mass_count([float(signal[b, head, p]) for p in newest_first], 0.05)
            assert kept_positions(plan, b, head)[: int(plan.head_len[b, head])] == sorted(forced + newest_first[:count])


def test_per_head_cut_is_padded_and_masked_in_the_cache():
    inputs = layer_inputs([64, 50], n=64, heads=4, kv_heads=2)
    method = Coverage(tolerance=0.3, ranking="score")
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
]


@pytest.mark.parametrize("options,message", BAD)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        Coverage(**options)
