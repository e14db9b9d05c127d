"""Calls under one patch stay apart (issue #23): threads sharing a patched
model, stats that describe the call that made them, generation modes and
model changes the patch cannot follow refused before anything runs."""

import copy
import pickle
import threading

import pytest
import torch
from transformers import GenerationConfig

import refreekv

from integration_models import ATTENTION, TINY, greedy, prompts, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Peaked random attention, so that every method really cuts.
PEAKED = dict(initializer_range=1.0)
NEW_TOKENS = 6


@pytest.fixture(scope="module", params=ATTENTION)
def model(request):
    return tiny_model("llama", request.param, **PEAKED)


@pytest.fixture
def forwards(model):
    """How many forwards reached the model's layers, counted at the
    embedding: refreekv refuses in its pre-hook on the decoder, before it."""
    counter = {"embedding": 0}

    def count(module, args):
        counter["embedding"] += 1

    hook = model.model.embed_tokens.register_forward_pre_hook(count)
    yield counter
    hook.remove()


def run(model, kv, batch):
    """Greedy tokens of a call and, read in the same thread, its stats and timeline."""
    tokens, _ = greedy(model, *batch, new_tokens=NEW_TOKENS)
    return tokens, kv.stats.kept.clone(), kv.timeline.rows()


# -- threads sharing one patch ----------------------------------------------

# A model takes one patch, so threads share one method; each thread calls
# with its own prompt lengths and batch size.
THREAD_CALLS = [[64], [150, 97], [300], [80, 200, 120]]
SETTINGS = {
    "prefill-only": ("snapkv", {"budget": 0.4}),
    "recompress": ("streamingllm", {"budget": 0.5, "recompress_every": 2, "max_cache_tokens": 24}),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_threads_sharing_a_patch_get_what_each_call_gets_alone(model, setting):
    method, options = SETTINGS[setting]
    batches = [prompts(lengths, seed=index) for index, lengths in enumerate(THREAD_CALLS)]
    repeats = 3
    # Every thread waits for the others in the middle of every forward (at
    # layer 2's attention), so the calls are surely in flight together.
    barrier = threading.Barrier(len(batches), timeout=60)
    results, errors = {}, []

    def meet(module, args):
        barrier.wait()

    def worker(index):
        try:
            for repeat in range(repeats):
                results[index, repeat] = run(model, kv, batches[index])
        except BaseException as error:
            errors.append(error)
            barrier.abort()

    with refreekv.patch(model, method, **options) as kv:
        alone = [run(model, kv, batch) for batch in batches]
        hook = model.model.layers[2].self_attn.register_forward_pre_hook(meet)
        try:
            threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(batches))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            hook.remove()
    assert not errors, errors
    assert any(kept.lt(torch.tensor(lengths)).any() for (_, kept, _), lengths in zip(alone, THREAD_CALLS)), "nothing was cut"
    for (index, repeat), (tokens, kept, timeline) in results.items():
        expected_tokens, expected_kept, expected_timeline = alone[index]
        assert torch.equal(tokens, expected_tokens), f"thread {index}, call {repeat}"
        assert torch.equal(kept, expected_kept), f"thread {index}, call {repeat}"
        assert timeline == expected_timeline, f"thread {index}, call {repeat}"
    if setting == "recompress":
        assert alone[0][2], "decode-time events should have run"


def test_stats_are_those_of_the_calling_threads_last_call(model):
    batch = prompts([90])
    with refreekv.patch(model, "snapkv", budget=0.4) as kv:
        greedy(model, *batch)
        seen = []

        def read_stats():
            try:
                seen.append(kv.stats)
            except RuntimeError as error:
                seen.append(str(error))

        thread = threading.Thread(target=read_stats)
        thread.start()
        thread.join()
        assert seen[0].startswith("no prefill has run since the model was patched"), seen
        assert kv.stats.kept.shape == (TINY["num_hidden_layers"], 1)


# -- draft verification -----------------------------------------------------

