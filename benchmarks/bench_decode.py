"""Decode-time compression on a real model (CPU): bounded KV memory for long
generations (SPEC 8, `recompress_every`).

Model: SmolLM2-135M-Instruct (bundled GGUF, float32, sdpa attention), greedy.

    python benchmarks/bench_decode.py [--quick] [--json out.json] [--plot out.png]

Two runs per configuration, each with a baseline measured in the same process:

  long generation  a short chat prompt (an essay opening and a request to
                   continue it, < 512 tokens), 4096 generated tokens with
                   the end-of-turn token suppressed; per configuration: KV
                   bytes held at the end and at the peak, in the rows held
                   and in the buffers allocated under them (ratio to the
                   full cache), decode tokens/s over the whole generation (ratio
                   to the full cache), the share of generation time spent
                   in compression events, and the tokens identical to the
                   full-cache generation before the first divergence;
  recall           the model writes a numbered list of made-up names it
                   invents itself, then is asked, in a second turn, which
                   name was number k; the answer is scored against the
                   model's own item k. It needs text generated long before
                   the question, which decode-time cuts may have evicted.

Configurations: the full cache; ReFreeKV (paper defaults) re-cutting every
64 and every 256 tokens; StreamingLLM and SnapKV capped at 1024 rows per
layer, re-cutting every 256 tokens (prefill budget 1.0: the short prompt is
kept whole). It prints figures and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time

import torch

import refreekv
from refreekv.assets import load_bundled_model
from refreekv.haystack import essays
from refreekv.integration.stats import kv_memory

CONFIGS = {
    "full cache": None,
    "refreekv every 64": ("refreekv", {"recompress_every": 64}),
    "refreekv every 256": ("refreekv", {"recompress_every": 256}),
    "streamingllm cap 1024": ("streamingllm", {"budget": 1.0, "recompress_every": 256, "max_cache_tokens": 1024}),
    "snapkv cap 1024": ("snapkv", {"budget": 1.0, "recompress_every": 256, "max_cache_tokens": 1024}),
}
RECALL_ITEMS = 120
RECALL_QUESTIONS = (3, 15, 40, 70, 100)


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]


def long_prompt(tokenizer) -> torch.Tensor:
    opening = " ".join(essays()[0].split()[:250])
    return chat_ids(tokenizer, f"{opening}\n\nContinue this essay at length, in the same voice, section after section.")


def held_rows(cache) -> tuple[int, int, float]:
    """(KV bytes in the rows held, KV bytes allocated (the buffers under
    them, headroom included), rows held per layer on average)."""
    memory = kv_memory(cache)
    rows = sum(cache.layers[index].keys.shape[2] for index in memory.layers) / len(memory.layers)
    return memory.in_use_bytes, memory.allocated_bytes, rows


@torch.no_grad()
def generate(model, ids: torch.Tensor, new_tokens: int, *, stop: int | None = None, cache=None, trace: bool = False):
    """Greedy tokens from a hand-written loop (so every step is observed):
    (tokens, cache, decode seconds, per-step `held_rows`)). `stop` ends at that token; None never stops."""
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    tokens, steps, start = [token], [], time.perf_counter()
    for _ in range(new_tokens - 1):
        if stop is not None and int(token) == stop:
            break
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
        if trace:
            steps.append(held_rows(out.past_key_values))
    seconds = time.perf_counter() - start
    return torch.cat(tokens, dim=1)[0], out.past_key_values, seconds, steps


class EventClock:
    """Wall time spent in a patch's decode-time events (benchmark
    instrumentation: wraps the handle's event method)."""

    def __init__(self, handle):
        self.seconds = 0.0
        run = handle._recompress

        def timed():
            start = time.perf_counter()
            run()
            self.seconds += time.perf_counter() - start

        handle._recompress = timed


def patched(model, config):
    if config is None:
        return None
    method, options = config
    return refreekv.patch(model, method, **options)


