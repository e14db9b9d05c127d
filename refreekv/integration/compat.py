"""Every transformers-version-specific detail the integration relies on.

Supported: transformers >= 5.17, < 6. Everything here goes through public
extension points: the attention-function and attention-mask registries, the
per-layer cache classes, and the model's module tree.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

__all__ = [
    "DynamicLayer",
    "SUPPORTED_ATTENTION",
    "SUPPORTED_FAMILIES",
    "attention_layers",
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

# config.model_type -> family name, for the families whose attention modules
# follow the functional AttentionInterface pattern with full attention.
SUPPORTED_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
SUPPORTED_ATTENTION = ("eager", "sdpa")


def check_supported(model: torch.nn.Module) -> None:
    """Raises a clear error for anything the integration cannot patch."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"refreekv.patch expects a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        families = ", ".join(SUPPORTED_FAMILIES.values())
        raise ValueError(f"refreekv supports the {families} families; got a model of type {model_type!r}")
    if not hasattr(model, "lm_head") or not hasattr(model, "model"):
        raise TypeError(
            f"refreekv.patch expects a causal language model (e.g. {SUPPORTED_FAMILIES[model_type]}ForCausalLM), "
            f"got {type(model).__name__}"
        )
    implementation = model.config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"refreekv supports the attention implementations {SUPPORTED_ATTENTION}; the model uses {implementation!r}"
        )
    sliding = [
        i for i, kind in enumerate(getattr(model.config, "layer_types", None) or []) if kind != "full_attention"
    ]
    # Mistral applies config.sliding_window to every layer; Qwen2/Qwen3 only
    # with use_sliding_window, and then through layer_types.
    mistral_window = model_type == "mistral" and model.config.sliding_window is not None
    if sliding or getattr(model.config, "use_sliding_window", False) or mistral_window:
        raise ValueError(
            "refreekv compresses full-attention layers only; this model config uses sliding-window attention "
            f"(sliding_window={getattr(model.config, 'sliding_window', None)}, layers {sliding or 'all'})"
        )


def attention_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    return [layer.self_attn for layer in model.model.layers[: model.config.num_hidden_layers]]


def base_attention_function(model: PreTrainedModel, implementation: str) -> Callable:
    """The attention function the model would call for `implementation`."""
    if implementation == "eager":
        # Eager attention is not in the registry: each modeling file defines it.
        attention_class = type(attention_layers(model)[0])
        return sys.modules[attention_class.__module__].eager_attention_forward
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