DRAFT_OPTIONS = {
    "assistant model": ({"assistant_model": "draft"}, r"generate got assistant_model=LlamaForCausalLM"),
    "prompt lookup": ({"prompt_lookup_num_tokens": 3}, r"generate got prompt_lookup_num_tokens=3"),
    "early exit": ({"assistant_early_exit": 1}, r"generate got assistant_early_exit=1"),
    "multi-token prediction": ({"use_mtp": True}, r"generate got use_mtp=True"),
    "in a generation config": ({"generation_config": GenerationConfig(prompt_lookup_num_tokens=2, max_new_tokens=4)},
                               r"generate got prompt_lookup_num_tokens=2"),
}  # fmt: skip


@pytest.mark.parametrize("case", DRAFT_OPTIONS)
def test_draft_verification_is_refused_before_anything_runs(model, forwards, case):
    options, named = DRAFT_OPTIONS[case]
    draft = tiny_model("llama", model.config._attn_implementation, seed=5)
    if options.get("assistant_model") == "draft":
        options = {**options, "assistant_model": draft}
    draft_forwards = []
    draft.model.embed_tokens.register_forward_pre_hook(lambda module, args: draft_forwards.append(1))
    input_ids, attention_mask = prompts([70])
    with refreekv.patch(model, "refreekv") as kv:
        greedy(model, input_ids, attention_mask)
        forwards["embedding"] = 0
        with pytest.raises(ValueError, match=r"refreekv does not support assisted decoding or prompt lookup \(" + named):
            model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0, **options)
        assert forwards["embedding"] == 0 and not draft_forwards, "nothing ran"
        with pytest.raises(RuntimeError, match=r"the last call in this thread compressed nothing: it ran no prefill \(ValueError: refreekv does not support assisted"):
            kv.stats


def test_draft_options_in_the_models_generation_config_are_refused(model, forwards):
    input_ids, attention_mask = prompts([40])
    with refreekv.patch(model, "snapkv", budget=0.5):
        expected, _ = greedy(model, input_ids, attention_mask, new_tokens=4)
        model.generation_config.prompt_lookup_num_tokens = 3
        try:
            forwards["embedding"] = 0
            with pytest.raises(ValueError, match=r"generate got prompt_lookup_num_tokens=3"):
                model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert forwards["embedding"] == 0
            # An explicit None in the call turns the model's default off, as in transformers: plain greedy.
            out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, min_new_tokens=4,
                                 do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=None)  # fmt: skip
        finally:
            model.generation_config.prompt_lookup_num_tokens = None
    assert torch.equal(out[:, input_ids.shape[1] :], expected)


def test_generate_is_the_models_own_again_after_remove(model):
    input_ids, attention_mask = prompts([40])
    with refreekv.patch(model, "snapkv", budget=0.5):
        assert "generate" in vars(model)
    assert "generate" not in vars(model)
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         prompt_lookup_num_tokens=3)  # fmt: skip
    assert out.shape == (1, 44)


# -- stats describe the call that made them ---------------------------------


def test_a_call_without_a_cache_reports_that_it_compressed_nothing(model):
    input_ids, attention_mask = prompts([80])
    with refreekv.patch(model, "snapkv", budget=0.4) as kv:
        greedy(model, input_ids, attention_mask)
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        with pytest.raises(RuntimeError, match=r"the last call in this thread compressed nothing: it ran without a cache \(use_cache=False\)"):
            kv.stats
        greedy(model, input_ids, attention_mask)
        kept = kv.stats.kept
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3, use_cache=False, pad_token_id=0)
        with pytest.raises(RuntimeError, match=r"it ran without a cache \(use_cache=False\)"):
            kv.stats
        assert kv.timeline.rows() == []
        greedy(model, input_ids, attention_mask)
        assert torch.equal(kv.stats.kept, kept)


