"""Generating answers and the records that store them: one sample with a
patched model (`predict`, what `run` does), or a batch of samples for every
grid point of a sweep (`Decoder`). Records are built by `sample_record`
alone, so both describe a sample the same way (a sweep adds its point, task
and suite length), and both generate with a task's `DecodeSettings`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from refreekv.eval.data import Sample
from refreekv.eval.prompting import ModelInput, build_input
from refreekv.eval.tasks import TASKS, Task

if TYPE_CHECKING:
    from refreekv.eval.grid import GridPoint
    from refreekv.integration.stats import CompressionStats

__all__ = [
    "DecodeSettings", "Decoder", "decode_groups", "eos_ids", "left_pad", "pad_id", "predict", "sample_record", "until_end",
]  # fmt: skip


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


@dataclass(frozen=True)
class DecodeSettings:
    """How a task's answers are generated (greedy, with the task's length);
    tasks that share them share a sweep's batches."""

    max_new_tokens: int
    eos: tuple[int, ...]
    pad: int
    min_new_tokens: int  # samsum: at least one token before a newline may stop it

    @classmethod
    def of(cls, model, tokenizer, task: Task) -> DecodeSettings:
        eos = eos_ids(model, tokenizer, task.stop_at_newline)
        return cls(task.max_new_tokens, tuple(eos), pad_id(tokenizer, eos), 1 if task.stop_at_newline else 0)

    @property
    def options(self) -> dict[str, Any]:
        """`generate`'s keyword arguments besides the input and the length."""
        return {"eos_token_id": list(self.eos), "pad_token_id": self.pad, "min_new_tokens": self.min_new_tokens}


@torch.no_grad()
def predict(model, tokenizer, handle, task: Task, sample: Sample, max_input_length: int, chat_template: bool) -> dict[str, Any]:
    """One sample's record: greedy generation with the task's length."""
    built = build_input(tokenizer, task, sample, max_input_length, chat_template)
    device = model.get_input_embeddings().weight.device
    input_ids = built.input_ids.to(device)
    settings = DecodeSettings.of(model, tokenizer, task)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        num_beams=1,
        **settings.options,
    )
    return sample_record(sample, built, output[0, input_ids.shape[1] :], tokenizer, handle.stats)


def decode_groups(work: dict[tuple[int, str], list[Sample]], model, tokenizer):
    """(length, settings, [(task, sample), ...]) per context length and
    decode settings, tasks in sweep order. Batching across the tasks of a
    group (the needle tasks share theirs) reads the model's weights once per
    decoding step for more sequences, which is most of a step's cost on a
    CPU; a sequence's tokens do not depend on its batch (SPEC 5)."""
    groups: dict[tuple[int, DecodeSettings], list[tuple[str, Sample]]] = {}
    for (length, task_name), samples in work.items():
        settings = DecodeSettings.of(model, tokenizer, TASKS[task_name])
        groups.setdefault((length, settings), []).extend((task_name, s) for s in samples)
    return [(length, settings, items) for (length, settings), items in groups.items()]


def left_pad(inputs: list[ModelInput], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a batch, shorter inputs padded on the left."""
    longest = max(item.input_ids.shape[1] for item in inputs)
    input_ids = torch.full((len(inputs), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(inputs), longest, dtype=torch.long)
    for row, item in enumerate(inputs):
        n = item.input_ids.shape[1]
        input_ids[row, longest - n :] = item.input_ids[0]
        attention_mask[row, longest - n :] = 1
    return input_ids.to(device), attention_mask.to(device)


def until_end(tokens: torch.Tensor, eos: Sequence[int]) -> list[int]:
    """A row's generated tokens up to and including its first end token
    (what a batch-of-one `generate` returns for it)."""
    row = tokens.tolist()
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


class Decoder:
    """Decodes every grid point for one batch: branched from one prefill,
    or (plain) one patched `generate` per point."""

    def __init__(self, model, plain: bool):
        self.model = model
        self.plain = plain

    def points(self, points: list[GridPoint], input_ids, attention_mask, settings: DecodeSettings):
        """Yields (point, tokens [b, <= max_new_tokens], stats) per point."""
        import refreekv
        from refreekv.integration.branch import prefill

        if self.plain:
            for point in points:
                with refreekv.patch(self.model, point.instance) as handle:
                    output = self.model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=settings.max_new_tokens,
                        do_sample=False, num_beams=1, **settings.options,
                    )  # fmt: skip
                yield point, output[:, input_ids.shape[1] :], handle.stats
            return
        prefilled = prefill(self.model, input_ids, attention_mask, **settings.options)
        for point in points:
            cache, stats = prefilled.branch(point.instance)
            with refreekv.patch(self.model, point.instance):
                tokens = prefilled.generate(cache, settings.max_new_tokens)
            yield point, tokens, stats
            del cache
