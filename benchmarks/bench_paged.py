"""Paged storage against padded storage on a real model (CPU), SPEC 10.

Model: SmolLM2-135M-Instruct (bundled GGUF, float32, sdpa attention; 9 query
and 3 KV heads), prompts cut from the bundled essays, at 4k and 8k tokens
and at 16k with linear rope x2. Methods whose KV heads keep different
counts: Coverage (its defaults, a count per KV head) and AdaKV at 50%.
Every ratio is against a baseline measured in the same process.

    python benchmarks/bench_paged.py [--quick] [--json out.json] [--lengths 4096,8192] [--plot held.png]

Figures (keys of the JSON, under `paged`, per prompt length and method):
  kept_rows, held_rows  prompt rows kept and held in memory, summed over
                        layers and KV heads, with paged storage
                        (held_over_kept: the block rounding; target <= 1.02
                        at 4k)
  kv_bytes              KV bytes in use after prefill: paged, padded, full
                        cache, and the ratios paged / padded, paged / full
  decode_tok_s          decode tokens/s (median step) with paged storage,
                        with padded storage (the same kept rows) and with
                        the full cache; ratios paged / padded (target >= 1.0
                        at 4k and 8k) and paged / full (target >= 1.1 for
                        Coverage at 8k)
  pack_share            time spent packing the kept rows into the pool /
                        the paged prefill's time (target <= 1%)
  prefill_s             prefill seconds, paged and padded (one run each)
  paged_held_bytes      (a key of its own) KV bytes after prefill
                        (full, padded, paged) per method at 1k to 8k tokens
                        (`--plot` draws them against prompt length)
It prints figures and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

import refreekv
import refreekv.integration.cache as cache_module
from bench_e2e import linear_rope, prompt_ids
from refreekv.assets import load_bundled_model

METHODS = {"coverage": {}, "adakv": {"budget": 0.5}}
CASES = [(4096, 1.0), (8192, 1.0), (16384, 2.0)]
QUICK_CASES = [(1024, 1.0), (2048, 1.0)]
HELD_LENGTHS, QUICK_HELD_LENGTHS = [1024, 2048, 4096, 6144, 8192], [512, 1024, 2048]
DECODE_STEPS, QUICK_DECODE_STEPS = 24, 8


class PackTimer:
    """Sums the time of every `pack_paged` call made while it is on."""

    def __init__(self):
        self.seconds = 0.0
        self._original = cache_module.pack_paged

    def __enter__(self):
        @functools.wraps(self._original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        cache_module.pack_paged = timed
        return self

    def __exit__(self, *exc_info):
        cache_module.pack_paged = self._original


@torch.no_grad()
def prefill_and_decode(model, ids, steps: int) -> tuple[float, float, object]:
    """(prefill seconds, decode tokens/s over the median step, cache)."""
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill_s = time.perf_counter() - start
    token = out.logits[:, -1:].argmax(-1)
    step_times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        step_times.append(time.perf_counter() - start)
    return prefill_s, 1.0 / statistics.median(step_times), out.past_key_values


def held_and_kept_rows(stats) -> tuple[float, float]:
    """Rows summed over layers (stats average over KV heads: the sums are
    per head, which is what the ratio needs)."""
    return float(stats.held.sum()), float(stats.kept.sum())


def measure(model, ids, steps: int) -> dict:
    prefill_s, full_rate, _ = prefill_and_decode(model, ids, steps)
    rows = {"full": {"prefill_s": prefill_s, "decode_tok_s": full_rate}}
    for method, options in METHODS.items():
        row: dict = {}
        for storage in ("padded", "paged"):
            with PackTimer() as packing, refreekv.patch(model, method, storage=storage, **options) as kv:
                prefill_s, rate, _ = prefill_and_decode(model, ids, steps)
            stats = kv.stats
            row[storage] = {
                "prefill_s": prefill_s, "decode_tok_s": rate, "kv_bytes": stats.kv_bytes_after,
                "kept_budget": stats.budget, "held_budget": float(stats.held_per_sequence.mean()),
                "pack_s": packing.seconds,
            }  # fmt: skip
            if storage == "paged":
                held, kept = held_and_kept_rows(stats)
                row.update(held_rows=held, kept_rows=kept, held_over_kept=held / kept, full_kv_bytes=stats.kv_bytes_before)
        paged, padded = row["paged"], row["padded"]
        row.update(
            kv_bytes_paged_over_padded=paged["kv_bytes"] / padded["kv_bytes"],
            kv_bytes_paged_over_full=paged["kv_bytes"] / row["full_kv_bytes"],
            kv_bytes_padded_over_full=padded["kv_bytes"] / row["full_kv_bytes"],
            decode_paged_over_padded=paged["decode_tok_s"] / padded["decode_tok_s"],
            decode_paged_over_full=paged["decode_tok_s"] / full_rate,
            pack_share=paged["pack_s"] / paged["prefill_s"],
        )
        rows[method] = row
    return rows


@torch.no_grad()
def held_bytes(model, tokenizer, lengths: list[int]) -> dict:
    """KV bytes after prefill, per prompt length: the full cache's and, per
    method, the padded and the paged cache's (no decoding)."""
    rows = {}
    for tokens in lengths:
        ids = prompt_ids(tokenizer, tokens)
        row = {}
        for method, options in METHODS.items():
            for storage in ("padded", "paged"):
                with refreekv.patch(model, method, storage=storage, **options) as kv:
                    model(input_ids=ids, use_cache=True)
                row[f"{method}_{storage}"] = kv.stats.kv_bytes_after
                row["full"] = kv.stats.kv_bytes_before
        rows[str(tokens)] = row
        print(f"  held KV MiB at {tokens} tokens: " + "  ".join(f"{k} {v / 2**20:.2f}" for k, v in row.items()), flush=True)
    return rows