def long_generation(model, tokenizer, new_tokens: int) -> dict:
    ids = long_prompt(tokenizer)
    model.generation_config.eos_token_id = None
    print(f"long generation: {ids.shape[1]}-token prompt, {new_tokens} generated tokens, greedy, end of turn suppressed")
    results, reference = {}, None
    for name, config in CONFIGS.items():
        handle = patched(model, config)
        clock = EventClock(handle) if handle is not None else None
        try:
            tokens, cache, seconds, trace = generate(model, ids, new_tokens, trace=True)
            events = len(handle.timeline.events) if handle is not None else 0
        finally:
            if handle is not None:
                handle.remove()
        final_bytes, final_allocated, _ = held_rows(cache)
        row = {
            "final_kv_bytes": final_bytes,
            "peak_kv_bytes": max(used for used, _, _ in trace),
            "final_kv_allocated": final_allocated,
            "peak_kv_allocated": max(allocated for _, allocated, _ in trace),
            "decode_tok_s": (len(tokens) - 1) / seconds,
            "event_seconds": clock.seconds if clock else 0.0,
            "event_share": (clock.seconds / seconds) if clock else 0.0,
            "events": events,
            "rows_trace": [round(rows, 2) for _, _, rows in trace],
        }
        if reference is None:
            reference = (tokens, row)
        else:
            full_tokens, full = reference
            agree = (tokens != full_tokens).nonzero()
            row["identical_prefix"] = int(agree[0]) if len(agree) else len(tokens)
            row["identical_prefix_share"] = row["identical_prefix"] / len(tokens)
            row["final_kv_ratio"] = final_bytes / full["final_kv_bytes"]
            row["peak_kv_ratio"] = row["peak_kv_bytes"] / full["peak_kv_bytes"]
            row["final_kv_allocated_ratio"] = final_allocated / full["final_kv_allocated"]
            row["peak_kv_allocated_ratio"] = row["peak_kv_allocated"] / full["peak_kv_allocated"]
            row["throughput_ratio"] = row["decode_tok_s"] / full["decode_tok_s"]
        results[name] = row
        extra = "" if row is reference[1] else (
            f"  final KV {row['final_kv_ratio']:.3f} (allocated {row['final_kv_allocated_ratio']:.3f})  "
            f"peak KV {row['peak_kv_ratio']:.3f} (allocated {row['peak_kv_allocated_ratio']:.3f})  tok/s ratio {row['throughput_ratio']:.3f}  "
            f"events {row['events']} ({row['event_share']:.2%} of the time)  identical prefix {row['identical_prefix']}"
        )  # fmt: skip
        print(f"  {name:<22} {row['decode_tok_s']:6.1f} tok/s  final KV {final_bytes / 2**20:7.1f} MiB{extra}", flush=True)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return results


def numbered_items(text: str) -> dict[int, str]:
    items = {}
    for number, item in re.findall(r"^\s*(\d+)[.)]\s*(.+?)\s*$", text, re.M):
        items.setdefault(int(number), item.strip().lower())
    return items


def recall(model, tokenizer, list_tokens: int) -> dict:
    """Item-k recall from the model's own generated list, per configuration."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = chat_ids(tokenizer, f"Write a numbered list of {RECALL_ITEMS} made-up names for new planets, one per line, numbers 1 to {RECALL_ITEMS}.")
    print(f"recall: a list of up to {RECALL_ITEMS} invented names ({list_tokens} tokens at most), then 'which was number k?'")
    results = {}
    for name, config in CONFIGS.items():
        handle = patched(model, config)
        try:
            tokens, cache, _, _ = generate(model, ids, list_tokens, stop=end)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            items = numbered_items(text)
            asked, correct, answers = 0, 0, {}
            for k in RECALL_QUESTIONS:
                if k not in items:
                    continue
                turn = f"<|im_end|>\n<|im_start|>user\nWhat was name number {k} on your list? Answer with the name only.<|im_end|>\n<|im_start|>assistant\n"
                question = tokenizer(turn, return_tensors="pt", add_special_tokens=False)["input_ids"]
                if int(tokens[-1]) == end:
                    question = question[:, 1:]  # the list already ended its turn
                answer_ids, _, _, _ = generate(model, question, 16, stop=end, cache=copy.deepcopy(cache))
                answer = tokenizer.decode(answer_ids, skip_special_tokens=True).strip().lower()
                asked += 1
                correct += items[k] in answer or answer.rstrip(".") in items[k] and len(answer) > 2
                answers[k] = {"expected": items[k], "answer": answer}
        finally:
            if handle is not None:
                handle.remove()
        results[name] = {"list_tokens": len(tokens), "items": len(items), "asked": asked, "correct": correct,
                         "accuracy": correct / asked if asked else float("nan"), "answers": answers}  # fmt: skip
        print(f"  {name:<22} list of {len(items)} items in {len(tokens)} tokens; recalled {correct}/{asked}", flush=True)
    return results


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name, row in results["long_generation"].items():
        axis.plot(range(1, len(row["rows_trace"]) + 1), row["rows_trace"], label=name, linewidth=1.2)
    axis.set(title="KV rows held per layer (mean of 30) while generating, SmolLM2-135M", xlabel="generated tokens", ylabel="rows held")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description="Decode-time compression on SmolLM2-135M (CPU)")
    parser.add_argument("--quick", action="store_true", help="short generations (a smoke run)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--plot", help="write the rows-held plot to this PNG")
    args = parser.parse_args()
    model, tokenizer = load_bundled_model()
    new_tokens, list_tokens = (320, 160) if args.quick else (4096, 1536)
    results = {
        "model": "SmolLM2-135M-Instruct (float32, sdpa)",
        "new_tokens": new_tokens,
        "configs": {name: config for name, config in CONFIGS.items()},
        "long_generation": long_generation(model, tokenizer, new_tokens),
        "recall": recall(model, tokenizer, list_tokens),
    }
    if args.plot:
        plot(results, args.plot)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"decode_compression": results}, out, indent=2)


if __name__ == "__main__":
    main()
