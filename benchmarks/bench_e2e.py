"""End-to-end costs and savings of KV compression on a real model (CPU).

Model: SmolLM2-135M-Instruct (bundled GGUF, float32, sdpa attention), prompts
cut from the bundled essays. Every figure is a ratio against a baseline
measured in the same process (median over repeats), except peak memory,
which each configuration measures in a fresh process (peak RSS is a
process-wide high-water mark).

    python benchmarks/bench_e2e.py [--quick] [--json out.json]

Figures (keys of the JSON):
  prefill_overhead   prefill time with ReFreeKV (and Coverage) patched / unpatched
  kv_bytes           per method, KV bytes in use and allocated / full
                     cache, after prefill (the patch's stats) and after 16
                     greedy tokens (`kv_memory`, against the unpatched
                     cache at the same step), next to the budget the patch
                     reports
  decode_speedup     decode tokens/s with the compressed cache / full cache,
                     with the budget kept; past the model's 8192 trained
                     positions with linear rope interpolation
  peak_memory_ratio  peak RSS growth during prefill, patched / unpatched
  reference_ratios   the authors' released-code way (eager attention that
                     materializes every attention matrix, KV repeated to all
                     query heads before caching) against ours
It prints figures and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

import refreekv
from proc_status import reset_peak_rss, status_bytes
from refreekv import reference
from refreekv.assets import load_bundled_model
from refreekv.haystack import essays
from refreekv.integration.stats import kv_memory

THRESHOLD = 0.01
NUM_SINKS = 4
PROTECTED = (0, 1)
REFERENCE_TOKENS, REFERENCE_TOKENS_QUICK = 2048, 512
# Decoded tokens after which kv_bytes reads the cache again: compressed
# layers reserve their free rows on the first append, after the stats.
KV_DECODE_STEPS = 16


def prompt_ids(tokenizer, tokens: int) -> torch.Tensor:
    """[1, tokens] ids of essay text (repeated if the essays are too short)."""
    text = " ".join(essays())
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    while ids.numel() < tokens:
        ids = torch.cat([ids, ids])
    return ids[:tokens][None, :]


@torch.no_grad()
def prefill(model, ids):
    return model(input_ids=ids, use_cache=True)


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_prefill(model, ids, repeats: int, method=None, **options) -> float:
    if method is None:
        return median_seconds(lambda: prefill(model, ids), repeats)
    with refreekv.patch(model, method, **options):
        return median_seconds(lambda: prefill(model, ids), repeats)


def paired_prefill(model, ids, repeats: int, settings: dict[str, tuple[str, dict]]) -> dict:
    """Prefill seconds of the unpatched model and of each named setting
    ({name: (method, options)}), timed in rounds: every round times the
    unpatched model and each setting once. A 2-core machine that slows
    down or speeds up during the run then weighs on all of them alike;
    timing each one's repeats in a block let that drift pass for overhead
    (ratios from 0.94 to 1.10 for settings that do the same extra work).
    The order turns by one place every round, so no setting is always
    timed first or last; each timing follows a 64-token prefill under the
    same patch (or none). Returns unpatched_s (median seconds) and, per
    setting, its median seconds and the median of its per-round ratios to
    unpatched (not the ratio of the medians)."""
    order = [None, *settings]
    base, times = [], {name: [] for name in settings}
    for round_index in range(repeats):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            if name is None:
                prefill(model, ids[:, :64])
                base.append(median_seconds(lambda: prefill(model, ids), 1))
                continue
            method, options = settings[name]
            with refreekv.patch(model, method, **options):
                prefill(model, ids[:, :64])
                times[name].append(median_seconds(lambda: prefill(model, ids), 1))
    result = {"unpatched_s": statistics.median(base)}
    for name, seconds in times.items():
        ratios = [s / b for s, b in zip(seconds, base)]
        result[name] = {"seconds": statistics.median(seconds), "ratio": statistics.median(ratios)}
    return result


def measure_prefill_overhead(model, tokenizer, sizes: list[int], repeats: int) -> dict:
    """Per prompt size, prefill time patched with ReFreeKV and with Coverage
    (their defaults) against unpatched, timed in rounds (`paired_prefill`)."""
    print("prefill_overhead: patched / unpatched prefill time (median of %d rounds)" % repeats)
    results = {}
    for tokens in sizes:
        ids = prompt_ids(tokenizer, tokens)
        prefill(model, ids[:, :64])
        timed = paired_prefill(model, ids, repeats, {"refreekv": ("refreekv", {}), "coverage": ("coverage", {})})
        base, ours, coverage = timed["unpatched_s"], timed["refreekv"]["seconds"], timed["coverage"]["seconds"]
        results[str(tokens)] = {"unpatched_s": base, "refreekv_s": ours, "ratio": timed["refreekv"]["ratio"],
                                "coverage_s": coverage, "coverage_ratio": timed["coverage"]["ratio"]}  # fmt: skip
        row = results[str(tokens)]
        print(f"  {tokens:>6} tokens  unpatched {base:7.2f} s  refreekv {ours:7.2f} s  ratio {row['ratio']:.3f}  "
              f"coverage {coverage:7.2f} s  ratio {row['coverage_ratio']:.3f}")
    return results


@torch.no_grad()
def decode_rate(model, ids, new_tokens: int, method=None, **options) -> tuple[float, float]:
    """(decode tokens per second, kept budget) after one prefill, which is
    not timed. The rate is one over the median step time over `new_tokens`
    steps, so one slow step (a page fault, another process) does not move it."""

    def run():
        out = prefill(model, ids)
        token = out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(new_tokens):
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - start)
        return 1.0 / statistics.median(steps)

    if method is None:
        return run(), 1.0
    with refreekv.patch(model, method, **options) as kv:
        return run(), kv.stats.budget


def linear_rope(model, factor: float) -> dict:
    """Rope parameters that interpolate positions `factor` times more densely."""
    return {**model.config.rope_parameters, "rope_type": "linear", "factor": factor}


@torch.no_grad()
def decoded_cache(model, ids, steps: int):
    """The cache after prefill and `steps` greedy decode steps."""
    out = prefill(model, ids)
    for _ in range(steps):
        out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    return out.past_key_values


def kv_bytes(model, ids, methods: dict[str, dict], decode_steps: int = 0) -> dict[str, dict]:
    """Per method, the KV bytes in use and allocated after prefill / the
    full cache's, with the budget reported; with `decode_steps`, also after
    that many greedy tokens / the unpatched cache's after as many."""
    full = kv_memory(decoded_cache(model, ids, decode_steps)) if decode_steps else None
    rows = {}
    for name, options in methods.items():
        with refreekv.patch(model, name, **options) as kv:
            cache = decoded_cache(model, ids, decode_steps)
        stats = kv.stats
        rows[name] = {
            "kv_bytes_ratio": stats.kv_bytes_ratio,
            "kv_allocated_ratio": stats.kv_allocated_ratio,
            "reported_budget": stats.budget,
            "padding_bytes": stats.kv_padding_bytes,
            "kv_mib": stats.kv_bytes_after / 2**20,
            "kv_allocated_mib": stats.kv_bytes_allocated / 2**20,
        }
        if full is not None:
            decoded = kv_memory(cache)
            rows[name].update(
                decode_steps=decode_steps,
                decoded_kv_bytes_ratio=decoded.in_use_bytes / full.in_use_bytes,
                decoded_kv_allocated_ratio=decoded.allocated_bytes / full.allocated_bytes,
            )
    return rows


