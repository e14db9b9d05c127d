"""Long prompts fed in pieces (SPEC 11): memory and time of the prefill on a
real model (CPU), one-forward against chunked, exact against streaming.

Model: SmolLM2-135M-Instruct (the bundled GGUF, exported once as float32
safetensors to build/peers-model as bench_peers.py does; sdpa attention; 30
layers, 3 KV heads of 64: 1536 bytes of keys and values per token and
layer), prompts cut from the bundled essays, with linear rope scaling
(factor ceil(n / 8192)) where a prompt passes the model's 8192 positions.
Prompts of 4k, 8k, 16k and 32k tokens in pieces of 1024 (--quick: 1k and 2k
in pieces of 256). Rows, per prompt length, each run in a fresh subprocess
(so that its peak RSS is its own), after a warm-up through the same path on
a prompt of two pieces of at most 256 tokens:

  full                 unpatched model, one forward
  full_chunked         unpatched model, the prompt in pieces of --chunk
                       (cache = DynamicCache, then model(input_ids=ids[:, s:e],
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
                       per piece)
  coverage             refreekv.patch(model, "coverage") with its defaults, one
                       forward
  coverage_streaming   refreekv.patch(model, "coverage", prefill="streaming"),
                       the prompt in pieces into kv.new_cache(prompt_length=n)
  snapkv               refreekv.patch(model, "snapkv", budget=0.5), one forward
  snapkv_streaming     refreekv.patch(model, "snapkv", budget=0.5,
                       prefill="streaming", max_cache_tokens=n // 2), in pieces
Every forward passes logits_to_keep=1 (the LM head over a 32k prompt alone
would take 6 GiB).

    python benchmarks/bench_long_prompts.py [--quick] [--lengths 4096,8192] [--rows full,coverage_streaming]
        [--chunk 1024] [--json out.json] [--plot peak.png]

Figures (keys of the JSON, under `long_prompts` then `lengths`, per prompt
length, then per row):
  peak_rss_growth_bytes  VmHWM during the prefill (reset right before it) minus
                         VmRSS right before it (model loaded, prompt built,
                         warm-up done and its memory returned to the system)
  peak_rss_growth_over_full   that / the `full` row's at the same length
                         (glibc's heap makes it vary between runs: at 4k,
                         `full` 310-312 MiB in four runs, `full_chunked`
                         258-433 MiB, `snapkv_streaming` 200-217 MiB; the
                         growing cache of an unpatched chunked prefill is
                         reallocated at every piece and fragments the heap)
  kv_peak_bytes          the most bytes of keys and values the cache's layers
                         held at one moment (in use: the rows they hold; and
                         `kv_peak_allocated_bytes`, the storage under them,
                         headroom included). MEASURED, not computed: the
                         cache's `update` is wrapped so that right after
                         every layer appends its rows, `refreekv.kv_memory`
                         reads every layer of the cache. That is the moment
                         a layer holds the most: a one-forward (exact) cut
                         happens inside each layer's attention, after the
                         append, so the peak of a patched one-forward run is
                         the cut layers before it plus one whole layer, less
                         than the whole prompt's cache (`kv_full_bytes`); a
                         streaming piece is appended to the rows held and
                         every layer is re-cut after the piece's forward, so
                         its peak is at the last layer of a piece: every
                         layer's held rows plus that piece.
  kv_bound_ok, kv_bound_excess_bytes   (chunked rows) per layer and piece,
                         the most the layer held during the piece against
                         what it held after the previous piece's cut (in
                         use) plus the piece's rows: ok when never above
                         (excess: the most above it, <= 0 when ok). Target
                         (streaming rows): ok, i.e. a layer holds at most its
                         kept rows plus one piece.
  kv_kept_plus_chunk_bytes   the bytes after the prompt plus one piece of
                         --chunk rows in every layer (what "kept + one chunk
                         per layer" comes to with the final kept rows)
  kv_full_bytes          the whole prompt's uncompressed cache
  kv_bytes_after         bytes the cache's rows take after the prompt (in use;
                         `kv_allocated_after`: with headroom)
  budget                 kept fraction (`kv.stats.budget`; 1.0 unpatched)
  prefill_s              seconds of the prefill (the forward, or every piece)
  prefill_over_full      that / the `full` row's at the same length
  prefill_cpu_s          CPU seconds of the process during the prefill (all
                         threads; a check on prefill_s when other work
                         shares the cores)
  pieces                 forwards the prefill took
Under `long_prompts`, also `chunk`, `rows_left_out` (per length, the rows
not run) and `targets`:
  kv_bound               per length and streaming row: kv_bound_ok (target
                         true)
  coverage_streaming_peak_growth_over_full   at 32k (target <= 0.4)
  streaming_prefill_over_full   at 8k, coverage and snapkv (target <= 1.1)
It prints a table and asserts nothing about time.

Time: the one-forward prefill grows with the square of the prompt. Measured
on the 2-core machine of benchmarks/results (AMD EPYC, 2 threads, nothing
else running), one row at a time: at 32k, `full` 274 s, `coverage_streaming`
183 s, `snapkv_streaming` 228 s (at 4k, one forward 8.0 s and the unpatched
chunked loop 8.7 s). Six rows at 32k would take about half an hour alone,
so by default (`ROWS_AT`) 32k runs only `full`, `coverage_streaming` and
`snapkv_streaming` (about 12 minutes), and 16k leaves out `full_chunked`
(chunking the unpatched model is shown at 4k and 8k), which puts the whole
run at about 24 minutes (an estimate from the rows measured one at a time;
other work on the cores stretches it). `--rows` overrides ROWS_AT for every
length; the output and the JSON (`rows_left_out`) say which rows were left
out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

ROWS = {
    # name: (method, patch options, prefill mode, chunked)
    "full": (None, {}, None, False),
    "full_chunked": (None, {}, None, True),
    "coverage": ("coverage", {}, "exact", False),
    "coverage_streaming": ("coverage", {}, "streaming", True),
    "snapkv": ("snapkv", {"budget": 0.5}, "exact", False),
    "snapkv_streaming": ("snapkv", {"budget": 0.5}, "streaming", True),
}
LENGTHS, QUICK_LENGTHS = [4096, 8192, 16384, 32768], [1024, 2048]
CHUNK, QUICK_CHUNK = 1024, 256
# Rows run at a length by default (the others run every row): see "Time" above.
ROWS_AT = {
    16384: ["full", "coverage", "coverage_streaming", "snapkv", "snapkv_streaming"],
    32768: ["full", "coverage_streaming", "snapkv_streaming"],
}
MODEL_POSITIONS = 8192
WARM_PIECE = 256


def rope_factor(tokens: int) -> int:
    return max(1, math.ceil(tokens / MODEL_POSITIONS))


# -- the worker: one row at one length, in its own process ---------------------


class HeldKV:
    """Watches the bytes a cache's layers hold: wraps the cache's `update`
    (which every layer's attention calls to append its rows) and reads
    every layer with `refreekv.kv_memory` right after each append."""

    def __init__(self, cache):
        self.cache = cache
        self.peak_in_use = 0
        self.peak_allocated = 0
        self.piece_peak: dict[int, int] = {}  # layer -> most in use during the piece under way
        original = cache.update

        def update(*args, **kwargs):
            out = original(*args, **kwargs)
            self.observe()
            return out

        cache.update = update

    def observe(self) -> None:
        from refreekv import kv_memory

        memory = kv_memory(self.cache)
        self.peak_in_use = max(self.peak_in_use, memory.in_use_bytes)
        self.peak_allocated = max(self.peak_allocated, memory.allocated_bytes)
        for layer, in_use in zip(memory.layers, memory.in_use):
            self.piece_peak[layer] = max(self.piece_peak.get(layer, 0), in_use)

    def held(self) -> dict[int, int]:
        from refreekv import kv_memory

        memory = kv_memory(self.cache)
        return dict(zip(memory.layers, memory.in_use))


@torch.no_grad()
def prefill(model, ids: torch.Tensor, cache, chunk: int | None, row_bytes: int) -> dict:
    """Feeds `ids` into `cache` in one forward (chunk None) or in pieces;
    returns the seconds it took and what `HeldKV` saw."""
    watch = HeldKV(cache)
    n = ids.shape[1]
    bounds = [(0, n)] if chunk is None else [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    held_before: dict[int, int] = {}
    excess = -math.inf
    start, cpu_start = time.perf_counter(), time.process_time()
    for s, e in bounds:
        watch.piece_peak = {}
        model(input_ids=ids[:, s:e], attention_mask=None, past_key_values=cache, use_cache=True, logits_to_keep=1)
        piece_bytes = (e - s) * row_bytes
        for layer, peak in watch.piece_peak.items():
            excess = max(excess, peak - (held_before.get(layer, 0) + piece_bytes))
        if chunk is not None:  # not timed away: reading 30 layers is microseconds
            held_before = watch.held()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"prefill_s": seconds, "prefill_cpu_s": cpu, "pieces": len(bounds), "kv_peak_bytes": watch.peak_in_use,
            "kv_peak_allocated_bytes": watch.peak_allocated, "kv_bound_excess_bytes": excess}  # fmt: skip


def load_model(tokens: int):
    """The bundled model from the float32 safetensors that bench_peers.py
    exports (build/peers-model: seconds to load, where the GGUF takes half a
    minute), with linear rope x ceil(tokens / 8192) past 8192 positions."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench_peers import MODEL_DIR

    config = AutoConfig.from_pretrained(MODEL_DIR)
    factor = rope_factor(tokens)
    if factor > 1:  # as bench_e2e.linear_rope
        config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": float(factor)}
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, config=config, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), factor


