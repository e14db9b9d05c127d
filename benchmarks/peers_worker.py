"""One library's side of the peer benchmark (benchmarks/bench_peers.py), run
in that library's own environment and process.

    python benchmarks/peers_worker.py --library {refreekv,kvpress} \
        --model DIR --prompts FILE --length N --methods a,b,... --out FILE

Loads the exported model (float32, sdpa; eager where a method needs it),
warms every method up on a short prompt, then for each method in turn:
prefill plus compression through the library's own entry point (timed), the
peak RSS of that prefill (VmHWM after a reset), the KV bytes the cache
holds in its rows and allocates under them, 32 greedy decode steps (each
timed), and the KV bytes in use and allocated again after them. It imports
only torch, transformers and the library under test, so it runs unchanged
in .venv and in .venv-peers; the caller compares the two.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from proc_status import release_freed_memory, reset_peak_rss, status_bytes

WARMUP_TOKENS = 256
STREAM_CHUNK = 1024  # tokens per piece of a streaming prefill
# kvpress's SimLayerKV leaves prompts of up to n_initial + n_recent + n_last
# tokens alone; its warm-up must be longer to reach the compressing path.
WARMUP_TOKENS_ADAPTIVE = 1100

# The methods, aligned across the libraries: each value is (refreekv.patch
# arguments, kvpress press factory, attention implementation). A None press
# is the library's own uncompressed path.
ALIGNED = {
    "none": (None, lambda kvpress: None, "sdpa"),
    "streamingllm": (
        ("streamingllm", {"budget": 0.5, "num_sinks": 4}),
        lambda kvpress: kvpress.StreamingLLMPress(compression_ratio=0.5, n_sink=4),
        "sdpa",
    ),
    "snapkv": (
        ("snapkv", {"budget": 0.5, "window": 64, "kernel": 5, "pooling": "avg"}),
        lambda kvpress: kvpress.SnapKVPress(compression_ratio=0.5, window_size=64, kernel_size=5),
        "sdpa",
    ),
    # AdaKV over the same SnapKV scores; both safeguards 0.2 (kvpress's
    # alpha_safeguard counts the window in, ours comes on top of it).
    # kvpress's AdaKVPress only masks the rows it drops (its attention patch
    # hides them from every later query; it refuses eager attention): the
    # cache keeps every row, so its KV bytes and budget are the full cache's.
    "adakv": (
        ("adakv", {"budget": 0.5, "window": 64, "kernel": 5, "pooling": "avg"}),
        lambda kvpress: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=0.5, window_size=64, kernel_size=5)),
        "sdpa",
    ),
    # kvpress scores with the attention matrices eager attention returns; ours
    # accumulates every query's attention without materializing it (sdpa).
    # ObservedAttentionPress forces no recent window; window=1 forces only
    # the newest token (our default forces 8).
    "h2o_all": (
        ("h2o", {"budget": 0.5, "observation": "all", "window": 1}),
        lambda kvpress: kvpress.ObservedAttentionPress(compression_ratio=0.5),
        {"refreekv": "sdpa", "kvpress": "eager"},
    ),
    # Streaming prefill (SPEC 11): ours cuts SnapKV's rows after every piece
    # of STREAM_CHUNK tokens, within a cap of half the prompt, so a layer
    # never holds more than half the prompt plus one piece; kvpress has no
    # chunked prefill that compresses as it goes, so its best equivalent is
    # the same press after a full prefill.
    "snapkv_streaming": (
        ("snapkv", {"budget": 0.5, "window": 64, "kernel": 5, "pooling": "avg", "prefill": "streaming"}),
        lambda kvpress: kvpress.SnapKVPress(compression_ratio=0.5, window_size=64, kernel_size=5),
        "sdpa",
    ),
    # kvpress's adaptive press closest to ReFreeKV: SimLayerKV decides per
    # layer, from the last query's attention, whether the layer keeps only its
    # first and newest tokens; the threshold is its recommendation for Llama 3.
    "adaptive": (
        ("refreekv", {}),
        lambda kvpress: kvpress.SimLayerKVPress(lazy_threshold=0.9),
        "sdpa",
    ),
}


def kv_bytes(cache) -> tuple[int, int]:
    """(bytes of the rows every layer's keys and values hold, bytes of the
    storage under them: headroom included, shared buffers counted once).
    refreekv's `kv_memory` measures the same; kvpress's environment has no
    refreekv, and one yardstick serves both libraries."""
    in_use, storages = 0, {}
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            in_use += tensor.nbytes
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return in_use, sum(storages.values())


class Library:
    """The refreekv or kvpress way to prefill with compression and decode.

    `compression_s` accumulates the time spent in the library's own
    compression step (scoring, selection and the cache cut, not the
    attention): refreekv's per-layer `compress_layer`, kvpress's
    `press.compress`. Both are internal entry points, wrapped here only to
    time them."""

    def __init__(self, name: str):
        self.name = name
        self.compression_s = 0.0
        if name == "kvpress":
            import kvpress as module
        else:
            import refreekv as module

            patch_module = importlib.import_module("refreekv.integration.patch")
            patch_module.compress_layer = self._timed(patch_module.compress_layer)
        self.module = module

    def _timed(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.compression_s += time.perf_counter() - start

        return timed

    def attention(self, method: str) -> str:
        impl = ALIGNED[method][2]
        return impl[self.name] if isinstance(impl, dict) else impl

    def prefill(self, model, ids, method: str):
        """(context, cache, last logits, kept budget); `context` stays open
        while decoding (refreekv's patch serves the compressed cache)."""
        patch_args, make_press, _ = ALIGNED[method]
        if self.name == "refreekv":
            options = {} if patch_args is None else dict(patch_args[1])
            streaming = options.get("prefill") == "streaming"
            if streaming:
                options["max_cache_tokens"] = round(options["budget"] * ids.shape[1])
            context = self.module.patch(model, patch_args[0], **options) if patch_args else None
            handle = context.__enter__() if context else None
            if not streaming:
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            else:
                cache = handle.new_cache(prompt_length=ids.shape[1])
                for start in range(0, ids.shape[1], STREAM_CHUNK):
                    piece = ids[:, start : start + STREAM_CHUNK]
                    out = model(input_ids=piece, past_key_values=cache, use_cache=True, logits_to_keep=1)
            budget = handle.stats.budget if handle else 1.0
            return context, out.past_key_values, out.logits, budget
        press = make_press(self.module)
        if press is not None:
            press.compress = self._timed(press.compress)
        cache = DynamicCache()  # as kvpress's pipeline makes it
        if press is None:
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        else:
            with press(model):
                out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        held = sum(layer.keys.shape[-2] for layer in cache.layers)
        return None, cache, out.logits, held / (len(cache.layers) * ids.shape[1])

    def decode_step(self, model, token, cache, position: int):
        if self.name == "kvpress":
            # kvpress's pipeline passes the positions itself: the compressed
            # cache is shorter than the sequence it stands for.
            return model(input_ids=token, past_key_values=cache, position_ids=torch.tensor([[position]]))
        return model(input_ids=token, past_key_values=cache, use_cache=True)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


@torch.no_grad()
def measure(library: Library, model, ids: torch.Tensor, method: str, decode_steps: int) -> dict:
    model.set_attn_implementation(library.attention(method))
    release_freed_memory()
    reset_peak_rss()  # the peak read below is this prefill's
    rss_before = status_bytes("VmRSS")
    library.compression_s = 0.0
    start = time.perf_counter()
    context, cache, logits, budget = library.prefill(model, ids, method)
    prefill_s = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    prefill_kv = kv_bytes(cache)
    try:
        token = logits[:, -1:].argmax(-1)
        tokens, steps = [int(token)], []
        for step in range(decode_steps):
            start = time.perf_counter()
            out = library.decode_step(model, token, cache, ids.shape[1] + step)
            token = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - start)
            tokens.append(int(token))
        decoded_kv = kv_bytes(cache)
    finally:
        if context is not None:
            context.__exit__(None, None, None)
    return {
        "prefill_s": prefill_s,
        "compression_s": library.compression_s,
        "peak_rss_bytes": peak,
        "peak_growth_bytes": peak - rss_before,
        "kv_bytes": prefill_kv[0],
        "kv_bytes_allocated": prefill_kv[1],
        "decoded_kv_bytes": decoded_kv[0],
        "decoded_kv_bytes_allocated": decoded_kv[1],
        "budget": float(budget),
        "decode_tok_s": 1.0 / statistics.median(steps),
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", choices=["refreekv", "kvpress"], required=True)
    parser.add_argument("--model", required=True, help="folder written by bench_peers.py (safetensors, tokenizer)")
    parser.add_argument("--prompts", required=True, help="JSON {length: token ids}")
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--methods", required=True, help=f"comma-separated, from {sorted(ALIGNED)}")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in ALIGNED]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; expected some of {sorted(ALIGNED)}")
    torch.set_num_threads(args.threads)
    library = Library(args.library)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompts = json.loads(open(args.prompts).read())
    if str(args.length) not in prompts:
        raise SystemExit(f"no prompt of {args.length} tokens in {args.prompts}; it has {sorted(prompts)}")
    ids = torch.tensor([prompts[str(args.length)]])
    for method in methods:  # first calls pay for lazy initialisation; keep it out of the figures
        warmup = WARMUP_TOKENS_ADAPTIVE if method == "adaptive" else WARMUP_TOKENS
        measure(library, model, ids[:, :warmup], method, decode_steps=2)
    results = {m: measure(library, model, ids, m, args.decode_steps) for m in methods}
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, args.library: _version(args.library)}
    with open(args.out, "w") as out:
        json.dump({"library": args.library, "length": args.length, "versions": versions, "methods": results}, out)


if __name__ == "__main__":
    main()
