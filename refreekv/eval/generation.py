"""Generating answers and the records that store them: one sample with a
patched model (`predict`, what `run` does), or a batch of samples for every
grid point of a sweep (`Decoder`). Records are built by `sample_record`
alone, so both describe a sample the same way (a sweep adds its point, task
and suite length), and both generate with a task's `DecodeSettings`.

A sweep's points in the question-after and streaming prefill modes
(refreekv.eval.prefill) run plainly, through `Decoder.mode_point`: one
patched call per group of sequences that may share it, unpadded
(question-after: the same question length; streaming: the same
prompt length, so that every sequence's pieces are its own whatever its
batch, and so the same cap). On the suite's samples, whose lengths differ
by a few tokens, that is mostly one sequence per call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import torch

from refreekv.eval.data import Sample
from refreekv.eval.prefill import QUESTION_AFTER, STREAMING
from refreekv.eval.prompting import ModelInput, SplitInput, build_input
from refreekv.eval.tasks import TASKS, Task

if TYPE_CHECKING:
    from refreekv.eval.grid import GridPoint
    from refreekv.integration.stats import CompressionStats

__all__ = [
    "DecodeSettings", "Decoder", "Kept", "decode_groups", "eos_ids", "left_pad", "pad_id", "predict", "sample_record",
    "until_end",
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


@dataclass(frozen=True)
class Kept:
    """What a point kept of one sequence's prompt, as its record states it:
    `budget` and `held_budget` the fractions kept and held (means over
    layers), `kept_per_layer` the prompt rows each full-attention layer
    attends to, `fields` what the record adds (a prefill mode's details)."""

    budget: float
    held_budget: float
    kept_per_layer: list[float]
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, stats: CompressionStats, row: int = 0, **fields: Any) -> Kept:
        """Sequence `row` of the batch `stats` describes."""
        return cls(float(stats.per_sequence[row]), float(stats.held_per_sequence[row]), stats.kept[:, row].tolist(), fields)

    @classmethod
    def with_question(cls, stats: CompressionStats, row: int, question: int, **fields: Any) -> Kept:
        """A context cut alone (`stats`), then the `question` part's tokens
        fed after it, every one held: the kept and held rows of the whole prompt
        (context and question part) per layer, over its tokens, so that
        the budget is comparable with a one-forward cut's (whose window
        keeps the question too). `context_budget` is the context's own."""
        q = float(question)
        total = float(stats.prompt_tokens[row]) + q
        kept = stats.kept[:, row].double() + q
        held = stats.held[:, row].double() + q
        return cls(float((kept / total).mean()), float((held / total).mean()), kept.tolist(),
                   {**fields, "context_budget": float(stats.per_sequence[row])})  # fmt: skip


def sample_record(
    sample: Sample,
    built: ModelInput,
    new_token_ids: torch.Tensor | Sequence[int],
    tokenizer,
    stats: CompressionStats | Kept,
    row: int = 0,
) -> dict[str, Any]:
    """The prediction record of `sample`: `built` is its model input,
    `new_token_ids` the tokens generated for it (no padding) and `row` its
    sequence in the batch `stats` describes (or `stats` is that sequence's
    `Kept` already)."""
    kept = stats if isinstance(stats, Kept) else Kept.of(stats, row)
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
        "budget": kept.budget,
        "held_budget": kept.held_budget,
        # Whole numbers, unless a method keeps a different count per KV head.
        "kept_per_layer": [int(k) if float(k).is_integer() else round(k, 3) for k in kept.kept_per_layer],
        **kept.fields,
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
        """Yields (point, tokens [b, <= max_new_tokens], stats) per point,
        every one in the one-forward mode (the others: `mode_point`)."""
        import refreekv
        from refreekv.integration.branch import prefill

        others = [point.label for point in points if not point.prefill.one_forward]
        if others:
            raise ValueError(f"Decoder.points runs one-forward points; {', '.join(others)} go through mode_point")
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

    def mode_point(
        self, point: GridPoint, inputs: Sequence[SplitInput | ModelInput], settings: DecodeSettings, device
    ) -> list[tuple[torch.Tensor, Kept]]:
        """(generated tokens, `Kept`) per sequence of `inputs`, for a point
        in the question-after mode (`inputs`: `SplitInput`s) or a streaming
        mode (`ModelInput`s or `SplitInput`s), always plainly."""
        kind = point.prefill.kind
        if kind == QUESTION_AFTER:
            if not all(isinstance(item, SplitInput) for item in inputs):
                raise TypeError("a question-after point needs each input split (prompting.split_input)")
            # Questions of one length: `CompressedContext.generate` takes
            # them unpadded (contexts may be left-padded).
            run, key = self._question_after, (lambda item: item.question_tokens)
        elif kind == STREAMING:
            inputs = [item.built if isinstance(item, SplitInput) else item for item in inputs]
            run, key = self._streaming, (lambda item: item.input_ids.shape[1])
        else:
            raise ValueError(f"{point.label} is a one-forward point: Decoder.points runs it")
        groups: dict[Any, list[int]] = {}
        for row, item in enumerate(inputs):
            groups.setdefault(key(item), []).append(row)
        results: list[Optional[tuple[torch.Tensor, Kept]]] = [None] * len(inputs)
        for rows in groups.values():
            for row, result in zip(rows, run(point, [inputs[row] for row in rows], settings, device)):
                results[row] = result
        return results  # type: ignore[return-value]

    def _generate_options(self, settings: DecodeSettings) -> dict[str, Any]:
        return {"max_new_tokens": settings.max_new_tokens, "do_sample": False, "num_beams": 1, **settings.options}

    def _question_after(self, point: GridPoint, items: list[SplitInput], settings: DecodeSettings, device) -> Iterator:
        """Sequences whose question parts have one length: their contexts
        (left-padded) compressed alone, the question parts fed after them."""
        import refreekv

        contexts = [ModelInput(item.context_ids, "", item.built.truncated, item.built.chat) for item in items]
        context_ids, context_mask = left_pad(contexts, settings.pad, device)
        questions = torch.cat([item.question_ids for item in items]).to(device)
        with refreekv.patch(self.model, point.instance) as handle:
            context = handle.compress_context(context_ids, context_mask)
            output = context.generate(questions, **self._generate_options(settings))
        tokens = output[:, context_ids.shape[1] + questions.shape[1] :]
        for row, item in enumerate(items):
            kept = Kept.with_question(
                context.stats, row, item.question_tokens, context_tokens=item.context_tokens,
                question_tokens=item.question_tokens, moved_tokens=item.moved_tokens,
            )  # fmt: skip
            yield tokens[row], kept

    def _streaming(self, point: GridPoint, items: list[ModelInput], settings: DecodeSettings, device) -> Iterator:
        """Sequences of one prompt length (so no padding, and one cap),
        prefilled in pieces of the mode's chunk under a streaming patch
        (fullkv, which never cuts: exact, the same pieces)."""
        import refreekv

        mode, length = point.prefill, items[0].input_ids.shape[1]
        cap = mode.max_cache_tokens(point.instance, length)
        options = {} if point.method == "fullkv" else {"prefill": "streaming", "max_cache_tokens": cap}
        input_ids = torch.cat([item.input_ids for item in items]).to(device)
        with refreekv.patch(self.model, point.instance, **options) as handle:
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), prefill_chunk_size=mode.chunk,
                **self._generate_options(settings),
            )  # fmt: skip
        stats = handle.stats
        for row in range(len(items)):
            yield output[row, length:], Kept.of(
                stats, row, prefill_chunk=mode.chunk, pieces=mode.pieces(length), max_cache_tokens=cap
            )