def worker(args) -> None:
    import refreekv
    from proc_status import release_freed_memory, reset_peak_rss, status_bytes
    from refreekv.compression import fixed_budget_methods
    from transformers import DynamicCache

    n, chunk = args.length, args.chunk
    method, options, mode, chunked = ROWS[args.row]
    model, factor = load_model(n)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    row_bytes = 2 * config.num_key_value_heads * head_dim * torch.finfo(model.dtype).bits // 8
    ids = torch.tensor([json.loads(Path(args.prompts).read_text())[str(n)]])
    rss_loaded = status_bytes("VmRSS")

    kv = None
    if method is not None:
        extra = {"prefill": mode}
        if mode == "streaming" and method in fixed_budget_methods():
            extra["max_cache_tokens"] = n // 2
        kv = refreekv.patch(model, method, **extra, **options)

    def new_cache(length: int):
        if kv is None:
            return DynamicCache(config=model.config)
        return kv.new_cache(prompt_length=length if chunked else None)

    # Warm-up through the same path (the cut, and for chunked rows a second
    # piece and its re-cut) on a short prompt: two pieces of at most WARM_PIECE.
    piece = min(chunk, WARM_PIECE)
    warm = min(n, 2 * piece)
    prefill(model, ids[:, :warm], new_cache(warm), piece if chunked else None, row_bytes)
    release_freed_memory()
    reset_peak_rss()  # the peak read below is this prefill's
    rss_before = status_bytes("VmRSS")
    cache = new_cache(n)
    result = prefill(model, ids, cache, chunk if chunked else None, row_bytes)
    peak = status_bytes("VmHWM")
    memory = refreekv.kv_memory(cache)
    layers = len(memory.layers)
    result.update(
        peak_rss_bytes=peak,
        peak_rss_growth_bytes=peak - rss_before,
        rss_before_bytes=rss_before,
        rss_loaded_bytes=rss_loaded,
        kv_bytes_after=memory.in_use_bytes,
        kv_allocated_after=memory.allocated_bytes,
        kv_full_bytes=n * layers * row_bytes,
        kv_kept_plus_chunk_bytes=memory.in_use_bytes + layers * min(chunk, n) * row_bytes,
        budget=1.0 if kv is None else float(kv.stats.budget),
        rope=f"linear x{factor}" if factor > 1 else "default",
        chunk=chunk if chunked else None,
    )
    if chunked:
        result["kv_bound_ok"] = result["kv_bound_excess_bytes"] <= 0
    else:
        del result["kv_bound_excess_bytes"]
    if kv is not None:
        result["stats_kv_bytes_after"] = kv.stats.kv_bytes_after
        result["stats_kv_bytes_before"] = kv.stats.kv_bytes_before
        kv.remove()
    with open(args.out, "w") as out:
        json.dump(result, out)


