"""The golden properties (SPEC 5) on a tiny random model of every verified
family, in every attention implementation the family supports, float32.

Each family's config puts its attention variant in play (see
`integration_models.ALL_FAMILIES`): sliding-window layers shorter than the
prompts, linear-attention layers, soft-capping, learned sinks, KV sharing,
scales other than 1/sqrt(d). tests/test_integration_patch.py runs every
method on the four original families; here a few methods cover each family.
"""

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicSlidingWindowLayer

import refreekv
from refreekv.compression import CompressionMethod, LayerInputs
from refreekv.integration import compat
from refreekv.integration.cache import CompressedLayer
from refreekv.integration.stats import kv_memory

from integration_models import ALL_FAMILIES, assert_batch_equals_each_alone, float32_logit_error, greedy, prompts, tiny_model
from test_integration_paged import compare_storages

CASES = [(family, attention) for family, spec in ALL_FAMILIES.items() for attention in spec[3]]

# Methods that cut differently: by position and a stopping rule, by scores
# with a fixed budget, by attention mass per head.
METHODS = {
    "refreekv": ("refreekv", {"threshold": 0.05}),
    "snapkv": ("snapkv", {"budget": 0.4}),
    "coverage": ("coverage", {"tolerance": 0.2, "allocation": "layer"}),
}


@pytest.fixture(scope="module", params=CASES, ids=lambda case: f"{case[0]}-{case[1]}")
def family_attention(request):
    return request.param


@pytest.fixture(scope="module")
def model(family_attention):
    return tiny_model(*family_attention)


@pytest.fixture(scope="module")
def unpatched(model, batch):
    return greedy(model, *batch)


@pytest.fixture(scope="module")
def float32_error(model, batch):
    return float32_logit_error(model, batch, new_tokens=6)


def test_the_layout_follows_the_config(model, batch):
    config = model.config
    layer_types = getattr(config, "layer_types", None) or [compat.FULL] * config.num_hidden_layers
    shared_from = config.num_hidden_layers - (getattr(config, "num_kv_shared_layers", 0) or 0)
    with refreekv.patch(model, "snapkv", budget=0.5) as kv:
        greedy(model, *batch, new_tokens=1)
    assert kv.layout.kinds == tuple(layer_types)
    own_full = tuple(i for i, kind in enumerate(layer_types) if kind == compat.FULL and i < shared_from)
    assert kv.stats.layers == own_full and len(own_full) > 0


def test_every_verified_family_is_tested_here():
    tested = {getattr(transformers, config_name).model_type for config_name, *_ in ALL_FAMILIES.values()}
    assert tested == set(compat.VERIFIED_FAMILIES)


def test_protected_layers_count_in_the_models_own_numbering(model, batch):
    input_ids, attention_mask = batch
    last = max(compat.check_supported(model).full_layers)
    with refreekv.patch(model, "snapkv", budget=0.5, protected_layers=[last]) as kv:
        greedy(model, input_ids, attention_mask, new_tokens=1)
    real_len = attention_mask.sum(-1).double()
    for row, index in enumerate(kv.stats.layers):
        assert torch.equal(kv.stats.kept[row], real_len) == (index == last), f"layer {index}"


@pytest.mark.parametrize("case", METHODS)
def test_eviction_equals_masking_and_the_first_token_never_changes(model, batch, unpatched, float32_error, case):
    method, options = METHODS[case]
    with refreekv.patch(model, method, **options) as evicting:
        tokens, logits = greedy(model, *batch)
    with refreekv.patch(model, method, evict=False, **options) as masking:
        masked_tokens, masked_logits = greedy(model, *batch)
    assert torch.equal(tokens, masked_tokens)
    # The two runs sum over different key counts, so in different orders:
    # they may differ by float32's own error on this model and batch.
    assert (logits - masked_logits).abs().max() <= 2 * float32_error
    assert torch.equal(evicting.stats.kept, masking.stats.kept)
    assert evicting.stats.budget < 1.0, "the test should evict something"
    assert torch.equal(tokens[:, 0], unpatched[0][:, 0])
    assert torch.equal(logits[:, 0], unpatched[1][:, 0]), "prefill must attend over the full prompt"


@pytest.mark.parametrize("case", ["coverage", "snapkv"])
def test_paged_storage_equals_padded(model, batch, float32_error, case):
    method, options = METHODS[case]
    padded, paged = compare_storages(model, batch, method, options, float32_error, new_tokens=6)
    assert torch.equal(paged.stats.kept, padded.stats.kept)
    assert paged.stats.budget < 1.0, "the test should evict something"


# Paged storage holds nothing when nothing is cut: the layers stay transformers' own.
@pytest.mark.parametrize(
    "method,options",
    [("refreekv", {"threshold": 0.0}), ("fullkv", {}), ("refreekv", {"threshold": 0.0, "storage": "paged"}), ("fullkv", {"storage": "paged"})],
)
def test_lossless_settings_are_identical_to_the_unpatched_model(model, batch, unpatched, method, options):
    with refreekv.patch(model, method, **options) as kv:
        tokens, logits = greedy(model, *batch)
    assert torch.equal(tokens, unpatched[0])
    assert torch.equal(logits, unpatched[1])
    assert kv.stats.budget == 1.0


