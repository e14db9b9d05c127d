"""refreekv.patch on tiny random models of every supported family, with eager
and sdpa attention, in float32 (SPEC 5)."""

import pytest
import torch

import refreekv
from refreekv import reference
from refreekv.integration.cache import CompressedLayer

from integration_models import ATTENTION, FAMILIES, assert_batch_equals_each_alone, float32_logit_error, greedy, greedy_loop, prompts, tiny_model

METHODS = {
    "refreekv": {},
    "refreekv-attention-ranking": {"method": "refreekv", "ranking": "attention", "threshold": 0.05},
    "refreekv-sinks-in-norm": {"method": "refreekv", "include_sinks_in_norm": True, "window_rows": 4},
    "coverage": {},  # the defaults: one tolerance for the whole model
    "coverage-layer-position": {"method": "coverage", "ranking": "position", "granularity": "layer", "tolerance": 0.3, "allocation": "layer"},
    "coverage-output": {"method": "coverage", "stop": "output", "tolerance": 0.2, "allocation": "layer"},
    "coverage-value-model": {"method": "coverage", "signal": "value", "allocation": "model", "tolerance": 0.6},
    "coverage-expected-floor": {"method": "coverage", "signal": "expected", "head_floor": 0.2, "tolerance": 0.3, "allocation": "layer"},
    "fullkv": {},
    "streamingllm": {"budget": 0.5},
    "h2o-window": {"method": "h2o", "budget": 0.5},
    "h2o-all": {"method": "h2o", "budget": 20, "observation": "all"},
    "snapkv": {"budget": 0.4},
    "pyramidkv": {"budget": 0.5},
}


def method_args(case):
    options = dict(METHODS[case])
    return options.pop("method", case), options


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ATTENTION], ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    family, attention = request.param
    return tiny_model(family, attention)


@pytest.fixture(scope="module")
def unpatched(model, batch):
    return greedy(model, *batch)


@pytest.fixture(scope="module")
def float32_error(model, batch):
    return float32_logit_error(model, batch, new_tokens=6)


@pytest.mark.parametrize("case", METHODS)
def test_eviction_equals_masking(model, batch, float32_error, case):
    method, options = method_args(case)
    with refreekv.patch(model, method, **options) as evicting:
        tokens, logits = greedy(model, *batch)
    with refreekv.patch(model, method, evict=False, **options) as masking:
        masked_tokens, masked_logits = greedy(model, *batch)
    assert torch.equal(tokens, masked_tokens)
    # Two float32 runs over differently laid out rows (held vs masked) differ
    # by float32 rounding: judged against the unpatched model's own float32
    # error (flash-attention's rule), as in tests/test_integration_families.py.
    assert (logits - masked_logits).abs().max() <= 2 * float32_error
    assert torch.equal(evicting.stats.kept, masking.stats.kept)
    if case not in ("fullkv",):
        assert evicting.stats.budget < 1.0, "the test should evict something"


@pytest.mark.parametrize("case", METHODS)
def test_first_token_never_changes(model, batch, unpatched, case):
    method, options = method_args(case)
    with refreekv.patch(model, method, **options):
        tokens, logits = greedy(model, *batch, new_tokens=1)
    assert torch.equal(tokens[:, 0], unpatched[0][:, 0])
    assert torch.equal(logits[:, 0], unpatched[1][:, 0]), "prefill must attend over the full prompt"


@pytest.mark.parametrize("method,options", [("refreekv", {"threshold": 0.0}), ("coverage", {"tolerance": 0.0}), ("fullkv", {})])
def test_lossless_settings_are_identical_to_the_unpatched_model(model, batch, unpatched, method, options):
    with refreekv.patch(model, method, **options) as kv:
        tokens, logits = greedy(model, *batch)
    assert torch.equal(tokens, unpatched[0])
    assert torch.equal(logits, unpatched[1])
    assert kv.stats.budget == 1.0


def test_patch_remove_round_trip_is_bitwise(model, batch, unpatched):
    handle = refreekv.patch(model, "snapkv", budget=0.3)
    greedy(model, *batch)
    handle.remove()
    handle.remove()  # a second removal does nothing
    tokens, logits = greedy(model, *batch)
    assert torch.equal(tokens, unpatched[0]) and torch.equal(logits, unpatched[1])


@pytest.mark.parametrize(
    "case", ["refreekv", "coverage", "coverage-output", "coverage-value-model", "coverage-expected-floor", "snapkv", "streamingllm"]
)
def test_batching_is_transparent(model, batch, case):
    assert_batch_equals_each_alone(model, batch, *method_args(case))


def test_keep_counts_follow_the_stopping_rule(model, batch):
    """ReFreeKV's counts equal SPEC 2.3 evaluated on the last prompt row of
    the unpatched model's own attention weights."""
    input_ids, attention_mask = batch
    eager = tiny_model(model.config.model_type, "eager")
    with torch.no_grad():
        attentions = eager(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True).attentions
    real_len = attention_mask.sum(-1)
    sinks = 4
    with refreekv.patch(model, threshold=0.01) as kv:
        greedy(model, input_ids, attention_mask, new_tokens=1)
    for layer, weights in enumerate(attentions):
        if layer in (0, 1):
            assert torch.equal(kv.stats.kept[layer], real_len)
            continue
        newest_first = weights[:, :, -1, :].flip(-1)  # [b, H, n]
        recent = reference.adaptive_keep_count(newest_first, 0.01, valid_len=real_len - sinks)
        assert torch.equal(kv.stats.kept[layer], (recent + sinks).double()), f"layer {layer}"


