"""The bundled real model (SmolLM2-135M-Instruct, Llama architecture with
GQA 9/3) on planted-fact questions over real essays, offline."""

import pytest
import torch

from refreekv.assets import load_bundled_model, needle_tasks
from refreekv.demo import answer

pytestmark = pytest.mark.slow

CONTEXT_TOKENS = 2000
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def bundled():
    model, tokenizer = load_bundled_model()
    return model, tokenizer, needle_tasks(tokenizer, context_tokens=CONTEXT_TOKENS, count=5)


@pytest.fixture(scope="module")
def full_answers(bundled):
    model, tokenizer, tasks = bundled
    return [answer(model, tokenizer, task.messages(), "fullkv", MAX_NEW_TOKENS) for task in tasks]


@pytest.fixture(scope="module")
def refreekv_answers(bundled):
    model, tokenizer, tasks = bundled
    return [answer(model, tokenizer, task.messages(), "refreekv", MAX_NEW_TOKENS) for task in tasks]


def test_model_loads_and_chats(bundled, full_answers):
    model, tokenizer, tasks = bundled
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert tokenizer.eos_token == "<|im_end|>", "the end-of-turn token must stop generation"
    # Every answer ends at the end-of-turn token, before the token limit.
    assert all(0 < result.new_tokens < MAX_NEW_TOKENS for result in full_answers)
    found = [task.answer.lower() in result.text.lower() for task, result in zip(tasks, full_answers)]
    assert sum(found) >= 4, [result.text for result in full_answers]


def test_refreekv_compresses_real_prompts(full_answers, refreekv_answers):
    for full, compressed in zip(full_answers, refreekv_answers):
        prompt = int(full.stats.prompt_tokens[0])
        assert prompt >= CONTEXT_TOKENS
        assert compressed.stats.budget < 1.0
        assert torch.equal(compressed.stats.kept[:2, 0], torch.tensor([prompt, prompt], dtype=torch.float64)), "layers 0, 1 protected"
        assert compressed.stats.kv_bytes_after < full.stats.kv_bytes_after


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "Measured, not assumed: at the paper's defaults (T=1%, k=1, sinks excluded) ReFreeKV keeps ~45% of "
        "SmolLM2-135M's prompt on these tasks, but 1-7% in layers 11-22 (and in 25 and 27), whose last-row "
        "attention sits on the sink, the chat template and the question; the mid-context fact is evicted and the "
        "answers change. T=0.1% (~65% kept) and T=0.01% (~80%) still change 4/5 and 3/5 answers; the paper's other "
        "knobs do not help either: k=1% of n changes 3/5 (~64% kept), k=5% changes 4/5 (~44%), sinks counted in the "
        "norm change 5/5 (~38%); SnapKV at 50% changes 3/5 as well (`make needle-sweep`). Kept as a strict xfail so a change that makes it pass is noticed."
    ),
)
def test_refreekv_answers_equal_full_cache_answers(full_answers, refreekv_answers):
    assert [r.text for r in refreekv_answers] == [r.text for r in full_answers]


def test_coverage_answers_equal_full_cache_answers(bundled, full_answers):
    """The study's setting (docs/coverage.md) at its defaults keeps the
    full-cache answers on the prompts where the paper's defaults lose them,
    while compressing every one of them."""
    model, tokenizer, tasks = bundled
    results = [answer(model, tokenizer, task.messages(), "coverage", MAX_NEW_TOKENS) for task in tasks]
    assert [r.text for r in results] == [r.text for r in full_answers]
    assert all(r.stats.budget < 1.0 and r.stats.kv_bytes_after < f.stats.kv_bytes_after for r, f in zip(results, full_answers))


def test_lossless_threshold_on_the_real_model(bundled, full_answers):
    model, tokenizer, tasks = bundled
    for task, full in list(zip(tasks, full_answers))[:2]:
        result = answer(model, tokenizer, task.messages(), "refreekv", MAX_NEW_TOKENS, threshold=0.0)
        assert result.text == full.text and result.stats.budget == 1.0