@pytest.mark.parametrize("case", ["refreekv", "snapkv"])
def test_a_left_padded_batch_equals_each_sequence_alone(model, batch, case):
    assert_batch_equals_each_alone(model, batch, *METHODS[case])


def test_stats_match_the_cache_held_and_other_layers_are_untouched(model, batch):
    input_ids, attention_mask = batch
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True).past_key_values
        with refreekv.patch(model, "snapkv", budget=0.5, protected_layers=()) as kv:
            cache = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True).past_key_values
    real_len = attention_mask.sum(-1)
    assert torch.equal(kv.stats.prompt_tokens, real_len)
    assert kv.stats.kv_bytes_before == sum(plain.layers[i].keys.nbytes + plain.layers[i].values.nbytes for i in kv.stats.layers)
    assert kv.stats.kv_bytes_after == sum(cache.layers[i].keys.nbytes + cache.layers[i].values.nbytes for i in kv.stats.layers)
    counted = kv_memory(cache, kv.stats.layers)
    assert (counted.in_use_bytes, counted.allocated_bytes) == (kv.stats.kv_bytes_after, kv.stats.kv_bytes_allocated)
    assert kv_memory(cache).layers == kv_memory(plain).layers, "every layer that holds keys, compressed or not"
    for row, index in enumerate(kv.stats.layers):
        layer = cache.layers[index]
        assert isinstance(layer, CompressedLayer)
        assert torch.equal(kv.stats.kept[row], torch.round(real_len * 0.5).double())
        assert layer.keys.shape[2] == int(kv.stats.kept[row].max())
        assert layer.keys.shape[1] == plain.layers[index].keys.shape[1], "GQA caches stay at Hkv heads"
    for index, kind in enumerate(kv.layout.kinds[: len(cache.layers)]):
        if index in kv.stats.layers:
            continue
        assert type(cache.layers[index]) is type(plain.layers[index])
        if kind == compat.SLIDING:
            assert isinstance(cache.layers[index], DynamicSlidingWindowLayer)
            assert torch.equal(cache.layers[index].keys, plain.layers[index].keys)
            assert torch.equal(cache.layers[index].values, plain.layers[index].values)
        else:  # linear attention: the recurrent and convolution states
            for state in ("recurrent_states", "conv_states"):
                for ours, theirs in zip(getattr(cache.layers[index], state).values(), getattr(plain.layers[index], state).values()):
                    assert torch.equal(ours, theirs)


class _Record(CompressionMethod):
    """Keeps everything and records what each compressed layer is handed."""

    name = "record"

    def __init__(self):
        super().__init__(protected_layers=())
        self.inputs: dict[int, LayerInputs] = {}

    def plan(self, inputs: LayerInputs) -> None:
        self.inputs[inputs.layer_idx] = inputs
        return None


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_signal_is_the_models_own_attention(family, batch):
    """The last prompt row of the importance signal equals the family's own
    eager attention weights (scale, soft-capping, sinks, QK norms, partial
    rotary, GQA layout), layer by layer."""
    model = tiny_model(family, "eager")
    input_ids, attention_mask = batch
    record = _Record()
    with torch.no_grad():
        attentions = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True).attentions
        with refreekv.patch(model, record):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    layout = compat.check_supported(model)
    assert sorted(record.inputs) == list(layout.full_layers)
    # Linear-attention layers return no attention weights.
    attention_layers = [index for index, kind in enumerate(layout.kinds) if kind != compat.LINEAR]
    for index, inputs in record.inputs.items():
        theirs = attentions[attention_layers.index(index)][:, :, -1, :]  # [b, H, n]: the last prompt row
        torch.testing.assert_close(inputs.importance(1), theirs, msg=f"layer {index}")
        if inputs.softcap is not None or inputs.sinks is not None:
            plain = refreekv.attention_importance(inputs.query[:, :, -1:], inputs.key, inputs.scaling, kv_valid=inputs.prompt_valid)
            assert (plain - theirs).abs().max() > 1e-3, "the variant must matter for this test to prove anything"


def test_each_variant_is_read_where_the_model_applies_it(family_attention, model):
    """Soft-capping counts only where the attention function applies it
    (transformers' sdpa ignores it); sinks come with GPT-OSS."""
    family, attention = family_attention
    record = _Record()
    input_ids, attention_mask = prompts([20])
    with torch.no_grad(), refreekv.patch(model, record):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    softcaps = {inputs.softcap for inputs in record.inputs.values()}
    sinks = {inputs.sinks is not None for inputs in record.inputs.values()}
    capped = family == "gemma2" and attention == "eager"
    assert softcaps == ({model.config.attn_logit_softcapping} if capped else {None})
    assert sinks == {family == "gpt_oss"}