# -- the parent: one subprocess per row and length ------------------------------


def write_prompts(lengths: list[int], path: Path) -> None:
    """{length: ids} of essay text (bench_e2e.prompt_ids), built once for
    every worker."""
    from bench_e2e import prompt_ids
    from refreekv.assets import load_bundled_tokenizer

    tokenizer = load_bundled_tokenizer()
    path.write_text(json.dumps({str(n): prompt_ids(tokenizer, n)[0].tolist() for n in lengths}))


def run_row(row: str, tokens: int, chunk: int, prompts: Path, scratch: Path) -> dict:
    out = scratch / f"{row}_{tokens}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--row", row, "--length", str(tokens),
               "--chunk", str(chunk), "--prompts", str(prompts), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{row} at {tokens} tokens failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - start
    return result


def add_ratios(rows: dict) -> None:
    full = rows.get("full")
    for name, row in rows.items():
        if full is None:
            continue
        row["peak_rss_growth_over_full"] = row["peak_rss_growth_bytes"] / full["peak_rss_growth_bytes"]
        row["prefill_over_full"] = row["prefill_s"] / full["prefill_s"]


def targets(results: dict) -> dict:
    kv_bound = {
        tokens: {name: row["kv_bound_ok"] for name, row in rows.items() if name.endswith("_streaming")}
        for tokens, rows in results.items()
    }
    out: dict = {"kv_bound": kv_bound}
    cov32 = results.get("32768", {}).get("coverage_streaming", {})
    if "peak_rss_growth_over_full" in cov32:
        out["coverage_streaming_peak_growth_over_full"] = {"tokens": 32768, "ratio": cov32["peak_rss_growth_over_full"], "target": 0.4}
    at8k = results.get("8192", {})
    prefill = {m: at8k[f"{m}_streaming"]["prefill_over_full"] for m in ("coverage", "snapkv") if "prefill_over_full" in at8k.get(f"{m}_streaming", {})}
    if prefill:
        out["streaming_prefill_over_full"] = {"tokens": 8192, **prefill, "target": 1.1}
    return out