def test_a_call_that_raised_reports_that_it_compressed_nothing(model):
    input_ids, attention_mask = prompts([80])

    def fail(module, args):
        raise KeyError("layer 3 failed")

    with refreekv.patch(model, "snapkv", budget=0.4) as kv:
        greedy(model, input_ids, attention_mask)
        expected = kv.stats.kept.clone()
        hook = model.model.layers[3].register_forward_pre_hook(fail)
        try:
            with pytest.raises(KeyError, match="layer 3 failed"):
                model(input_ids=input_ids, attention_mask=attention_mask)
            with pytest.raises(RuntimeError, match=r"compressed nothing: its prefill raised before it finished$"):
                kv.stats
            with pytest.raises(KeyError, match="layer 3 failed"):
                greedy(model, input_ids, attention_mask)
            with pytest.raises(RuntimeError, match=r"compressed nothing: its prefill raised before it finished \(KeyError: 'layer 3 failed'\)"):
                kv.stats
        finally:
            hook.remove()
        # A refusal in the pre-hook is a call that raised too.
        right_padded = attention_mask.clone()
        right_padded[0, -5:] = 0
        with pytest.raises(ValueError, match=r"expects left-padded prompts"):
            model(input_ids=input_ids, attention_mask=right_padded)
        with pytest.raises(RuntimeError, match=r"its prefill raised before it finished"):
            kv.stats
        # Nothing of the failed calls is left behind: the next call is as if they never ran.
        greedy(model, input_ids, attention_mask)
        assert torch.equal(kv.stats.kept, expected)


def test_continuing_a_cache_reports_that_caches_prefill(model):
    input_ids, attention_mask = prompts([60, 90])
    step_mask = torch.cat([attention_mask, torch.ones(2, 1, dtype=attention_mask.dtype)], dim=1)
    with torch.no_grad():
        unpatched_cache = model(input_ids=input_ids, attention_mask=attention_mask).past_key_values
        with refreekv.patch(model, "snapkv", budget=0.4) as kv:
            cache = model(input_ids=input_ids, attention_mask=attention_mask).past_key_values
            first = kv.stats
            model(input_ids=input_ids[:1, -30:])  # another prompt, another cache
            assert kv.stats is not first
            model(input_ids=input_ids[:, -1:], attention_mask=step_mask, past_key_values=cache)
            assert kv.stats is first
            model(input_ids=input_ids[:, -1:], attention_mask=step_mask, past_key_values=unpatched_cache)
            with pytest.raises(RuntimeError, match=r"compressed nothing: it continued a cache that this patch did not prefill"):
                kv.stats


# -- the model changed under the patch --------------------------------------

COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda model: pickle.loads(pickle.dumps(model))}


@pytest.mark.parametrize("how", COPIES)
def test_a_copy_of_a_patched_model_is_refused_until_patched_itself(model, how):
    input_ids, attention_mask = prompts([100])
    implementation = model.config._attn_implementation
    unpatched, _ = greedy(model, input_ids, attention_mask)
    with refreekv.patch(model, "snapkv", budget=0.4) as kv:
        tokens, _ = greedy(model, input_ids, attention_mask)
        kept = kv.stats.kept
        clone = COPIES[how](model)
        clone_forwards = []
        clone.model.embed_tokens.register_forward_pre_hook(lambda module, args: clone_forwards.append(1))
        refusal = r"this model is a copy \(copy.deepcopy or pickle\) of a model patched by refreekv"
        with pytest.raises(RuntimeError, match=refusal):
            clone(input_ids=input_ids)
        with pytest.raises(RuntimeError, match=refusal):
            greedy(clone, input_ids, attention_mask)
        assert not clone_forwards
        assert torch.equal(greedy(model, input_ids, attention_mask)[0], tokens), "the original is untouched"
    with pytest.raises(RuntimeError, match=refusal):
        clone(input_ids=input_ids)  # the original's attention function is gone: still the same refusal
    assert not clone_forwards
    with refreekv.patch(clone, "snapkv", budget=0.4) as clone_kv:
        assert torch.equal(greedy(clone, input_ids, attention_mask)[0], tokens)
        assert torch.equal(clone_kv.stats.kept, kept)
    assert clone.config._attn_implementation == implementation
    assert getattr(clone, "_refreekv_handle", None) is None and "generate" not in vars(clone)
    assert torch.equal(greedy(clone, input_ids, attention_mask)[0], unpatched)


