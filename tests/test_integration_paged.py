"""Paged storage (SPEC 10): `refreekv.patch(..., storage="paged")` on tiny
random models of the four original families, eager and sdpa, float32.
Paged equals padded for every method, with and without decode-time
compression; memory holds the kept rows and at most one partly filled block
per head; appends never move a held row. The other verified families run
paged storage in tests/test_integration_families.py."""

import copy
from unittest import mock

import pytest
import torch

import refreekv
from refreekv import reference
from refreekv.integration.paged import PagedLayer
from refreekv.integration.stats import kv_memory

from integration_models import ATTENTION, FAMILIES, float32_logit_error, greedy, greedy_loop, prompts, tiny_model
from test_integration_patch import METHODS, method_args
from test_integration_recompress import CASES as DECODE_CASES, NEW_TOKENS

# Small blocks, so that prompts and decoding cross many block boundaries.
BLOCK_ROWS = 4
# Coverage with a count per KV head, and a window short enough to cut 30-token prompts.
PER_HEAD = {"tolerance": 0.3, "allocation": "layer", "window": 4}


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ATTENTION], ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    return tiny_model(*request.param)


@pytest.fixture(scope="module")
def float32_error(model, batch):
    return float32_logit_error(model, batch, new_tokens=NEW_TOKENS)


def compare_storages(model, batch, method, options, float32_error, new_tokens=8):
    """Runs `method` with padded and with paged storage; asserts the tokens
    are equal and the logits within float32's own error; returns both
    handles."""
    runs = {}
    for storage in ("padded", "paged"):
        # Counts the paged layers made: a layer whose cut would not pay for its block rounding stays padded.
        with mock.patch.object(PagedLayer, "__init__", autospec=True, side_effect=PagedLayer.__init__) as made:
            with refreekv.patch(model, method, storage=storage, block_rows=BLOCK_ROWS, **options) as kv:
                runs[storage] = (*greedy(model, *batch, new_tokens=new_tokens), kv)
        if storage == "paged" and method != "fullkv":
            assert made.call_count > 0, "some layer should be paged"
    (padded_tokens, padded_logits, padded), (paged_tokens, paged_logits, paged) = runs["padded"], runs["paged"]
    assert torch.equal(paged_tokens, padded_tokens)
    # Different row layouts sum in different orders: within float32's own error (flash-attention's rule).
    assert (paged_logits - padded_logits).abs().max() <= 2 * float32_error
    return padded, paged


@pytest.mark.parametrize("case", METHODS)
def test_paged_equals_padded(model, batch, float32_error, case):
    method, options = method_args(case)
    padded, paged = compare_storages(model, batch, method, options, float32_error)
    assert torch.equal(paged.stats.kept, padded.stats.kept)
    assert ((paged.stats.rounding >= 0) & (paged.stats.rounding < BLOCK_ROWS)).all()
    assert torch.allclose(paged.stats.held - paged.stats.rounding, paged.stats.kept, rtol=0, atol=1e-9)
    if method != "fullkv":
        assert paged.stats.kv_bytes_after < paged.stats.kv_bytes_before, "the test should evict something"


@pytest.mark.parametrize("case", DECODE_CASES)
def test_paged_equals_padded_with_decode_time_compression(model, batch, float32_error, case):
    method, options = DECODE_CASES[case]
    padded, paged = compare_storages(model, batch, method, options, float32_error, new_tokens=NEW_TOKENS)
    assert paged.timeline.rows() == padded.timeline.rows()
    assert any(row["held_after"] < row["held_before"] for row in paged.timeline.rows()), "some event should evict"


def test_per_head_counts_are_held_at_their_own_length(model, batch):
    """Coverage per head: the padded cache holds every head at the largest
    count, the paged one each head at its own (plus block rounding)."""
    input_ids, attention_mask = batch
    layers = {}
    for storage in ("padded", "paged"):
        with torch.no_grad(), refreekv.patch(model, "coverage", **PER_HEAD, storage=storage, block_rows=BLOCK_ROWS) as kv:
            layers[storage] = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True).past_key_values.layers
    for padded, paged in zip(layers["padded"], layers["paged"]):
        assert isinstance(paged, PagedLayer)
        counts = padded.attended_counts().expand(-1, paged.lengths.shape[1])
        assert torch.equal(paged.lengths, counts), "each head holds the rows it attends to"
        assert torch.equal(paged.prompt_lengths, counts.cpu())
    assert (kv.stats.held < layers["padded"][0].keys.shape[2]).any(), "some head should keep fewer rows than the largest"


