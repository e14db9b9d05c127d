"""Bad options and unsupported models fail clearly, before anything runs."""

import copy

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaModel,
    T5Config,
    T5ForConditionalGeneration,
)

import refreekv

from integration_models import TINY, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "sdpa")


BAD_OPTIONS = {
    "unknown method": (("kivi",), {}, ValueError, r"unknown method 'kivi'; available: refreekv, coverage, fullkv, streamingllm, h2o, snapkv, pyramidkv"),
    "unknown option": (("snapkv",), {"treshold": 0.1}, TypeError, r"method 'snapkv' has no option 'treshold'; its options: budget, window, kernel, pooling, protected_layers"),
    "negative threshold": (("refreekv",), {"threshold": -0.01}, ValueError, r"threshold must be in \[0, 1\), got -0.01"),
    "threshold one": (("refreekv",), {"threshold": 1.0}, ValueError, r"threshold must be in \[0, 1\), got 1.0"),
    "zero budget": (("snapkv",), {"budget": 0}, ValueError, r"budget as a token count must be >= 1, got 0"),
    "negative budget": (("h2o",), {"budget": -0.5}, ValueError, r"budget as a fraction of the prompt must be in \(0, 1\], got -0.5"),
    "fraction above one": (("streamingllm",), {"budget": 1.5}, ValueError, r"budget as a fraction of the prompt must be in \(0, 1\], got 1.5"),
    "budget type": (("pyramidkv",), {"budget": "half"}, TypeError, r"budget must be a fraction in \(0, 1\] or a token count >= 1, got 'half'"),
    "protected layer out of range": (("refreekv",), {"protected_layers": [0, 4]}, ValueError, r"protected_layers \[4\] out of range for a model with 4 layers"),
    "protected layers type": (("refreekv",), {"protected_layers": "01"}, TypeError, r"protected_layers must be a sequence of layer indices"),
    "ranking": (("refreekv",), {"ranking": "random"}, ValueError, r"ranking must be 'position' or 'attention', got 'random'"),
    "observation": (("h2o",), {"observation": "some"}, ValueError, r"observation must be 'window' or 'all', got 'some'"),
    "even kernel": (("snapkv",), {"kernel": 4}, ValueError, r"kernel must be an odd integer >= 1, got 4"),
    "pooling": (("snapkv",), {"pooling": "median"}, ValueError, r"pooling must be 'max' or 'avg', got 'median'"),
    "window": (("snapkv",), {"window": 0}, ValueError, r"window must be an integer >= 1, got 0"),
    "beta": (("pyramidkv",), {"beta": 0.5}, ValueError, r"beta must be a number >= 1, got 0.5"),
    "window rows": (("refreekv",), {"window_rows": 0}, ValueError, r"window_rows as a row count must be >= 1, got 0"),
    "tolerance": (("coverage",), {"tolerance": 1.5}, ValueError, r"tolerance must be in \[0, 1\), got 1.5"),
    "stop": (("coverage",), {"stop": "entropy"}, ValueError, r"stop must be one of 'mass', 'norm', 'output'; got 'entropy'"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS, ids=list(BAD_OPTIONS))
def test_bad_options_raise_before_patching(model, case):
    args, options, error, message = BAD_OPTIONS[case]
    implementation = model.config._attn_implementation
    with pytest.raises(error, match=message):
        refreekv.patch(model, *args, **options)
    assert model.config._attn_implementation == implementation
    assert getattr(model, "_refreekv_handle", None) is None


def test_a_model_outside_the_decoder_layout_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))
    with pytest.raises(TypeError, match=r"expects a decoder-only causal language model with its decoder layers at `model.model.layers` .* got GPT2LMHeadModel"):
        refreekv.patch(gpt2)


def test_not_a_causal_lm():
    base = LlamaModel(tiny_model("llama", "sdpa").config)
    with pytest.raises(TypeError, match=r"expects a decoder-only causal language model .* got LlamaModel"):
        refreekv.patch(base)


def test_a_non_causal_model_is_refused():
    bert = BertForMaskedLM(BertConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32, vocab_size=32))
    with pytest.raises(TypeError, match=r"expects a decoder-only causal language model .* got BertForMaskedLM"):
        refreekv.patch(bert)


