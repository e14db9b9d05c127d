"""The memory a patched cache takes: what `kv_memory` and the stats report,
and the cap on it: no layer ever allocates more than transformers'
uncompressed cache holds at the same step (issue #23); and caches filled
under `torch.inference_mode()` that are continued outside it."""

import contextlib

import pytest
import torch

import refreekv
from refreekv.integration.cache import CompressedLayer
from refreekv.integration.stats import kv_memory

from integration_models import prompts, tiny_model

STEPS = 20

# Every method, cutting: fixed budgets at half the prompt, the adaptive
# methods on weights large enough that their attention is peaked.
METHODS = {
    "streamingllm": ("streamingllm", {"budget": 0.5}),
    "h2o": ("h2o", {"budget": 0.5}),
    "snapkv": ("snapkv", {"budget": 0.5}),
    "pyramidkv": ("pyramidkv", {"budget": 0.5}),
    "refreekv": ("refreekv", {}),
    "coverage": ("coverage", {"tolerance": 0.2, "allocation": "layer", "window": 8}),
    # Paged storage in small blocks: many reservations, close to the cap.
    "coverage-blocks-4": ("coverage", {"tolerance": 0.2, "allocation": "layer", "window": 8, "block_rows": 4}),
}
# Options each method needs to re-cut while decoding: a cap for the fixed
# budgets, one count per layer for Coverage.
DECODE_OPTIONS = {
    "streamingllm": {"max_cache_tokens": 24},
    "h2o": {"max_cache_tokens": 24},
    "snapkv": {"max_cache_tokens": 24},
    "pyramidkv": {"max_cache_tokens": 24},
    "refreekv": {},
    "coverage": {"granularity": "layer"},
    "coverage-blocks-4": {},
}
# Short and long prompts alone, and a left-padded batch of different lengths.
PROMPTS = {"32": [32], "300": [300], "batch": [300, 57, 32]}


@pytest.fixture(scope="module")
def model(one_thread):
    return tiny_model("llama", "sdpa", initializer_range=1.0)