def plot(held: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [int(t) for t in held]
    figure, axes = plt.subplots(1, len(METHODS), figsize=(5 * len(METHODS), 4), sharey=True)
    for axis, method in zip(axes, METHODS):
        axis.plot(tokens, [row["full"] / 2**20 for row in held.values()], "k--", label="full cache")
        for storage, style in (("padded", "o-"), ("paged", "s-")):
            axis.plot(tokens, [row[f"{method}_{storage}"] / 2**20 for row in held.values()], style, label=storage)
        axis.set(title=f"{method}: KV held after prefill", xlabel="prompt tokens", ylabel="MiB (30 layers, float32)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def print_rows(tokens: int, rope: str, rows: dict) -> None:
    full = rows["full"]
    print(f"  {tokens} tokens, rope {rope}: full cache decode {full['decode_tok_s']:.2f} tok/s, prefill {full['prefill_s']:.2f} s")
    for method in METHODS:
        r = rows[method]
        print(
            f"    {method:<9} kept {r['paged']['kept_budget']:6.1%}  held paged {r['paged']['held_budget']:6.1%} "
            f"padded {r['padded']['held_budget']:6.1%}  held/kept {r['held_over_kept']:.4f}  "
            f"KV paged/padded {r['kv_bytes_paged_over_padded']:.3f} paged/full {r['kv_bytes_paged_over_full']:.3f} "
            f"padded/full {r['kv_bytes_padded_over_full']:.3f}  decode paged/padded {r['decode_paged_over_padded']:.3f} "
            f"paged/full {r['decode_paged_over_full']:.3f}  pack {r['pack_share']:.3%} of prefill"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 2k tokens, fewer decode steps (a smoke run)")
    parser.add_argument("--lengths", help="comma-separated prompt lengths (16384 runs with linear rope x2)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--plot", help="write the plot of KV bytes held against prompt length to this PNG")
    args = parser.parse_args()
    cases = QUICK_CASES if args.quick else CASES
    if args.lengths:
        cases = [(int(n), 2.0 if int(n) > 8192 else 1.0) for n in args.lengths.split(",")]
    steps = QUICK_DECODE_STEPS if args.quick else DECODE_STEPS
    model, tokenizer = load_bundled_model()
    print(f"paged: paged vs padded storage, SmolLM2-135M-Instruct, {torch.get_num_threads()} threads, {steps} decode steps")
    results = {}
    for tokens, factor in cases:
        ids = prompt_ids(tokenizer, tokens)
        case_model = model if factor == 1.0 else load_bundled_model(rope_parameters=linear_rope(model, factor))[0]
        rope = "default" if factor == 1.0 else f"linear x{factor:g}"
        rows = measure(case_model, ids, steps)
        rows["rope"] = rope
        print_rows(tokens, rope, rows)
        results[str(tokens)] = rows
    held = held_bytes(model, tokenizer, QUICK_HELD_LENGTHS if args.quick else HELD_LENGTHS)
    if args.plot:
        plot(held, args.plot)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"paged": results, "paged_held_bytes": held}, out, indent=2)


if __name__ == "__main__":
    main()