CHANGES = {
    "set_attn_implementation": lambda model: model.set_attn_implementation("eager"),
    "config": lambda model: setattr(model.config, "_attn_implementation", "sdpa"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_changing_the_attention_implementation_while_patched_is_refused(change):
    model = tiny_model("llama", "sdpa", **PEAKED)
    input_ids, attention_mask = prompts([50])
    forwards_seen = []
    model.model.embed_tokens.register_forward_pre_hook(lambda module, args: forwards_seen.append(1))
    with refreekv.patch(model, "snapkv", budget=0.4) as kv:
        CHANGES[change](model)
        changed_to = model.config._attn_implementation
        with pytest.raises(RuntimeError, match=rf"attention implementation was changed to '{changed_to}' while refreekv's patch was on .* \.remove\(\)"):
            greedy(model, input_ids, attention_mask)
        with pytest.raises(RuntimeError, match=r"attention implementation was changed"):
            model(input_ids=input_ids)
        assert not forwards_seen
        kv.remove()
        assert model.config._attn_implementation == changed_to, "remove() keeps what the caller set"
        with refreekv.patch(model, "snapkv", budget=0.4):
            greedy(model, input_ids, attention_mask)
    assert forwards_seen


# -- prompts with nothing to keep -------------------------------------------


def test_an_empty_prompt_is_named(model, forwards):
    with refreekv.patch(model, "snapkv", budget=0.4):
        with pytest.raises(ValueError, match=r"refreekv got an empty prompt \(0 tokens\)"):
            model(input_ids=torch.zeros(1, 0, dtype=torch.long))
        with pytest.raises(ValueError, match=r"refreekv got an empty prompt \(0 tokens\)"):
            model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2, pad_token_id=0)
    assert forwards["embedding"] == 0


def test_a_sequence_of_padding_only_is_named(model, forwards):
    input_ids, attention_mask = prompts([20, 12, 20])
    attention_mask[1] = 0
    with refreekv.patch(model, "snapkv", budget=0.4):
        with pytest.raises(ValueError, match=r"sequences without a real token: the attention_mask is all padding in rows \[1\] of the batch of 3"):
            model(input_ids=input_ids, attention_mask=attention_mask)
    assert forwards["embedding"] == 0


# -- a compressed cache outside a patch ---------------------------------------


def test_a_compressed_cache_is_refused_by_the_unpatched_model(model):
    input_ids, attention_mask = prompts([60, 90])
    step = dict(input_ids=input_ids[:, -1:], attention_mask=torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1))
    with torch.no_grad():
        with refreekv.patch(model, "snapkv", budget=0.4):
            cache = model(input_ids=input_ids, attention_mask=attention_mask).past_key_values
            expected = model(**step, past_key_values=copy.deepcopy(cache)).logits
        with pytest.raises(RuntimeError, match=r"this cache holds a prompt compressed by refreekv .* Continue it inside refreekv.patch"):
            model(**step, past_key_values=copy.deepcopy(cache))
        with refreekv.patch(model, "streamingllm"):  # any method continues it as the patch that cut it would
            again = model(**step, past_key_values=copy.deepcopy(cache)).logits
    assert torch.equal(again, expected)


def test_a_compressed_cache_crops_only_its_appended_tokens(model):
    input_ids, attention_mask = prompts([70])
    with torch.no_grad(), refreekv.patch(model, "snapkv", budget=0.4) as kv:
        cache = kv.compress_context(input_ids, attention_mask).cache()  # several tokens may follow a context
        before = model(input_ids=input_ids[:, -1:], past_key_values=copy.deepcopy(cache)).logits
        model(input_ids=input_ids[:, -3:], past_key_values=cache)  # three tokens, then crop them
        cache.crop(-3)
        after = model(input_ids=input_ids[:, -1:], past_key_values=cache).logits
        with pytest.raises(NotImplementedError, match=r"cannot crop \d+ tokens off a cache layer compressed by refreekv"):
            cache.crop(-2)
    assert torch.equal(after, before)