@torch.no_grad()
def memory_per_step(model, input_ids, attention_mask, steps=STEPS):
    """`kv_memory` of the cache after prefill and after each of `steps`
    greedy decode steps."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    memory = [kv_memory(out.past_key_values)]
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
        out = model(input_ids=token, attention_mask=attention_mask, past_key_values=out.past_key_values, use_cache=True)
        memory.append(kv_memory(out.past_key_values))
    return memory


@pytest.fixture(scope="module")
def unpatched_memory(model):
    return {name: memory_per_step(model, *prompts(lengths)) for name, lengths in PROMPTS.items()}


@pytest.mark.parametrize("every", [None, 8, 64], ids=["prefill-only", "every-8", "every-64"])
@pytest.mark.parametrize("evict", [True, False], ids=["evict", "mask"])
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("case", METHODS)
def test_no_layer_allocates_more_than_the_uncompressed_cache(model, unpatched_memory, case, prompt, evict, every):
    """At every step, each layer's storage is at most what the unpatched
    model's layer holds then. With `every=8` decode-time cuts run on steps
    8 and 16; with 64 the headroom a cut would leave exceeds what it evicts
    from the short prompts."""
    method, options = METHODS[case]
    if every is not None:
        options = {**options, **DECODE_OPTIONS[case], "recompress_every": every}
    with refreekv.patch(model, method, evict=evict, **options) as kv:
        patched = memory_per_step(model, *prompts(PROMPTS[prompt]))
        assert kv.stats.budget < 1.0, "the test should cut"
    for step, (ours, theirs) in enumerate(zip(patched, unpatched_memory[prompt])):
        assert ours.layers == theirs.layers
        assert theirs.allocated == theirs.in_use, "transformers' layers hold exactly their rows"
        for layer, allocated, in_use, unpatched in zip(ours.layers, ours.allocated, ours.in_use, theirs.allocated):
            assert in_use <= allocated <= unpatched, f"step {step}, layer {layer}"


def test_a_compressed_layer_grows_by_an_eighth_of_its_rows(model):
    """Where the evicted rows leave room, appends go in place into an
    eighth more rows, so the cache allocates little past what it holds and
    copies itself rarely."""
    input_ids, attention_mask = prompts([300])
    capacities = []
    with torch.no_grad(), refreekv.patch(model, "snapkv", budget=0.5):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        for _ in range(60):
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            layer = out.past_key_values.layers[0]
            row_bytes = layer.keys.nbytes // layer.keys.shape[2]
            capacities.append(layer.keys.untyped_storage().nbytes() // row_bytes)
            memory = kv_memory(out.past_key_values)
            assert all(allocated <= in_use * 9 / 8 + 2 * row_bytes for in_use, allocated in zip(memory.in_use, memory.allocated))
    # 150 rows held; 151 + 151 // 8 rows on the first append, 170 + 21 on the 20th, 192 + 24 on the 42nd.
    assert capacities == [169] * 19 + [191] * 22 + [216] * 19


def test_stats_report_in_use_and_allocated_bytes(model):
    """Right after prefill, the stats are `kv_memory` of the layers they
    count; the free rows a decode-time cut leaves are allocated, not in use."""
    input_ids, attention_mask = prompts([40, 33])
    every = 8
    for options in ({}, {"recompress_every": every, "max_cache_tokens": 24}):
        with torch.no_grad(), refreekv.patch(model, "snapkv", budget=0.5, **options) as kv:
            cache = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True).past_key_values
        memory = kv_memory(cache, kv.stats.layers)
        assert kv.stats.kv_bytes_after == memory.in_use_bytes
        assert kv.stats.kv_bytes_allocated == memory.allocated_bytes
        assert kv.stats.kv_allocated_ratio == kv.stats.kv_bytes_allocated / kv.stats.kv_bytes_before
        row_bytes = 2 * model.config.num_key_value_heads * model.config.head_dim * 4 * input_ids.shape[0]
        free_rows = every * len(kv.stats.layers) if options else 0
        assert kv.stats.kv_bytes_allocated - kv.stats.kv_bytes_after == free_rows * row_bytes
        assert all(isinstance(cache.layers[index], CompressedLayer) for index in kv.stats.layers)


def test_kv_memory_of_an_unpatched_cache(model):
    input_ids, attention_mask = prompts([30, 20])
    with torch.no_grad():
        cache = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True).past_key_values
    memory = kv_memory(cache)
    layer_bytes = 2 * input_ids.numel() * model.config.num_key_value_heads * model.config.head_dim * 4
    assert memory.layers == tuple(range(model.config.num_hidden_layers))
    assert memory.in_use == memory.allocated == (layer_bytes,) * model.config.num_hidden_layers
    assert memory.allocated_bytes == memory.in_use_bytes == layer_bytes * model.config.num_hidden_layers
    assert kv_memory(cache, [2]).in_use == (layer_bytes,)


INFERENCE_CASES = {
    "unpatched": None,
    "snapkv": ("snapkv", {"budget": 0.5}),
    "streamingllm-every-4": ("streamingllm", {"budget": 0.5, "recompress_every": 4, "max_cache_tokens": 40}),
}


def generate_and_continue(model, input_ids, attention_mask, first_mode):
    """Greedy tokens and logits of a generation under `first_mode`,
    continued from the cache it returned under `torch.no_grad()`."""
    options = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with first_mode():
        first = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3, min_new_tokens=3, **options)
    attention_mask = torch.cat([attention_mask, torch.ones_like(first.sequences[:, input_ids.shape[1] :])], dim=1)
    with torch.no_grad():
        then = model.generate(
            input_ids=first.sequences, attention_mask=attention_mask, past_key_values=first.past_key_values,
            max_new_tokens=8, min_new_tokens=8, **options,
        )  # fmt: skip
    return then.sequences[:, input_ids.shape[1] :], torch.stack(first.logits + then.logits, dim=1)


@pytest.mark.parametrize("case", INFERENCE_CASES)
def test_a_cache_filled_under_inference_mode_continues_without_it(model, case):
    """What the unpatched model allows, patched too: the appends after
    inference mode go into ordinary tensors (torch refuses in-place writes
    into inference tensors outside it), with the same tokens and logits as
    the same run without inference mode."""
    input_ids, attention_mask = prompts([200, 150])
    with contextlib.ExitStack() as stack:
        if INFERENCE_CASES[case] is not None:
            method, options = INFERENCE_CASES[case]
            stack.enter_context(refreekv.patch(model, method, **options))
        tokens, logits = generate_and_continue(model, input_ids, attention_mask, torch.inference_mode)
        expected_tokens, expected_logits = generate_and_continue(model, input_ids, attention_mask, torch.no_grad)
    assert torch.equal(tokens, expected_tokens) and torch.equal(logits, expected_logits)
