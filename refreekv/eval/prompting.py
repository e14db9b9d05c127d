"""Turning a LongBench sample into model input, as the benchmark does:

1. fill the task's template with the sample's context and input;
2. tokenize it (with the tokenizer's special tokens) and, if it is longer
   than the maximum input length, keep the first and the last half of the
   tokens, decoded back to text (the instructions sit at both ends);
3. wrap it in the chat template as one user turn, except for the few-shot
   and code tasks, whose raw prompts work better;
4. append the sample's answer prefix, if it has one: the opening words of
   the answer that the model completes (RULER ends its prompts so, e.g.
   "The secret number for amber-heron is"). It is the record's
   `answer_prefix` field, which refreekv.eval.ruler fills in from the
   task's template; it goes after the chat template's generation prompt,
   as the start of the assistant's turn, or on a new line after a raw
   prompt. It is never truncated. LongBench records have no such field,
   so their inputs are exactly the benchmark's;
5. tokenize the result; that is what the model reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refreekv.eval.data import Sample
from refreekv.eval.tasks import Task

__all__ = ["ModelInput", "answer_prefix", "build_input", "format_prompt", "truncate_middle", "uses_chat_template"]


@dataclass(frozen=True)
class ModelInput:
    input_ids: torch.Tensor  # [1, n] int64
    text: str  # what was tokenized (after truncation and chat template)
    truncated: bool
    chat: bool


def format_prompt(task: Task, sample: Sample) -> str:
    return task.prompt.format(context=sample.context, input=sample.input)


def answer_prefix(sample: Sample) -> str:
    """The words that open the sample's answer ("" for LongBench data)."""
    prefix = sample.raw.get("answer_prefix", "")
    if not isinstance(prefix, str):
        raise ValueError(f"sample {sample.id}: answer_prefix must be a string, got {type(prefix).__name__}")
    return prefix


def truncate_middle(tokenizer, prompt: str, max_length: int) -> tuple[str, bool]:
    """The prompt, or if it has more than `max_length` tokens, the text of its
    first and last `max_length // 2` tokens (special tokens dropped)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    if len(ids) <= max_length:
        return prompt, False
    half = max_length // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail, True


def uses_chat_template(tokenizer, task: Task, chat_template: bool = True) -> bool:
    return chat_template and task.chat_template and getattr(tokenizer, "chat_template", None) is not None


def build_input(tokenizer, task: Task, sample: Sample, max_length: int, chat_template: bool = True) -> ModelInput:
    prompt, truncated = truncate_middle(tokenizer, format_prompt(task, sample), max_length)
    chat = uses_chat_template(tokenizer, task, chat_template)
    prefix = answer_prefix(sample)
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        text += prefix
        # The template writes any special tokens it wants itself.
        ids = tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
    else:
        text = f"{prompt}\n{prefix}" if prefix else prompt
        ids = tokenizer(text, truncation=False)["input_ids"]
    return ModelInput(torch.tensor([ids], dtype=torch.long), text, truncated, chat)
