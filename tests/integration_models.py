"""Tiny random models of every supported family, built from configs (no
downloads), shared by the integration tests."""

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
}
ATTENTION = ["eager", "sdpa"]
VOCAB = 256

# Larger initial weights than usual make the random attention peaked, so
# that ReFreeKV really evicts and the tests compare something.
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    initializer_range=0.2,
)


def tiny_model(family: str, attention: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_class, model_class, family_options = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(**{**TINY, **family_options, **overrides}, attn_implementation=attention)
    return model_class(config).eval()


def prompts(lengths, seed: int = 1):
    """A left-padded batch of random prompts with the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    input_ids = torch.randint(3, VOCAB, (len(lengths), longest), generator=generator)
    attention_mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, longest - length :] = 1
        input_ids[row, : longest - length] = 0
    return input_ids, attention_mask


def greedy(model, input_ids, attention_mask, new_tokens=6):
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
    )
    return out.sequences[:, input_ids.shape[1] :], torch.stack(out.logits, dim=1)
