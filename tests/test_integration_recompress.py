"""Decode-time compression (SPEC 8, `recompress_every`) on tiny random models
of the four original families, eager and sdpa, float32."""

import copy

import pytest
import torch

import refreekv

from integration_models import ATTENTION, FAMILIES, float32_logit_error, greedy, greedy_loop, prompts, tiny_model

NEW_TOKENS = 20

# Events every few tokens, with cuts that bite: ReFreeKV by its stopping
# rule, fixed-budget methods down to a cap below the prompt.
CASES = {
    "refreekv": ("refreekv", {"threshold": 0.05, "recompress_every": 4}),
    "refreekv-window-rows": ("refreekv", {"threshold": 0.05, "window_rows": 3, "recompress_every": 5}),
    "refreekv-window-fraction": ("refreekv", {"threshold": 0.05, "window_rows": 0.5, "recompress_every": 4}),
    "snapkv": ("snapkv", {"budget": 0.5, "recompress_every": 8, "max_cache_tokens": 24}),
    "streamingllm": ("streamingllm", {"budget": 0.5, "recompress_every": 3, "max_cache_tokens": 20}),
    "h2o-all": ("h2o", {"budget": 0.5, "observation": "all", "recompress_every": 6, "max_cache_tokens": 28}),
    "pyramidkv": ("pyramidkv", {"budget": 0.5, "window": 4, "recompress_every": 4, "max_cache_tokens": 24}),
    "coverage-layer": ("coverage", {"tolerance": 0.2, "allocation": "layer", "granularity": "layer", "window": 4, "recompress_every": 4}),
    "coverage-head": ("coverage", {"tolerance": 0.2, "allocation": "layer", "window": 4, "recompress_every": 4}),
}


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ATTENTION], ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    return tiny_model(*request.param)


