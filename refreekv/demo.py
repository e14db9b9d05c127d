"""The main job: a question about a fact planted in a few thousand tokens of
real essays, answered by SmolLM2-135M-Instruct with the full cache, with
ReFreeKV (the paper's rule), with Coverage (the threshold-free setting
that keeps a count per KV head, held in paged storage), and with two
fixed-budget baselines (SnapKV, and AdaKV, which splits the same budget
unevenly across heads).

    python -m refreekv.demo [--tokens 3000] [--baseline snapkv] [--budget 0.5] [--plot kept.png]

For each method it prints the prompt share kept (attended to) and held in
memory, the KV MiB held, the answer, whether it equals the full-cache
answer, and the prefill and decode times; it writes a PNG of the per-layer
kept fractions.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Optional

import torch

import refreekv
from refreekv.assets import load_bundled_model, needle_tasks
from refreekv.integration import CompressionStats

__all__ = ["Answer", "answer", "main"]


@dataclass(frozen=True)
class Answer:
    text: str
    stats: Optional[CompressionStats]
    prefill_seconds: float
    decode_seconds: float
    new_tokens: int


@torch.no_grad()
def answer(model, tokenizer, messages, method: str = "fullkv", max_new_tokens: int = 24, **options) -> Answer:
    """Greedy answer to a chat, with the KV cache compressed by `method`.

    Prefill and decoding are timed apart, with a hand-written decoding loop
    (the same cache path `generate` uses)."""
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    end_of_turn = tokenizer.eos_token_id
    with refreekv.patch(model, method, **options) as kv:
        start = time.perf_counter()
        out = model(**inputs, use_cache=True)
        prefill = time.perf_counter() - start
        tokens = []
        start = time.perf_counter()
        token = out.logits[:, -1:].argmax(-1)
        while len(tokens) < max_new_tokens and int(token) != end_of_turn:
            tokens.append(int(token))
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - start
        stats = kv.stats
    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return Answer(text, stats, prefill, decode, len(tokens))


def plot_kept(per_method: dict[str, CompressionStats], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4))
    for name, stats in per_method.items():
        fractions = stats.per_layer[:, 0].numpy()
        axes.plot(range(len(fractions)), 100 * fractions, marker="o", label=f"{name} (mean {100 * stats.budget:.1f}%)")
    axes.set_xlabel("layer")
    axes.set_ylabel("prompt KV kept (%)")
    axes.set_ylim(0, 105)
    axes.set_title("Per-layer kept fraction, SmolLM2-135M-Instruct")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=3000, help="haystack size in tokens (default 3000)")
    parser.add_argument("--threshold", type=float, default=0.01, help="ReFreeKV threshold T (default 0.01)")
    parser.add_argument("--baseline", default="snapkv", help="fixed-budget baseline (default snapkv)")
    parser.add_argument("--budget", type=float, default=0.5, help="baseline budget fraction (default 0.5)")
    parser.add_argument("--plot", default="demo_kept_per_layer.png", help="where to write the per-layer PNG")
    args = parser.parse_args(argv)

    model, tokenizer = load_bundled_model()
    task = needle_tasks(tokenizer, context_tokens=args.tokens, count=1)[0]
    methods = {
        "fullkv": {},
        "refreekv": {"threshold": args.threshold},
        "coverage": {"storage": "paged"},
        args.baseline: {"budget": args.budget},
        "adakv": {"budget": args.budget},
    }
    print(f"model: SmolLM2-135M-Instruct (GGUF, float32), {torch.get_num_threads()} threads")
    print(f"question: {task.question}  (planted answer: {task.answer})")
    results = {name: answer(model, tokenizer, task.messages(), name, **options) for name, options in methods.items()}
    full = results["fullkv"]
    prompt_tokens = int(full.stats.prompt_tokens[0])
    print(f"prompt: {prompt_tokens} tokens\n")
    header = f"{'method':<14}{'kept':>8}{'held':>8}{'KV MiB':>9}{'same as full':>14}{'prefill s':>11}{'decode tok/s':>14}  answer"
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        rate = result.new_tokens / result.decode_seconds if result.decode_seconds > 0 else float("nan")
        print(
            f"{name:<14}{100 * result.stats.budget:>7.2f}%{100 * float(result.stats.held_per_sequence[0]):>7.2f}%"
            f"{result.stats.kv_bytes_after / 2**20:>9.2f}"
            f"{str(result.text == full.text):>14}{result.prefill_seconds:>11.2f}{rate:>14.1f}  {result.text!r}"
        )
    plot_kept({name: results[name].stats for name in methods if name != "fullkv"}, args.plot)
    print(
        "\nkept: prompt rows attended to; held: prompt rows in memory (paged storage: each KV head at its own count,"
        " plus the unused rows of its last block; padded storage: every head at the largest)"
    )
    print(f"per-layer kept fractions written to {args.plot}")


if __name__ == "__main__":
    main()
