"""Every transformers-version- and family-specific detail the integration
relies on.

Supported: transformers >= 5.17, < 6. Everything here goes through public
extension points: the attention-function and attention-mask registries, the
per-layer cache classes, and the model's module tree.

A model is supported by capability, not by name: a decoder-only causal LM
whose attention modules call the attention function registered for
`config._attn_implementation` (transformers' AttentionInterface), with the
standard per-layer `DynamicCache`. The cache transformers builds from the
config says what each layer is (`ModelLayout`):

* full attention (`DynamicLayer`): compressed;
* sliding-window attention (`DynamicSlidingWindowLayer`): left to
  transformers, whose cache for it is already bounded by the window;
* linear attention / recurrent state (`LinearAttentionLayer`): no per-token
  cache, left alone.

Layers that share another layer's keys and values (Gemma 4's KV sharing)
hold no cache of their own; they read the rows their source layer holds.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionCacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

__all__ = [
    "DynamicLayer",
    "FULL",
    "LINEAR",
    "SLIDING",
    "SUPPORTED_ATTENTION",
    "VERIFIED_FAMILIES",
    "AttentionVariant",
    "ModelLayout",
    "attention_variant",
    "base_attention_function",
    "cache_from_layers",
    "check_cache",
    "check_supported",
    "masked_sdpa_applies",
    "masked_sdpa_attention",
    "new_cache",
    "register_attention",
    "unregister_attention",
]

SUPPORTED_ATTENTION = ("eager", "sdpa")
FULL, SLIDING, LINEAR = "full_attention", "sliding_attention", "linear_attention"

# config.model_type -> the family's name, for the families the test suite
# proves (tests/test_integration_families.py) with the pinned transformers.
# Other models that pass the capability check are patched too; these are the
# ones whose golden tests have run.
VERIFIED_FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "ministral": "Ministral",
    "ministral3": "Ministral 3",
    "mixtral": "Mixtral",
    "qwen2": "Qwen2",
    "qwen2_moe": "Qwen2-MoE",
    "qwen3": "Qwen3",
    "qwen3_moe": "Qwen3-MoE",
    "qwen3_next": "Qwen3-Next",
    "qwen3_5_text": "Qwen3.5",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3",
    "gemma4_text": "Gemma 4",
    "gpt_oss": "GPT-OSS",
    "phi3": "Phi-3",
    "olmo2": "OLMo 2",
    "olmo3": "OLMo 3",
    "granite": "Granite",
    "glm4": "GLM-4",
    "cohere2": "Cohere2",
    "smollm3": "SmolLM3",
}


@dataclass(frozen=True)
class ModelLayout:
    """What each decoder layer of a supported model is, in the model's own
    layer numbering.

    kinds: per layer, FULL, SLIDING or LINEAR.
    cache_source: per layer, the index of the cache layer it attends over
        (itself, or the layer whose keys and values it shares); None for
        linear-attention layers.
    """

    kinds: tuple[str, ...]
    cache_source: tuple[Optional[int], ...]

    @property
    def full_layers(self) -> tuple[int, ...]:
        """The layers with a full-attention cache of their own: the ones a
        method may compress (protected layers included)."""
        return tuple(i for i, kind in enumerate(self.kinds) if kind == FULL and self.cache_source[i] == i)


def check_supported(model: torch.nn.Module) -> ModelLayout:
    """The model's layout, or a clear error for anything the integration
    cannot patch."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"refreekv.patch expects a transformers PreTrainedModel, got {type(model).__name__}")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"refreekv compresses the self-attention cache of decoder-only causal LMs; {type(model).__name__} is an "
            "encoder-decoder model (its cache is an EncoderDecoderCache with cross-attention rows)"
        )
    decoder = getattr(model, "model", None)
    if not hasattr(model, "lm_head") or not hasattr(decoder, "layers"):
        raise TypeError(
            "refreekv.patch expects a decoder-only causal language model with its decoder layers at "
            f"`model.model.layers` (e.g. LlamaForCausalLM), got {type(model).__name__}"
        )
    if getattr(config, "kv_lora_rank", None) is not None:
        raise ValueError(
            f"refreekv does not support multi-head latent attention ({config.model_type}, "
            f"kv_lora_rank={config.kv_lora_rank}): the model caches a low-rank latent re-expanded into keys and values, "
            "with a rotary part split from the rest, and refreekv's signal and cache surgery are not verified on it"
        )
    implementation = config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"refreekv supports the attention implementations {SUPPORTED_ATTENTION}; the model uses {implementation!r}"
        )
    layout = _layout(model)
    for index, kind in enumerate(layout.kinds):
        if kind != LINEAR:
            _check_attention_module(decoder.layers[index], index)
    if not layout.full_layers:
        raise ValueError(
            f"this {config.model_type} model has no full-attention layer with a cache of its own (layer kinds: "
            f"{_kind_counts(layout.kinds)}); its cache is already bounded by its sliding window "
            f"(sliding_window={getattr(config, 'sliding_window', None)}), so refreekv has nothing to compress"
        )
    return layout