@pytest.fixture(scope="module")
def unpatched(model, batch):
    return greedy(model, *batch, new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def float32_error(model, batch):
    return float32_logit_error(model, batch, new_tokens=NEW_TOKENS)


def run(model, batch, case, **extra):
    method, options = CASES[case]
    with refreekv.patch(model, method, **options, **extra) as kv:
        tokens, logits = greedy(model, *batch, new_tokens=NEW_TOKENS)
    return tokens, logits, kv


@pytest.mark.parametrize("case", CASES)
def test_eviction_equals_masking_event_by_event(model, batch, float32_error, case):
    tokens, logits, evicting = run(model, batch, case)
    masked_tokens, masked_logits, masking = run(model, batch, case, evict=False)
    assert torch.equal(tokens, masked_tokens)
    # Different key counts sum in different orders: within float32's own error.
    assert (logits - masked_logits).abs().max() <= 2 * float32_error
    assert evicting.timeline.rows() == masking.timeline.rows()
    every = CASES[case][1]["recompress_every"]
    steps = sorted({row["step"] for row in evicting.timeline.rows()})
    assert steps == list(range(every, NEW_TOKENS, every)), "events on the same steps for every sequence"
    assert any(row["held_after"] < row["held_before"] for row in evicting.timeline.rows()), "some event should evict"


@pytest.mark.parametrize("case", ["refreekv", "snapkv", "streamingllm"])
def test_a_left_padded_batch_equals_each_sequence_alone(model, batch, case):
    input_ids, attention_mask = batch
    tokens, _, kv = run(model, batch, case)
    batched = kv.timeline.rows()
    for row in range(input_ids.shape[0]):
        real = attention_mask[row].bool()
        alone, _, kv_alone = run(model, (input_ids[row : row + 1, real], attention_mask[row : row + 1, real]), case)
        assert torch.equal(alone[0], tokens[row]), f"sequence {row}"
        ours = [{**r, "sequence": row} for r in kv_alone.timeline.rows()]
        assert ours == [r for r in batched if r["sequence"] == row], f"sequence {row}: events and kept counts"


def test_threshold_zero_never_evicts_while_decoding(model, batch, unpatched):
    with refreekv.patch(model, "refreekv", threshold=0.0, recompress_every=2) as kv:
        tokens, logits = greedy(model, *batch, new_tokens=NEW_TOKENS)
    assert torch.equal(tokens, unpatched[0]) and torch.equal(logits, unpatched[1])
    rows = kv.timeline.rows()
    assert rows and all(row["held_after"] == row["held_before"] for row in rows)


def test_none_is_prefill_only_compression(model, batch):
    with refreekv.patch(model, "snapkv", budget=0.5) as plain:
        expected = greedy(model, *batch, new_tokens=NEW_TOKENS)
    with refreekv.patch(model, "snapkv", budget=0.5, recompress_every=None) as kv:
        tokens, logits = greedy(model, *batch, new_tokens=NEW_TOKENS)
    assert torch.equal(tokens, expected[0]) and torch.equal(logits, expected[1])
    assert kv.timeline.rows() == [] and torch.equal(kv.stats.kept, plain.stats.kept)


def test_the_cache_stays_bounded(model):
    """StreamingLLM with a cap: every event cuts each layer back to the cap,
    so the cache never holds more than the cap plus the tokens of one
    period, however long the generation."""
    input_ids, attention_mask = prompts([40])
    cap, every, new_tokens = 20, 5, 60
    with refreekv.patch(model, "streamingllm", budget=0.5, recompress_every=every, max_cache_tokens=cap) as kv:
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0, return_dict_in_generate=True,
        )  # fmt: skip
    events = kv.timeline.events
    layers = model.config.num_hidden_layers  # StreamingLLM protects no layer
    assert len(events) == layers * ((new_tokens - 1) // every), "every layer, every period"
    assert all(event.rows_after == cap and event.held_after.tolist() == [cap] for event in events)
    assert all(layer.keys.shape[2] <= cap + every for layer in out.past_key_values.layers)
    assert kv.stats.kept[:, 0].tolist() == [20.0] * layers, "stats keep their meaning: the prefill cut"


def test_an_event_copies_once_and_leaves_room_for_the_next_period(model):
    """Each cut writes the kept rows with `recompress_every` free rows after
    them: the tokens decoded until the next event are appended in place."""
    input_ids, _ = prompts([40])
    every = 4
    with torch.no_grad(), refreekv.patch(model, "streamingllm", budget=0.5, recompress_every=every, max_cache_tokens=16) as kv:
        out = model(input_ids=input_ids, use_cache=True)
        token, storages = out.logits[:, -1:].argmax(-1), []
        for _ in range(3 * every):
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            layer = out.past_key_values.layers[1]
            storages.append((layer.keys.untyped_storage().data_ptr(), layer.keys.untyped_storage().nbytes(), layer.keys.shape[2]))
    assert len(kv.timeline.events) == 3 * model.config.num_hidden_layers
    for period in range(3):
        # The last step of a period holds the rows the event left, in a fresh buffer with room for `every` more.
        steps = storages[period * every : (period + 1) * every]
        assert len({pointer for pointer, _, _ in steps[:-1]}) == 1, "appends within a period write in place"
    _, capacity, rows = storages[every - 1]
    row_bytes = model.config.num_key_value_heads * model.config.head_dim * 4
    assert rows == 16 and capacity == (16 + every) * row_bytes


def test_hand_written_loop_matches_generate(model):
    input_ids, _ = prompts([30])
    with refreekv.patch(model, "refreekv", threshold=0.05, recompress_every=3) as kv:
        expected, _ = greedy(model, input_ids, torch.ones_like(input_ids), new_tokens=10)
        events = kv.timeline.rows()
        assert torch.equal(greedy_loop(model, input_ids, expected.shape[1]), expected)
        # The loop ran one more forward than generate (for the last token): one more period may be due.
        assert kv.timeline.rows()[: len(events)] == events


def test_sampling_eviction_equals_masking(model, batch):
    def sample(**options):
        with refreekv.patch(model, "snapkv", budget=0.5, recompress_every=8, max_cache_tokens=24, **options):
            torch.manual_seed(11)
            return model.generate(
                batch[0], attention_mask=batch[1], max_new_tokens=12, do_sample=True, top_k=20, pad_token_id=0
            )

    assert torch.equal(sample(), sample(evict=False))


def test_beam_search_is_refused(model, batch):
    with refreekv.patch(model, "refreekv", threshold=0.05, recompress_every=2):
        with pytest.raises(NotImplementedError, match=r"beam search is not supported with decode-time compression"):
            model.generate(batch[0], attention_mask=batch[1], max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)


BAD = {
    "zero": ("refreekv", {"recompress_every": 0}, r"recompress_every must be an integer >= 1 or None, got 0"),
    "negative": ("refreekv", {"recompress_every": -3}, r"recompress_every must be an integer >= 1 or None, got -3"),
    "fraction": ("refreekv", {"recompress_every": 1.5}, r"recompress_every must be an integer >= 1 or None, got 1.5"),
    "boolean": ("refreekv", {"recompress_every": True}, r"recompress_every must be an integer >= 1 or None, got True"),
    "cap below the sinks": ("streamingllm", {"recompress_every": 8, "max_cache_tokens": 4},
                            r"max_cache_tokens must be an integer >= 5 for StreamingLLM\(.*\) .* got 4"),
    "cap below the window": ("snapkv", {"recompress_every": 8, "max_cache_tokens": 7},
                             r"max_cache_tokens must be an integer >= 8 for SnapKV\(.*\) .* got 7"),
    "no cap for a fixed budget": ("h2o", {"recompress_every": 8},
                                  r"h2o keeps a fixed budget: with recompress_every it needs max_cache_tokens"),
    "cap on a threshold-free method": ("refreekv", {"recompress_every": 8, "max_cache_tokens": 100},
                                       r"refreekv decides its own budget and takes no max_cache_tokens \(got 100\)"),
    "cap without events": ("snapkv", {"max_cache_tokens": 100}, r"max_cache_tokens=100 caps the cache at re-cuts; it needs recompress_every or prefill='streaming'"),
    "window past a period": ("snapkv", {"recompress_every": 4, "max_cache_tokens": 32},
                             r"SnapKV\(.*\) reads the newest 8 queries at each event, .* set recompress_every >= 8 or a smaller window"),
    "rows past a period": ("refreekv", {"window_rows": 6, "recompress_every": 5}, r"reads the newest 6 queries at each event"),
    "fullkv": ("fullkv", {"recompress_every": 8}, r"fullkv never cuts"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_options_raise_before_patching(model, case):
    method, options, message = BAD[case]
    implementation = model.config._attn_implementation
    with pytest.raises(ValueError, match=message):
        refreekv.patch(model, method, **options)
    assert model.config._attn_implementation == implementation
    assert getattr(model, "_refreekv_handle", None) is None


@pytest.mark.parametrize("family,attention", [("gemma2", "eager"), ("gpt_oss", "eager"), ("qwen3_next", "sdpa"), ("gemma4-kv-shared", "sdpa")])
def test_hybrid_families_recompress_their_full_attention_layers(family, attention, batch):
    """Sliding-window, linear-attention and KV-shared layers around the
    re-cut ones, soft-capping and sinks in the signal: eviction still equals
    masking, and only full-attention layers with a cache of their own have
    events."""
    model = tiny_model(family, attention)
    float32_error = float32_logit_error(model, batch, new_tokens=NEW_TOKENS)
    tokens, logits, evicting = run(model, batch, "snapkv")
    masked_tokens, masked_logits, masking = run(model, batch, "snapkv", evict=False)
    assert torch.equal(tokens, masked_tokens)
    assert (logits - masked_logits).abs().max() <= 2 * float32_error
    assert evicting.timeline.rows() == masking.timeline.rows()
    assert {row["layer"] for row in evicting.timeline.rows()} == set(evicting.layout.full_layers)


def test_generation_up_to_the_models_context():
    """Rotary positions keep counting from the logical length: with the cache
    cut back every 16 tokens, generating until the model's last trained
    position still equals the full cache masked like the cuts (one family:
    a thousand steps twice)."""
    model = tiny_model("llama", "sdpa")
    input_ids, attention_mask = prompts([40])
    new_tokens = model.config.max_position_embeddings - input_ids.shape[1]
    options = dict(budget=0.5, recompress_every=16, max_cache_tokens=64)
    with refreekv.patch(model, "streamingllm", **options) as kv:
        evicted, _ = greedy(model, input_ids, attention_mask, new_tokens=new_tokens)
        held = max(event.rows_after for event in kv.timeline.events)
    with refreekv.patch(model, "streamingllm", evict=False, **options):
        masked, _ = greedy(model, input_ids, attention_mask, new_tokens=new_tokens)
    assert evicted.shape[1] == new_tokens and held == 64
    assert torch.equal(evicted, masked)


def test_each_event_keeps_the_sinks_and_the_newest_rows(model):
    """StreamingLLM's cut at an event, in the cache's own positions: after
    the last event exactly the first 4 prompt tokens and the newest
    cap - 4 positions are attended to (masking mode holds every row)."""
    input_ids, attention_mask = prompts([30])
    cap, every = 12, 5
    with refreekv.patch(model, "streamingllm", budget=0.5, evict=False, recompress_every=every, max_cache_tokens=cap):
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2 * every + 1, min_new_tokens=2 * every + 1,
            do_sample=False, pad_token_id=0, return_dict_in_generate=True,
        )  # fmt: skip
    length = 30 + 2 * every  # the last forward appended token 2 * every, and its event ran
    expected = torch.zeros(length, dtype=torch.bool)
    expected[:4] = True
    expected[length - (cap - 4) :] = True
    for layer in out.past_key_values.layers:
        assert torch.equal(layer.attended_rows()[0].all(dim=0), expected)


def test_a_copied_cache_continues_on_its_own_and_a_foreign_cache_is_refused(model):
    input_ids, _ = prompts([30])
    with torch.no_grad(), refreekv.patch(model, "refreekv", threshold=0.05, recompress_every=3) as kv:
        out = model(input_ids=input_ids, use_cache=True)
        copy_ = copy.deepcopy(out.past_key_values)
        token = out.logits[:, -1:].argmax(-1)
        for cache in (out.past_key_values, copy_):
            for _ in range(3):
                model(input_ids=token, past_key_values=cache, use_cache=True)
        # Each cache had one event after its own third token: the copy counted from the prefill, not on.
        assert [event.step for event in kv.timeline.events] == [3, 3]
    plain = model(input_ids=input_ids, use_cache=True).past_key_values
    with torch.no_grad(), refreekv.patch(model, "refreekv", recompress_every=3):
        with pytest.raises(RuntimeError, match=r"continues a cache that this patch prefilled; this cache was filled elsewhere"):
            model(input_ids=token, past_key_values=plain, use_cache=True)