MIB = 2**20


def print_table(tokens: int, rows: dict) -> None:
    print(
        f"{'tokens':>6} {'row':18s} {'peak RSS +MiB':>13} {'/full':>6} {'KV peak MiB':>11} {'kept+chunk':>10} "
        f"{'bound':>5} {'KV after':>8} {'full KV':>8} {'kept':>6} {'prefill s':>9} {'/full':>6} {'cpu s':>7} {'pieces':>6}"
    )
    for name, r in rows.items():
        bound = "" if "kv_bound_ok" not in r else ("ok" if r["kv_bound_ok"] else "OVER")
        print(
            f"{tokens:>6} {name:18s} {r['peak_rss_growth_bytes'] / MIB:13.1f} {r.get('peak_rss_growth_over_full', float('nan')):6.3f} "
            f"{r['kv_peak_bytes'] / MIB:11.1f} {r['kv_kept_plus_chunk_bytes'] / MIB:10.1f} {bound:>5} "
            f"{r['kv_bytes_after'] / MIB:8.1f} {r['kv_full_bytes'] / MIB:8.1f} {r['budget']:6.1%} {r['prefill_s']:9.2f} "
            f"{r.get('prefill_over_full', float('nan')):6.3f} {r.get('prefill_cpu_s', float('nan')):7.1f} {r['pieces']:>6}",
            flush=True,
        )