def test_not_a_transformers_model():
    with pytest.raises(TypeError, match=r"expects a transformers PreTrainedModel, got Linear"):
        refreekv.patch(torch.nn.Linear(2, 2))


def test_an_encoder_decoder_is_refused():
    t5 = T5ForConditionalGeneration(T5Config(num_layers=1, d_model=16, d_kv=8, d_ff=32, num_heads=2, vocab_size=32))
    with pytest.raises(ValueError, match=r"decoder-only causal LMs; T5ForConditionalGeneration is an encoder-decoder model"):
        refreekv.patch(t5)


def test_multi_head_latent_attention_is_refused():
    config = DeepseekV3Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"does not support multi-head latent attention \(deepseek_v3, kv_lora_rank=8\)"):
        refreekv.patch(DeepseekV3ForCausalLM(config))


def test_a_model_without_full_attention_layers_is_refused():
    mistral = tiny_model("mistral", "sdpa", sliding_window=16)
    with pytest.raises(ValueError, match=r"no full-attention layer .*\(layer kinds: 4 sliding_attention\); .*\(sliding_window=16\)"):
        refreekv.patch(mistral)


def test_an_unknown_cache_layer_is_refused():
    """Layers whose cache is neither attention nor a recurrent state alone
    (here DeepSeek-V3.2-style indexed attention) are not classified."""
    model = tiny_model("llama", "sdpa")
    model.config.layer_types = ["full_attention", "indexed_attention", "full_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"does not support layer 1 of this llama model: its cache layer is a DynamicIndexedLayer"):
        refreekv.patch(model)


def test_a_layer_that_bypasses_the_attention_registry_is_caught_at_prefill():
    model = tiny_model("llama", "sdpa")
    input_ids = torch.randint(3, TINY["vocab_size"], (1, 12))
    with refreekv.patch(model):
        # Layer 2 now calls sdpa directly, never refreekv's registered function.
        model.model.layers[2].self_attn.config = copy.copy(model.config)
        model.model.layers[2].self_attn.config._attn_implementation = "sdpa"
        with pytest.raises(RuntimeError, match=r"the attention of layers \[2\] did not go through transformers' attention-function registry"):
            model(input_ids=input_ids)


def test_unsupported_attention_implementation():
    model = tiny_model("llama", "sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"supports the attention implementations \('eager', 'sdpa'\); the model uses 'flex_attention'"):
        refreekv.patch(model)


def test_double_patch_is_refused(model):
    with refreekv.patch(model):
        with pytest.raises(RuntimeError, match=r"already patched by refreekv; call .remove\(\) on the existing handle first"):
            refreekv.patch(model, "snapkv")


def test_exception_inside_the_block_still_removes_the_patch(model):
    implementation = model.config._attn_implementation
    with pytest.raises(KeyError):
        with refreekv.patch(model):
            raise KeyError("boom")
    assert model.config._attn_implementation == implementation
    assert getattr(model, "_refreekv_handle", None) is None


def test_right_padding_is_refused(model):
    input_ids = torch.randint(3, TINY["vocab_size"], (2, 10))
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, 7:] = 0
    with refreekv.patch(model):
        with pytest.raises(ValueError, match=r"expects left-padded prompts .*\(tokenizer.padding_side = 'left'\)"):
            model(input_ids=input_ids, attention_mask=attention_mask)


def test_stats_before_any_prefill(model):
    with refreekv.patch(model) as kv:
        with pytest.raises(RuntimeError, match=r"no prefill has run since the model was patched"):
            kv.stats


def test_options_with_a_method_instance(model):
    from refreekv.compression import SnapKV

    with pytest.raises(TypeError, match=r"options \['budget'\] given with a method instance"):
        refreekv.patch(model, SnapKV(), budget=0.3)


def test_static_cache_is_refused(model):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=32)
    with refreekv.patch(model):
        with pytest.raises(TypeError, match=r"refreekv compresses a DynamicCache \(the generate default\); got StaticCache"):
            model(input_ids=torch.randint(3, 100, (1, 8)), past_key_values=cache, use_cache=True)
