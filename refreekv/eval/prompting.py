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

`split_input` builds the same tokens and says where the context ends, for
the sweep's question-after mode (refreekv.eval.prefill): the context part
is the tokens up to the end of the sample's context, the question part the
rest (whatever the template puts after the context: the question and the
instructions around it, the chat template's end of turn and generation
prompt, the answer prefix). A template whose question comes before its
context cannot be split so (`split_refusal`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refreekv.eval.data import Sample
from refreekv.eval.tasks import Task

__all__ = [
    "ModelInput", "SplitInput", "answer_prefix", "build_input", "format_prompt", "split_input", "split_refusal",
    "truncate_middle", "uses_chat_template",
]  # fmt: skip


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


def _wrap(tokenizer, prompt: str, chat: bool, prefix: str) -> str:
    """Steps 3 and 4: the text the model reads, from the (cut) prompt."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        return text + prefix
    return f"{prompt}\n{prefix}" if prefix else prompt


def _tokenize(tokenizer, text: str, chat: bool) -> list[int]:
    # A chat template writes any special tokens it wants itself.
    return tokenizer(text, add_special_tokens=not chat, truncation=False)["input_ids"]


def build_input(tokenizer, task: Task, sample: Sample, max_length: int, chat_template: bool = True) -> ModelInput:
    prompt, truncated = truncate_middle(tokenizer, format_prompt(task, sample), max_length)
    chat = uses_chat_template(tokenizer, task, chat_template)
    text = _wrap(tokenizer, prompt, chat, answer_prefix(sample))
    return ModelInput(torch.tensor([_tokenize(tokenizer, text, chat)], dtype=torch.long), text, truncated, chat)


# -- the context and the question part ----------------------------------------

# Marks the end of the context in the prompt while the chat template wraps it
# (private-use characters: in no sample, and left alone by templates).
_CONTEXT_END = "\ue000refreekv:context-end\ue000"


@dataclass(frozen=True)
class SplitInput:
    """`build_input`'s input (`built`, the same tokens) cut in two where
    the sample's context ends: `context_ids` then `question_ids`.

    context_tokens: the tokens of the context part, `built.input_ids[:, :context_tokens]`.
    moved_tokens: tokens of the context text that went to the question part
        (usually 0): a token that spans the end of the context (e.g. a
        sentence's full stop merged with the newlines after it), and any
        the text before the end would have tokenized differently, start
        the question part, so that the two parts together are exactly the
        model's input.
    """

    built: ModelInput
    context_tokens: int
    moved_tokens: int

    @property
    def context_ids(self) -> torch.Tensor:
        return self.built.input_ids[:, : self.context_tokens]

    @property
    def question_ids(self) -> torch.Tensor:
        return self.built.input_ids[:, self.context_tokens :]

    @property
    def question_tokens(self) -> int:
        return self.built.input_ids.shape[1] - self.context_tokens


def split_refusal(task: Task) -> str | None:
    """Why `task`'s prompt cannot be split into a context part and a
    question part that follows it, or None if it can. (A template with
    no question, such as a summary's, splits: its instructions after the
    context are the question part.)"""
    if task.prompt.count("{context}") != 1:
        return "its template does not hold {context} exactly once"
    head, _ = task.prompt.split("{context}", 1)
    if "{input}" in head:
        return "its question ({input}) comes before the context, so the context alone cannot be cut without it"
    return None


def split_input(tokenizer, task: Task, sample: Sample, max_length: int, chat_template: bool = True) -> SplitInput:
    """The model's input as `build_input` makes it (the same tokens), with
    the end of the context marked: the text after the context is formatted
    from the template; after the middle cut, the prompt must still end
    with it (the cut keeps the prompt's last half); the chat template wraps
    the prompt with a marker there; the text with the marker removed is
    tokenized as `build_input` does, and the context part is the longest
    run of leading tokens that the text before the marker tokenizes to on
    its own. ValueError when the task or the sample cannot be split."""
    refusal = split_refusal(task)
    if refusal is not None:
        raise ValueError(f"task {task.name}: cannot split its prompt into context and question: {refusal}")
    built = build_input(tokenizer, task, sample, max_length, chat_template)
    prompt, _ = truncate_middle(tokenizer, format_prompt(task, sample), max_length)
    after = task.prompt.split("{context}", 1)[1].format(input=sample.input)
    if not prompt.endswith(after):
        raise ValueError(
            f"sample {sample.id} of {task.name}: the text after its context is no longer whole after the middle "
            "truncation, so the prompt cannot be split there; give a larger --max-input-length"
        )
    end = len(prompt) - len(after)
    marked = _wrap(tokenizer, prompt[:end] + _CONTEXT_END + prompt[end:], built.chat, answer_prefix(sample))
    split = marked.find(_CONTEXT_END)
    text = marked.replace(_CONTEXT_END, "", 1)
    if split < 0 or text != built.text:
        raise ValueError(f"sample {sample.id} of {task.name}: the chat template changes the text where the context ends")
    ids = built.input_ids[0].tolist()
    alone = _tokenize(tokenizer, text[:split], built.chat)
    shared = 0
    while shared < min(len(alone), len(ids)) and alone[shared] == ids[shared]:
        shared += 1
    if shared == 0 or shared == len(ids):
        part = "context" if shared == 0 else "question"
        raise ValueError(f"sample {sample.id} of {task.name}: its {part} part has no token of its own")
    return SplitInput(built, shared, len(alone) - shared)