@torch.no_grad()
def released_code_prefill(model, ids) -> int:
    """The same pruning (positional ranking, T, sinks, protected layers) done
    the way the authors' released code does it: eager attention returning
    every layer's full attention matrix, the stopping rule searched with
    flip / cumsum / sqrt / mean over heads / where / max, and the kept KV
    repeated to all query heads before caching. Returns the KV bytes held."""
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        out = model(input_ids=ids, use_cache=True, output_attentions=True)
        held = 0
        for layer_idx, (attention, layer) in enumerate(zip(out.attentions, out.past_key_values.layers)):
            keys = layer.keys.repeat_interleave(groups, dim=1)
            values = layer.values.repeat_interleave(groups, dim=1)
            if layer_idx not in PROTECTED:
                row = attention[:, :, -1, :].clone()
                row[..., :NUM_SINKS] = 0  # sinks are kept and excluded from the norm
                recent = int(reference.released_code_keep_count(row.flip(-1), THRESHOLD)[0])
                keys = torch.cat([keys[:, :, :NUM_SINKS], keys[:, :, -recent:]], dim=2)
                values = torch.cat([values[:, :, :NUM_SINKS], values[:, :, -recent:]], dim=2)
            held += keys.nbytes + values.nbytes
        return held
    finally:
        config._attn_implementation = previous