def plot(results: dict, path: str) -> None:
    """Peak RSS growth of the prefill (left) and KV bytes held at the peak
    (right) against prompt length, a line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = [("peak_rss_growth_bytes", "Peak RSS growth during the prefill"), ("kv_peak_bytes", "KV bytes held at the peak")]
    for axis, (key, title) in zip(axes, panels):
        for name in ROWS:
            points = [(int(t), rows[name][key] / MIB) for t, rows in results.items() if name in rows]
            if points:
                axis.plot(*zip(*sorted(points)), "--" if name.startswith("full") else "-", marker="o", label=name)
        axis.set(title=f"{title} (SmolLM2-135M, float32)", xlabel="prompt tokens", ylabel="MiB")
        axis.set_xscale("log", base=2)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 2k tokens in pieces of 256 (a smoke run)")
    parser.add_argument("--lengths", help="comma-separated prompt lengths (past 8192: linear rope x ceil(n / 8192))")
    parser.add_argument("--rows", help=f"comma-separated rows, from {list(ROWS)} (default: all, but {ROWS_AT})")
    parser.add_argument("--chunk", type=int, help=f"piece length of the chunked rows (default {CHUNK}, quick {QUICK_CHUNK})")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--plot", help="write the plot of peak RSS growth (and KV held at the peak) against prompt length to this PNG")
    # the worker side (one row, one length, in its own process)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from bench_peers import export_model

    lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else (QUICK_LENGTHS if args.quick else LENGTHS)
    chunk = args.chunk or (QUICK_CHUNK if args.quick else CHUNK)
    chosen = args.rows.split(",") if args.rows else None
    unknown = [r for r in chosen or [] if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; expected some of {list(ROWS)}")
    print(f"long_prompts: prefill memory and time, SmolLM2-135M-Instruct, {torch.get_num_threads()} threads, pieces of {chunk}")
    results, left_out = {}, {}
    wall = time.perf_counter()
    export_model()
    with tempfile.TemporaryDirectory() as scratch:
        prompts = Path(scratch) / "prompts.json"
        write_prompts(lengths, prompts)
        for tokens in lengths:
            names = chosen or ROWS_AT.get(tokens, list(ROWS))
            if not chosen and tokens in ROWS_AT:
                left_out[str(tokens)] = [r for r in ROWS if r not in names]
                print(f"  {tokens} tokens: only rows {names} (the others would take too long on this machine)")
            rows = {}
            for name in names:
                rows[name] = run_row(name, tokens, chunk, prompts, Path(scratch))
                print(f"  {tokens} {name}: prefill {rows[name]['prefill_s']:.2f} s (process {rows[name]['process_s']:.1f} s)", flush=True)
            add_ratios(rows)
            results[str(tokens)] = rows
            print_table(tokens, rows)
    summary = targets(results)
    print(f"targets: {json.dumps(summary)}")
    if left_out:
        print(f"rows left out: {json.dumps(left_out)}")
    print(f"total {time.perf_counter() - wall:.0f} s")
    if args.plot:
        plot(results, args.plot)
    if args.json:
        payload = {"chunk": chunk, "lengths": results, "targets": summary, "rows_left_out": left_out}
        with open(args.json, "w") as out:
            json.dump({"long_prompts": payload}, out, indent=2)


if __name__ == "__main__":
    main()
