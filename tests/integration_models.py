"""Tiny random models of every supported family, built from configs (no
downloads), shared by the integration tests."""

import copy

import torch
import transformers

import refreekv

ATTENTION = ["eager", "sdpa"]
VOCAB = 256
WINDOW = 16  # sliding window of the hybrid families: shorter than the test prompts, so it slides
HYBRID = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
LINEAR_HYBRID = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
SMALL_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
SMALL_LINEAR = dict(
    linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4
)
GEMMA4 = dict(
    layer_types=HYBRID, sliding_window=WINDOW, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
    global_head_dim=32, attention_k_eq_v=True, num_global_key_value_heads=1,
)

# family -> (config class, model class, options on top of TINY, attention
# implementations the family supports). The options put each family's
# attention variant in play: sliding layers, soft-capping, sinks, a scale
# other than 1/sqrt(d), linear-attention layers, rotary scaling.
ALL_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, ATTENTION),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}, ATTENTION),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}, ATTENTION),
    "ministral": ("MinistralConfig", "MinistralForCausalLM", {"layer_types": HYBRID, "sliding_window": WINDOW}, ATTENTION),
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM", {}, ATTENTION),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2}, ATTENTION),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, ATTENTION),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**SMALL_MOE, "shared_expert_intermediate_size": 32}, ATTENTION),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, ATTENTION),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", SMALL_MOE, ATTENTION),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", {
        **SMALL_MOE, **SMALL_LINEAR, "shared_expert_intermediate_size": 32, "layer_types": LINEAR_HYBRID}, ATTENTION),
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", {**SMALL_LINEAR, "layer_types": LINEAR_HYBRID}, ATTENTION),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "layer_types": HYBRID, "sliding_window": WINDOW, "attn_logit_softcapping": 3.0, "query_pre_attn_scalar": 24}, ATTENTION),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "layer_types": HYBRID, "sliding_window": WINDOW, "query_pre_attn_scalar": 24}, ATTENTION),
    # Full layers with their own head size and a single KV head whose keys are its values (attention_k_eq_v).
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", GEMMA4, ATTENTION),
    # The last two layers read the keys and values of the last earlier layer of their type.
    "gemma4-kv-shared": ("Gemma4TextConfig", "Gemma4ForCausalLM", {
        **GEMMA4, "num_hidden_layers": 6, "layer_types": HYBRID + HYBRID[:2], "num_kv_shared_layers": 2}, ATTENTION),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {
        "layer_types": HYBRID, "sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2}, ["eager"]),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}, ATTENTION),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, ATTENTION),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", {"layer_types": HYBRID, "sliding_window": WINDOW}, ATTENTION),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"attention_multiplier": 0.2}, ATTENTION),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {"pad_token_id": 0}, ATTENTION),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", {"layer_types": HYBRID, "sliding_window": WINDOW}, ATTENTION),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"pad_token_id": 0}, ATTENTION),
}  # fmt: skip

# The four families whose every method runs in tests/test_integration_patch.py.
FAMILIES = {name: ALL_FAMILIES[name] for name in ("llama", "mistral", "qwen2", "qwen3")}

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
    config_name, model_name, family_options, _ = ALL_FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**TINY, **family_options, **overrides}, attn_implementation=attention)
    return getattr(transformers, model_name)(config).eval()


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


def greedy_loop(model, input_ids, steps: int) -> torch.Tensor:
    """[b, steps] greedy tokens from a hand-written forward loop (no generate)."""
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True)
        generated = []
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            generated.append(token)
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(generated, dim=1)


def assert_batch_equals_each_alone(model, batch, method: str, options: dict) -> None:
    """A left-padded batch gives each sequence the tokens and kept counts it
    gets alone (SPEC 5)."""
    input_ids, attention_mask = batch
    with refreekv.patch(model, method, **options) as kv:
        tokens, _ = greedy(model, input_ids, attention_mask)
        batched_kept = kv.stats.kept.clone()
        for row in range(input_ids.shape[0]):
            real = attention_mask[row].bool()
            alone, _ = greedy(model, input_ids[row : row + 1, real], attention_mask[row : row + 1, real])
            assert torch.equal(alone[0], tokens[row]), f"sequence {row}"
            assert torch.equal(kv.stats.kept[:, 0], batched_kept[:, row]), f"sequence {row}"


def float32_logit_error(model, batch, new_tokens: int) -> float:
    """How far the unpatched model's float32 greedy logits are from the same
    run in float64, the largest over the sequences of `batch`: the
    yardstick for comparing two float32 runs (flash-attention's rule)
    instead of a fixed tolerance. Each sequence runs alone, unpadded: in
    float64, transformers' eager padding mask overflows to -inf on padding
    rows, whose NaN values then leak."""
    exact = copy.deepcopy(model).double()
    if hasattr(exact.config, "_experts_implementation"):
        exact.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    input_ids, attention_mask = batch
    error = 0.0
    for row in range(input_ids.shape[0]):
        real = attention_mask[row].bool()
        prompt = (input_ids[row : row + 1, real], attention_mask[row : row + 1, real])
        tokens, logits = greedy(model, *prompt, new_tokens=new_tokens)
        exact_tokens, exact_logits = greedy(exact, *prompt, new_tokens=new_tokens)
        assert torch.equal(exact_tokens, tokens)
        error = max(error, (logits.double() - exact_logits).abs().max().item())
    return error