def peak_prefill_growth(mode: str, tokens: int) -> int:
    """Peak RSS growth (bytes) of one prefill, measured in a fresh process."""
    command = [sys.executable, __file__, "--peak-worker", mode, "--tokens", str(tokens)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_growth_bytes"]


def _peak_worker(mode: str, tokens: int) -> None:
    model, tokenizer = load_bundled_model()
    ids = prompt_ids(tokenizer, tokens)
    prefill(model, ids[:, :64])  # warm up lazily initialised libraries
    # Loading the model peaks higher than a prefill; reset the high-water
    # mark (Linux: clear_refs 5) so the peak read below is the prefill's.
    reset_peak_rss()
    before = status_bytes("VmRSS")
    if mode == "unpatched":
        prefill(model, ids)
    elif mode == "refreekv":
        with refreekv.patch(model):
            prefill(model, ids)
    elif mode == "released":
        released_code_prefill(model, ids)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    print(json.dumps({"peak_growth_bytes": status_bytes("VmHWM") - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description="End-to-end KV compression figures on SmolLM2-135M (CPU)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (a smoke run)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--peak-worker", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_worker:
        _peak_worker(args.peak_worker, args.tokens)
        return

    prefill_sizes = [512, 1024] if args.quick else [1024, 4096, 8192]
    decode_cases = [(512, 1.0), (1024, 2.0)] if args.quick else [(8192, 1.0), (16384, 2.0)]
    repeats = 1 if args.quick else 3
    new_tokens = 8 if args.quick else 32
    model, tokenizer = load_bundled_model()
    results: dict = {"model": "SmolLM2-135M-Instruct (float32, sdpa)", "threads": torch.get_num_threads()}

    results["prefill_overhead"] = measure_prefill_overhead(model, tokenizer, prefill_sizes, repeats)

    tokens = prefill_sizes[-1] if args.quick else 4096
    ids = prompt_ids(tokenizer, tokens)
    methods = {"refreekv": {}, "coverage": {}, "streamingllm": {"budget": 0.5}, "h2o": {"budget": 0.5}, "snapkv": {"budget": 0.5}, "pyramidkv": {"budget": 0.5}}
    results["kv_bytes"] = kv_bytes(model, ids, methods, KV_DECODE_STEPS)
    print(f"kv_bytes at {tokens} tokens: bytes in use / allocated vs the full cache, after prefill and after {KV_DECODE_STEPS} "
          "decoded tokens, and the reported budget")  # fmt: skip
    for name, row in results["kv_bytes"].items():
        print(
            f"  {name:<13} prefill {row['kv_bytes_ratio']:.4f} / {row['kv_allocated_ratio']:.4f}  "
            f"decoded {row['decoded_kv_bytes_ratio']:.4f} / {row['decoded_kv_allocated_ratio']:.4f}  "
            f"reported budget {row['reported_budget']:.4f}  padding {row['padding_bytes']} B"
        )

    # SmolLM2 was trained on 8192 positions. Past them its attention spreads
    # out and ReFreeKV keeps nearly everything (measured below as
    # budget_without_scaling), so the longer context runs the same weights
    # with linear rope interpolation, which keeps every position in range.
    print(f"decode_speedup: decode tokens/s with the ReFreeKV cache / full cache (median step of {new_tokens})")
    results["decode_speedup"] = {}
    for tokens, factor in decode_cases:
        ids = prompt_ids(tokenizer, tokens)
        row: dict = {"rope": "default" if factor == 1 else f"linear x{factor:g}"}
        if factor == 1:
            decode_model = model
        else:
            row["budget_without_scaling"] = kv_bytes(model, ids, {"refreekv": {}})["refreekv"]["reported_budget"]
            decode_model, _ = load_bundled_model(rope_parameters=linear_rope(model, factor))
        full, _ = decode_rate(decode_model, ids, new_tokens)
        ours, budget = decode_rate(decode_model, ids, new_tokens, "refreekv")
        row.update(full_tok_s=full, refreekv_tok_s=ours, ratio=ours / full, budget=budget)
        results["decode_speedup"][str(tokens)] = row
        del decode_model
        extra = f"  (default rope would keep {row['budget_without_scaling']:.1%})" if factor != 1 else ""
        print(
            f"  {tokens:>6} tokens, rope {row['rope']:<9} kept {budget:6.1%}  full {full:6.2f} tok/s  "
            f"refreekv {ours:6.2f} tok/s  speedup {ours / full:.3f}{extra}"
        )

    tokens = prefill_sizes[-1]
    print(f"peak_memory_ratio: peak RSS growth during a {tokens}-token prefill, fresh process each")
    unpatched, ours = peak_prefill_growth("unpatched", tokens), peak_prefill_growth("refreekv", tokens)
    results["peak_memory_ratio"] = {
        "tokens": tokens,
        "unpatched_mib": unpatched / 2**20,
        "refreekv_mib": ours / 2**20,
        "ratio": ours / unpatched,
    }
    print(f"  unpatched {unpatched / 2**20:8.1f} MiB  refreekv {ours / 2**20:8.1f} MiB  ratio {ours / unpatched:.3f}")

    # The released code returns every layer's n x n attention matrix
    # (30 x 9 heads x n^2 floats: 72 GiB at 8192 tokens), so it is compared
    # at a length that fits in memory.
    tokens = REFERENCE_TOKENS_QUICK if args.quick else REFERENCE_TOKENS
    ids = prompt_ids(tokenizer, tokens)
    released_s = median_seconds(lambda: released_code_prefill(model, ids), repeats)
    released_bytes = released_code_prefill(model, ids)
    ours_s = time_prefill(model, ids, repeats, "refreekv")
    ours_bytes = kv_bytes(model, ids, {"refreekv": {}})["refreekv"]["kv_mib"] * 2**20
    released_peak, ours_peak = peak_prefill_growth("released", tokens), peak_prefill_growth("refreekv", tokens)
    results["reference_ratios"] = {
        "tokens": tokens,
        "released_prefill_s": released_s,
        "refreekv_prefill_s": ours_s,
        "time_ratio": released_s / ours_s,
        "released_peak_mib": released_peak / 2**20,
        "refreekv_peak_mib": ours_peak / 2**20,
        "peak_memory_ratio": released_peak / ours_peak,
        "released_kv_mib": released_bytes / 2**20,
        "refreekv_kv_mib": ours_bytes / 2**20,
        "kv_bytes_ratio": released_bytes / ours_bytes,
    }
    ref = results["reference_ratios"]
    print(f"reference_ratios at {tokens} tokens (released-code way / ours):")
    print(f"  prefill time {released_s:.2f} s / {ours_s:.2f} s = {ref['time_ratio']:.2f}x")
    print(f"  peak memory  {ref['released_peak_mib']:.1f} / {ref['refreekv_peak_mib']:.1f} MiB = {ref['peak_memory_ratio']:.2f}x")
    print(f"  KV bytes     {ref['released_kv_mib']:.2f} / {ref['refreekv_kv_mib']:.2f} MiB = {ref['kv_bytes_ratio']:.2f}x")

    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
