"""Generating a sample's answer and the record that stores it. Records are
built by `sample_record` alone, so `run` and a batched sweep describe a
sample the same way (a sweep adds its point, task and suite length)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from refreekv.eval.data import Sample
from refreekv.eval.prompting import ModelInput, build_input
from refreekv.eval.tasks import Task

if TYPE_CHECKING:
    from refreekv.integration.stats import CompressionStats

__all__ = ["eos_ids", "pad_id", "predict", "sample_record"]


def eos_ids(model, tokenizer, stop_at_newline: bool) -> list[int]:
    """The tokens that end a generation: the model's and the tokenizer's end
    of sequence, and the newline token for tasks that stop at a newline."""
    ids: list[int] = []
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    if stop_at_newline:
        newline = tokenizer.encode("\n", add_special_tokens=False)
        if newline and newline[-1] not in ids:
            ids.append(int(newline[-1]))
    return ids


def sample_record(
    sample: Sample, built: ModelInput, new_token_ids: torch.Tensor | Sequence[int], tokenizer, stats: CompressionStats, row: int = 0
) -> dict[str, Any]:
    """The prediction record of `sample`: `built` is its model input,
    `new_token_ids` the tokens generated for it (no padding) and `row` its
    sequence in the batch `stats` describes."""
    record = {
        "_id": sample.id,
        "index": sample.index,
        "pred": tokenizer.decode(new_token_ids, skip_special_tokens=True),
        "answers": sample.answers,
        "all_classes": sample.all_classes,
        "length": sample.length,
        "input_tokens": int(built.input_ids.shape[1]),
        "truncated": built.truncated,
        "chat_template": built.chat,
        "new_tokens": len(new_token_ids),
        "budget": float(stats.per_sequence[row]),
        "held_budget": float(stats.held_per_sequence[row]),
        # Whole numbers, unless a method keeps a different count per KV head.
        "kept_per_layer": [int(k) if k.is_integer() else round(k, 3) for k in stats.kept[:, row].tolist()],
    }
    # Synthetic needle tasks plant their fact at a depth; scores per depth need it.
    if "depth" in sample.raw:
        record["depth"] = sample.raw["depth"]
    return record


def pad_id(tokenizer, eos: Sequence[int]) -> int:
    """The token that fills left padding and finished rows: the tokenizer's
    pad token, else the first end token (as `generate` itself does)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return eos[0] if eos else 0


@torch.no_grad()
def predict(model, tokenizer, handle, task: Task, sample: Sample, max_input_length: int, chat_template: bool) -> dict[str, Any]:
    """One sample's record: greedy generation with the task's length."""
    built = build_input(tokenizer, task, sample, max_input_length, chat_template)
    device = model.get_input_embeddings().weight.device
    input_ids = built.input_ids.to(device)
    eos = eos_ids(model, tokenizer, task.stop_at_newline)
    pad = pad_id(tokenizer, eos)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=task.max_new_tokens,
        # samsum: at least one token before a newline may stop it
        min_new_tokens=1 if task.stop_at_newline else 0,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return sample_record(sample, built, output[0, input_ids.shape[1] :], tokenizer, handle.stats)