def _layout(model: PreTrainedModel) -> ModelLayout:
    """Classifies the layers from the cache transformers builds for the
    config (its layer classes follow `config.layer_types`, or the sliding
    window when a config has no layer types)."""
    config = model.config
    num_layers = config.num_hidden_layers
    cache_layers = new_cache(model).layers
    kinds = []
    for index, layer in enumerate(cache_layers):
        if type(layer) is DynamicLayer:
            kinds.append(FULL)
        elif type(layer) is DynamicSlidingWindowLayer:
            kinds.append(SLIDING)
        elif isinstance(layer, LinearAttentionCacheLayerMixin) and not isinstance(layer, DynamicLayer):
            kinds.append(LINEAR)
        else:
            raise ValueError(
                f"refreekv does not support layer {index} of this {config.model_type} model: its cache layer is a "
                f"{type(layer).__name__}, not one of DynamicLayer (full attention), DynamicSlidingWindowLayer or "
                "LinearAttentionLayer"
            )
    sources = list(range(len(kinds)))
    # Layers past the cache (KV sharing) read the last earlier layer of
    # their own attention type, the one that stores its keys and values.
    layer_types = getattr(config, "layer_types", None)
    for index in range(len(cache_layers), num_layers):
        if layer_types is None:
            raise ValueError(
                f"this {config.model_type} model has {num_layers} layers but its cache only {len(cache_layers)}, "
                "and no layer_types to tell which layer each of the others shares"
            )
        source = max(i for i in range(len(cache_layers)) if layer_types[i] == layer_types[index])
        kinds.append(kinds[source])
        sources.append(source)
    return ModelLayout(
        kinds=tuple(kinds),
        cache_source=tuple(None if kind == LINEAR else source for kind, source in zip(kinds, sources)),
    )


def _check_attention_module(decoder_layer: torch.nn.Module, index: int) -> None:
    """An attention layer must dispatch through the attention-function
    registry, where refreekv's function is registered; a module that calls
    its own kernel would never reach it."""
    attention = getattr(decoder_layer, "self_attn", None)
    if attention is None or getattr(attention, "layer_idx", None) != index:
        raise ValueError(
            f"refreekv expects decoder layer {index} to have a `self_attn` module with layer_idx={index}; "
            f"got {type(decoder_layer).__name__} with children {[name for name, _ in decoder_layer.named_children()]}"
        )
    module_globals = vars(sys.modules[type(attention).__module__])
    if "ALL_ATTENTION_FUNCTIONS" not in module_globals:
        raise ValueError(
            f"refreekv needs attention modules that dispatch through transformers' attention-function registry "
            f"(ALL_ATTENTION_FUNCTIONS); {type(attention).__name__} of layer {index} does not"
        )