def test_the_pool_holds_kept_rows_and_at_most_one_partial_block_per_head(model, batch):
    input_ids, attention_mask = batch
    with torch.no_grad(), refreekv.patch(model, "coverage", **PER_HEAD, storage="paged", block_rows=BLOCK_ROWS) as kv:
        cache = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True).past_key_values
    memory = kv_memory(cache, kv.stats.layers)
    assert all(isinstance(layer, PagedLayer) for layer in cache.layers), "every layer of this test should be paged"
    for layer, in_use, allocated in zip(cache.layers, memory.in_use, memory.allocated):
        row_bytes = layer.keys[0, 0].nbytes + layer.values[0, 0].nbytes
        lengths = layer.lengths.cpu()
        blocks = (lengths + BLOCK_ROWS - 1) // BLOCK_ROWS
        assert layer.keys.shape[0] == int(blocks.sum()), "a prefill cut reserves no block beyond the last partial one"
        rounding_rows = blocks * BLOCK_ROWS - lengths
        assert ((rounding_rows >= 0) & (rounding_rows < BLOCK_ROWS)).all()
        assert in_use == allocated == (int(lengths.sum()) + int(rounding_rows.sum())) * row_bytes
    kept_bytes = sum(int(layer.lengths.sum()) * (layer.keys[0, 0].nbytes + layer.values[0, 0].nbytes) for layer in cache.layers)
    assert kv.stats.kv_bytes_after == kept_bytes + kv.stats.kv_padding_bytes
    assert torch.allclose(kv.stats.rounding * 2, torch.stack([
        (layer.block_rows_per_head(layer.prompt_lengths) - layer.prompt_lengths).double().mean(1) * 2 for layer in cache.layers
    ]))  # fmt: skip


def test_appends_never_move_held_rows(model):
    input_ids, _ = prompts([37])
    with torch.no_grad(), refreekv.patch(model, "coverage", **PER_HEAD, storage="paged", block_rows=BLOCK_ROWS):
        out = model(input_ids=input_ids, use_cache=True)
        cache = out.past_key_values
        layer = next(layer for layer in cache.layers if isinstance(layer, PagedLayer))
        token = out.logits[:, -1:].argmax(-1)
        moves = 0
        for _ in range(12):
            pool_pointer, held = layer.keys.data_ptr(), reference.paged_rows(layer.keys, layer.block_table, layer.lengths)
            reserved = layer.appendable() >= 1
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            moved = layer.keys.data_ptr() != pool_pointer
            assert not (reserved and moved), "an append into reserved blocks moved the pool"
            moves += moved
            after = reference.paged_rows(layer.keys, layer.block_table, layer.lengths)
            # Rows held before the step are unchanged, whatever pool they live in now.
            for s in range(held.shape[0]):
                for h in range(held.shape[1]):
                    old = int(layer.lengths[s, h]) - 1
                    assert torch.equal(after[s, h, :old], held[s, h, :old])
        assert 0 < moves < 12, "the pool grows ahead, not every step"


def test_a_copied_cache_continues_on_its_own(model):
    input_ids, _ = prompts([30])
    with torch.no_grad(), refreekv.patch(model, "coverage", **PER_HEAD, storage="paged", block_rows=BLOCK_ROWS):
        out = model(input_ids=input_ids, use_cache=True)
        copied = copy.deepcopy(out.past_key_values)
        token = out.logits[:, -1:].argmax(-1)
        other = (token + 1) % model.config.vocab_size
        first = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True).logits
        second = model(input_ids=other, past_key_values=copied, use_cache=True).logits
        fresh = model(input_ids=input_ids, use_cache=True).past_key_values
        assert torch.equal(model(input_ids=other, past_key_values=fresh, use_cache=True).logits, second)
        assert not torch.equal(first, second)


def test_hand_written_loop_and_sampling_match_padded(model, batch):
    input_ids, _ = prompts([30])
    tokens = {}
    for storage in ("padded", "paged"):
        with refreekv.patch(model, "coverage", **PER_HEAD, storage=storage, block_rows=BLOCK_ROWS):
            torch.manual_seed(3)
            sampled = model.generate(
                batch[0], attention_mask=batch[1], max_new_tokens=10, do_sample=True, top_k=20, pad_token_id=0
            )
            tokens[storage] = (greedy_loop(model, input_ids, 10), sampled)
    assert torch.equal(tokens["paged"][0], tokens["padded"][0])
    assert torch.equal(tokens["paged"][1], tokens["padded"][1])


