"""Offline fixtures for the LongBench tests: a byte-level BPE tokenizer
trained in memory on the bundled essays (with a chat template and a BOS
token, like a Llama tokenizer), a tiny random Llama of its vocabulary, and
LongBench-format task files."""

from __future__ import annotations

import json
import random
from pathlib import Path


TOKENIZER_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def essay_words() -> list[str]:
    from refreekv.haystack import essays

    return " ".join(essays()[:6]).split(" ")


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = essay_words()
    texts = [" ".join(words[i : i + 200]) for i in range(0, 40000, 200)]
    texts += ["请判断给定新闻的类别，下面是一些例子。阅读以下文字并用中文简短回答：北京 上海 段落"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = TOKENIZER_CHAT_TEMPLATE
    return fast


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A 4-layer random Llama (GQA 4/2) with the in-memory tokenizer, saved
    as a local model folder."""
    from integration_models import tiny_model

    tokenizer = build_tokenizer()
    model = tiny_model(
        "llama",
        "sdpa",
        seed=seed,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _sample(task: str, index: int, context: str, question: str, answers: list[str], classes=None) -> dict:
    return {
        "input": question,
        "context": context,
        "answers": answers,
        "length": len(context.split()),
        "dataset": task,
        "language": "en",
        "all_classes": classes,
        "_id": f"{task}-{index:03d}",
    }


TREC_CLASSES = ["Human being", "Location", "Description of something", "Number of something"]


def write_fixture_data(folder: Path, per_task: int = 3, seed: int = 0) -> dict[str, Path]:
    """Small LongBench-format files for four tasks covering chat and raw
    prompts, each metric family and (on some samples) middle truncation."""
    rng = random.Random(seed)
    words = essay_words()
    folder.mkdir(parents=True, exist_ok=True)

    def stretch(n):
        start = rng.randrange(0, len(words) - n)
        return " ".join(words[start : start + n])

    data = {"hotpotqa": [], "trec": [], "passage_count": [], "lcc": []}
    for i in range(per_task):
        size = 60 + 90 * i  # the last ones exceed a 256-token max input length
        data["hotpotqa"].append(_sample("hotpotqa", i, f"Passage 1:\n{stretch(size)}", "Who wrote the essays?", ["Paul Graham"]))
        examples = "\n".join(f"Question: {stretch(8)}?\nType: {rng.choice(TREC_CLASSES)}" for _ in range(3 + 4 * i))
        data["trec"].append(_sample("trec", i, examples, "Question: Where is it?\nType:", ["Location"], TREC_CLASSES))
        paragraphs = [stretch(20 + 10 * i) for _ in range(2 + i)]
        order = paragraphs + paragraphs[:1]
        context = "\n\n".join(f"Paragraph {k + 1}: {p}" for k, p in enumerate(order))
        data["passage_count"].append(_sample("passage_count", i, context, "", [str(len(paragraphs))]))
        code = "\n".join(f"def f{k}(x):\n    return x + {k}" for k in range(4 + 6 * i)) + "\n"
        data["lcc"].append(_sample("lcc", i, code, "", [f"def f{4 + 6 * i}(x):"]))
    paths = {}
    for task, samples in data.items():
        path = folder / f"{task}.jsonl"
        path.write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")
        paths[task] = path
    return paths


def with_settings(values: dict, overrides: dict) -> dict:
    """A request's keyword arguments: `values` with `overrides`, those that
    name a ModelSettings field going to its `settings` (one thread and no
    progress bar unless overridden)."""
    from dataclasses import fields

    from refreekv.eval.models import ModelSettings

    names = {f.name for f in fields(ModelSettings)}
    settings = {"threads": 1, "progress": False, **{k: v for k, v in overrides.items() if k in names}}
    return {**values, **{k: v for k, v in overrides.items() if k not in names}, "settings": ModelSettings(**settings)}


def markdown_tables(text):
    """Each markdown table of `text` as {first cell: [other cells]}, with its header."""
    tables, current = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if current is None:
            current = {"header": cells, "rows": {}}
            tables.append(current)
        elif not set(cells[0]) <= {"-"}:
            current["rows"][cells[0]] = cells[1:]
    return tables