def test_stats_match_the_cache_held(model, batch):
    input_ids, attention_mask = batch
    with refreekv.patch(model, "snapkv", budget=0.5) as kv:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    cache = out.past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert kv.stats.kv_bytes_after == held
    full_rows = input_ids.shape[1] * len(cache.layers)
    row_bytes = kv.stats.kv_bytes_before // (full_rows * input_ids.shape[0])
    assert kv.stats.kv_bytes_before == row_bytes * full_rows * input_ids.shape[0]
    real_len = attention_mask.sum(-1)
    assert torch.equal(kv.stats.prompt_tokens, real_len)
    for layer_idx, layer in enumerate(cache.layers):
        assert isinstance(layer, CompressedLayer)
        assert torch.equal(kv.stats.kept[layer_idx], torch.round(real_len * 0.5).double())
        assert layer.keys.shape[1] == model.config.num_key_value_heads, "GQA caches stay at Hkv heads"
        assert layer.keys.shape[2] == int(kv.stats.kept[layer_idx].max())
    # Only end-padding of shorter sequences is held beyond what is kept.
    kept_bytes = int(kv.stats.kept.sum()) * row_bytes
    assert kv.stats.kv_bytes_after == kept_bytes + kv.stats.kv_padding_bytes
    assert abs(kv.stats.budget - 0.5) < 0.01
    assert torch.equal(kv.stats.held, kv.stats.kept), "every head keeps as many rows"
    assert not kv.stats.rounding.any(), "padded storage rounds nothing"


def test_hand_written_loop_matches_generate(model, batch):
    input_ids, attention_mask = batch
    row = 0
    prompt = input_ids[row : row + 1, attention_mask[row].bool()]
    with refreekv.patch(model, "streamingllm", budget=0.5):
        expected, _ = greedy(model, prompt, torch.ones_like(prompt))
        assert torch.equal(greedy_loop(model, prompt, expected.shape[1]), expected)


def test_masking_path_against_a_plain_4d_mask(model):
    """With the same positions evicted in every layer (StreamingLLM, no
    protected layer), decoding with the compressed cache equals the
    unpatched model decoding over the full cache with a hand-made mask."""
    input_ids, _ = prompts([48])
    n, keep_recent, steps = 48, 20, 4
    evicted = torch.ones(n, dtype=torch.bool)
    evicted[:4] = False
    evicted[n - keep_recent :] = False
    with refreekv.patch(model, "streamingllm", budget=24):
        expected, expected_logits = greedy(model, input_ids, torch.ones_like(input_ids), new_tokens=steps)
    dtype = torch.float32
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True)
        cache, token, logits = out.past_key_values, out.logits[:, -1:].argmax(-1), [out.logits[:, -1]]
        tokens = [token]
        for step in range(1, steps):
            visible = torch.cat([~evicted, torch.ones(step, dtype=torch.bool)])
            if model.config._attn_implementation == "eager":
                mask = torch.zeros(1, 1, 1, n + step, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
            else:
                mask = visible[None, None, None, :]
            out = model(
                input_ids=token,
                past_key_values=cache,
                attention_mask=mask,
                position_ids=torch.tensor([[n + step - 1]]),
                use_cache=True,
            )
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            logits.append(out.logits[:, -1])
    assert torch.equal(torch.cat(tokens, dim=1), expected)
    torch.testing.assert_close(torch.stack(logits, dim=1), expected_logits)


def test_sampling_works_and_eviction_equals_masking(model, batch):
    def sample():
        torch.manual_seed(11)
        return model.generate(*batch[:1], attention_mask=batch[1], max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)

    with refreekv.patch(model, "refreekv", threshold=0.05):
        evicted = sample()
    with refreekv.patch(model, "refreekv", threshold=0.05, evict=False):
        masked = sample()
    assert torch.equal(evicted, masked)


def test_compression_happens_on_prefill_only_and_each_call_starts_fresh(model, batch):
    input_ids, attention_mask = batch
    with refreekv.patch(model, "streamingllm", budget=0.5) as kv:
        greedy(model, input_ids, attention_mask)
        first = kv.stats
        greedy(model, input_ids[:1], attention_mask[:1])
        assert kv.stats is not first and kv.stats.kept.shape == (model.config.num_hidden_layers, 1)
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        rows = [layer.keys.shape[2] for layer in out.past_key_values.layers]
        step_mask = torch.cat([attention_mask, torch.ones(3, 1, dtype=attention_mask.dtype)], dim=1)
        out = model(input_ids=input_ids[:, -1:], attention_mask=step_mask, past_key_values=out.past_key_values, use_cache=True)
        assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [r + 1 for r in rows]


@pytest.mark.parametrize("groups", [1, 3])
def test_masked_sdpa_shares_kv_heads_with_the_same_result(groups):
    """Decoding a compressed cache always passes a mask; refreekv then lets
    SDPA share each KV head with its query group instead of repeating the
    heads as transformers does. The output is the same, bit for bit."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from refreekv.integration.compat import masked_sdpa_attention

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(5, 3 * groups, 2, 16, generator=generator)
    key, value = (torch.randn(5, 3, 70, 16, generator=generator) for _ in range(2))
    mask = torch.rand(5, 1, 2, 70, generator=generator) > 0.3
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = groups, True, False
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3, dropout=0.0)
    output, weights = masked_sdpa_attention(module, query, key, value, mask, scaling=0.3, dropout=0.0)
    assert weights is None and torch.equal(output, expected)