def _kind_counts(kinds: tuple[str, ...]) -> str:
    return ", ".join(f"{kinds.count(kind)} {kind}" for kind in dict.fromkeys(kinds))


@dataclass(frozen=True)
class AttentionVariant:
    """How a layer's attention turns logits into probabilities, so that the
    importance signal is the model's own softmax.

    scaling: the softmax scale the layer passes (query_pre_attn_scalar,
        attention multipliers and the like are already in it).
    softcap: Gemma 2's logit soft-capping, `c * tanh(logit / c)`; None when
        the attention function applied does not cap (transformers' sdpa
        ignores the option, so under sdpa the model does not cap either).
    sinks: GPT-OSS's learned sink logits [H], one extra softmax term per
        query head that absorbs probability; None without sinks.
    """

    scaling: float
    softcap: Optional[float] = None
    sinks: Optional[torch.Tensor] = None


def attention_variant(module: torch.nn.Module, base_attention: Callable, kwargs: dict) -> AttentionVariant:
    """The variant of the call `module` is making to `base_attention` with
    `kwargs` (the keyword arguments the model passes to every attention
    function)."""
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = module.scaling
    softcap = kwargs.get("softcap")
    if softcap is not None and "softcap" not in inspect.signature(base_attention).parameters:
        softcap = None
    # GPT-OSS passes its sinks as `s_aux` (its eager function reads the same
    # parameter from the module).
    sinks = kwargs.get("s_aux")
    return AttentionVariant(
        scaling=float(scaling),
        softcap=float(softcap) if softcap else None,
        sinks=sinks.detach() if sinks is not None else None,
    )


def base_attention_function(attention: torch.nn.Module, implementation: str) -> Callable:
    """The attention function `attention` (a layer's self-attention module)
    would call for `implementation`."""
    if implementation == "eager":
        # Eager attention is not in the registry: each modeling file defines it.
        return sys.modules[type(attention).__module__].eager_attention_forward
    return AttentionInterface._global_mapping[implementation]


def masked_sdpa_applies(implementation: str, query: torch.Tensor, attention_mask) -> bool:
    """Whether `masked_sdpa_attention` replaces the model's attention for a
    decoding step: sdpa with a mask, on the CPU. On CUDA, SDPA with both a
    mask and `enable_gqa` falls back to its math kernel (transformers avoids
    it for that reason), so the model's own path stays."""
    return implementation == "sdpa" and attention_mask is not None and query.device.type == "cpu"


def masked_sdpa_attention(module, query, key, value, attention_mask: torch.Tensor, *, scaling=None, dropout=0.0, **kwargs):
    """transformers' sdpa attention for a boolean mask, with each KV head
    shared by its query group inside SDPA (`enable_gqa`). transformers
    repeats the KV heads whenever a mask is given, a copy of the whole
    cache per layer and step that dominates decoding a padded batch or a
    compressed (always masked) cache; the result is the same (tested
    bitwise)."""
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )  # fmt: skip
    return output.transpose(1, 2).contiguous(), None


def register_attention(name: str, function: Callable, base_implementation: str) -> None:
    """Registers `function` under `name`, with the base implementation's masks."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_implementation])


def unregister_attention(name: str) -> None:
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def new_cache(model: PreTrainedModel) -> DynamicCache:
    return DynamicCache(config=model.config)


def cache_from_layers(model: PreTrainedModel, layers: list) -> DynamicCache:
    """A model's dynamic cache whose first layers are `layers` (filled)."""
    cache = new_cache(model)
    cache.layers[: len(layers)] = layers
    return cache


def check_cache(cache) -> None:
    """Compressed layers replace a dynamic cache's layers; other caches
    (static, offloaded, quantized) keep fixed shapes we cannot shrink."""
    if type(cache) is not DynamicCache:
        raise TypeError(f"refreekv compresses a DynamicCache (the generate default); got {type(cache).__name__}")