def test_a_multi_token_turn_is_causal_among_its_rows(model, float32_error):
    """A later turn of several tokens in one forward: its rows see the held
    rows and the earlier rows of the turn (bottom-right causal)."""
    input_ids, _ = prompts([33])
    turn = prompts([5], seed=7)[0]
    logits = {}
    for storage in ("padded", "paged"):
        with torch.no_grad(), refreekv.patch(model, "coverage", **PER_HEAD, storage=storage, block_rows=BLOCK_ROWS) as kv:
            cache = kv.compress_context(input_ids).cache()  # a turn of several tokens may follow a context
            logits[storage] = model(input_ids=turn, past_key_values=cache, use_cache=True).logits
    assert (logits["paged"] - logits["padded"]).abs().max() <= 2 * float32_error


def test_crop_removes_only_appended_tokens(model):
    input_ids, _ = prompts([30])
    with torch.no_grad(), refreekv.patch(model, "coverage", **PER_HEAD, storage="paged", block_rows=BLOCK_ROWS):
        out = model(input_ids=input_ids, use_cache=True)
        cache = out.past_key_values
        layer = next(layer for layer in cache.layers if isinstance(layer, PagedLayer))
        prompt = layer.lengths.clone()
        token = out.logits[:, -1:].argmax(-1)
        model(input_ids=token, past_key_values=cache, use_cache=True)
        model(input_ids=torch.cat([token, token], dim=1), past_key_values=cache, use_cache=True)
        cache.crop(-2)
        assert torch.equal(layer.lengths, prompt + 1) and cache.get_seq_length() == 31
        with pytest.raises(NotImplementedError, match=r"cannot crop 2 tokens .* holds 1 tokens appended since its last cut"):
            layer.crop(-2)


# -- defaults and bad input ---------------------------------------------------


def test_storage_defaults_to_paged_for_per_head_counts_only(model):
    for method, options, expected in [
        ("coverage", {}, 16), ("coverage", {"granularity": "layer"}, None), ("snapkv", {}, None),
        ("coverage", {"evict": False}, None),
    ]:  # fmt: skip
        with refreekv.patch(model, method, **options) as kv:
            assert kv.paged_block_rows == expected, (method, options)


@pytest.mark.parametrize(
    "options,error,message",
    [
        ({"storage": "pages"}, ValueError, r"storage must be one of 'padded', 'paged' or None, got 'pages'"),
        ({"storage": "paged", "block_rows": 0}, ValueError, r"block_rows must be an integer in \[1, 4096\].*got 0"),
        ({"storage": "paged", "block_rows": 2.5}, ValueError, r"block_rows must be an integer in \[1, 4096\].*got 2.5"),
        ({"storage": "paged", "block_rows": 8192}, ValueError, r"block_rows must be an integer in \[1, 4096\].*got 8192"),
        ({"storage": "paged", "evict": False}, ValueError, r"storage='paged' holds only the kept rows, and evict=False"),
    ],
)
def test_bad_storage_options_raise_before_patching(model, options, error, message):
    implementation = model.config._attn_implementation
    with pytest.raises(error, match=message):
        refreekv.patch(model, "coverage", **options)
    assert model.config._attn_implementation == implementation and not hasattr(model, "_refreekv_handle")


def test_beam_search_is_refused(model, batch):
    with refreekv.patch(model, "coverage", **PER_HEAD, storage="paged"):
        with pytest.raises(NotImplementedError, match=r"reordering the batch \(beam search\) is not supported on a paged"):
            model.generate(batch[0], attention_mask=batch[1], max_new_tokens=4, num_beams=2, pad_token_id=0)


def test_an_unpatched_model_cannot_continue_a_paged_cache(model):
    input_ids, _ = prompts([30])
    with torch.no_grad():
        with refreekv.patch(model, "coverage", **PER_HEAD, storage="paged", block_rows=BLOCK_ROWS):
            out = model(input_ids=input_ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        with pytest.raises(RuntimeError, match=r"PagedLayer standing for 30 positions.*only a model patched by refreekv"):
            model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
