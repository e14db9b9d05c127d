"""One prefill branched into many compressed caches (refreekv.integration.branch)
gives, for every method, what a plain `refreekv.patch` run gives."""

import pytest
import torch

import refreekv
from refreekv.compression import make_method
from refreekv.integration.branch import prefill

from integration_models import ATTENTION, FAMILIES, prompts, tiny_model
from test_integration_patch import METHODS, method_args

NEW_TOKENS = 6


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ATTENTION], ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    family, attention = request.param
    return tiny_model(family, attention)


@pytest.fixture(scope="module", params=[[57, 40, 64], [48]], ids=["padded-batch", "single"])
def batch(request):
    return prompts(request.param)


@pytest.fixture(scope="module")
def prefilled(model, batch):
    return prefill(model, *batch, pad_token_id=0)


def plain_run(model, batch, method, options, evict=True):
    input_ids, attention_mask = batch
    with refreekv.patch(model, method, evict=evict, **options) as handle:
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return out[:, input_ids.shape[1] :], handle.stats


@pytest.mark.parametrize("evict", [True, False], ids=["evict", "mask"])
@pytest.mark.parametrize("case", METHODS)
def test_a_branch_equals_a_plain_patched_run(model, batch, prefilled, case, evict):
    method, options = method_args(case)
    tokens, stats = plain_run(model, batch, method, options, evict)
    compression = make_method(method, **options)
    cache, branch_stats = prefilled.branch(compression, evict=evict)
    with refreekv.patch(model, compression, evict=evict):
        branch_tokens = prefilled.generate(cache, NEW_TOKENS)
    assert torch.equal(branch_tokens, tokens)
    assert torch.equal(branch_stats.kept, stats.kept)
    assert torch.equal(branch_stats.prompt_tokens, stats.prompt_tokens)
    byte_fields = ("kv_bytes_before", "kv_bytes_after", "kv_bytes_allocated", "kv_padding_bytes")
    assert [getattr(branch_stats, name) for name in byte_fields] == [getattr(stats, name) for name in byte_fields]


def test_branches_do_not_disturb_each_other(model, batch, prefilled):
    """Decoding from one branch appends to its own cache only: the prefill's
    tensors, shared by every branch, stay as they were."""
    keys_before = [layer.key.clone() for layer in prefilled.layers]
    values_before = [value.clone() for value in [inputs.value for inputs in prefilled.layers]]
    first = make_method("snapkv", budget=0.4)
    cache, _ = prefilled.branch(first)
    with refreekv.patch(model, first):
        once = prefilled.generate(cache, NEW_TOKENS)
        cache_again, _ = prefilled.branch(first)
        again = prefilled.generate(cache_again, NEW_TOKENS)
    assert torch.equal(once, again)
    assert all(torch.equal(a.key, b) for a, b in zip(prefilled.layers, keys_before))
    assert all(torch.equal(a, b) for a, b in zip([inputs.value for inputs in prefilled.layers], values_before))


def test_the_first_token_is_the_prefill_s_and_decoding_needs_the_patch(model, batch, prefilled):
    tokens, _ = plain_run(model, batch, "fullkv", {})
    assert torch.equal(prefilled.first_tokens, tokens[:, 0])
    cache, _ = prefilled.branch(make_method("streamingllm", budget=0.5))
    assert torch.equal(prefilled.generate(cache, 1)[:, 0], tokens[:, 0])
    with pytest.raises(RuntimeError, match="patched"):
        prefilled.generate(cache, NEW_TOKENS)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        prefilled.generate(cache, 0)


def test_branch_refuses_a_non_boolean_evict():
    # A truthy stand-in would silently pick eviction or masking.
    one_prefill = prefill(tiny_model("llama", "sdpa"), *prompts([48]), pad_token_id=0)
    for evict in ("no", 0, None):
        with pytest.raises(TypeError, match=r"evict must be True or False, got .* of type"):
            one_prefill.branch(make_method("snapkv", budget=0.4), evict=evict)
