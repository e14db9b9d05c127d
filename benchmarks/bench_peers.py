"""refreekv against NVIDIA's kvpress, side by side on the same model and prompts.

    python benchmarks/bench_peers.py [--peers-python .venv-peers/bin/python]
        [--lengths 4096,8192] [--repeats 3] [--json out.json] [--update-latest] [--quick]

Model: SmolLM2-135M-Instruct from the bundled GGUF, dequantized once to
float32 safetensors (with its tokenizer) under build/peers-model, so that both
transformers versions load the very same weights. Prompts: the bundled
essays cut to N tokens with a question at the end; the same token ids go to
both libraries.

Each library runs in its own environment (refreekv in this one, kvpress in
.venv-peers with the newest transformers it accepts) and its own process, one
process per library, prompt length and repeat; the two alternate, the first
of each pair switching every repeat. Methods, options aligned
(benchmarks/peers_worker.py, ALIGNED): no compression; StreamingLLM and
SnapKV at 50%; AdaKV over SnapKV's scores at 50% (kvpress's AdaKVPress
masks the rows it drops and keeps them in the cache: it saves no memory,
and its budget reads 1.0; ours holds every head at the largest head's
count); H2O over every prompt query against ObservedAttentionPress (which
needs eager attention); ReFreeKV against SimLayerKVPress, kvpress's closest
adaptive press; our SnapKV with a streaming prefill (pieces of 1024, cap
50% of the prompt, SPEC 11) against kvpress's SnapKVPress after a full
prefill, its best equivalent (kvpress has no prefill that compresses as it
goes).

Per method and length, medians over the repeats of: prefill plus
compression time, peak RSS of the prefill (VmHWM after a reset) and its growth
over the RSS before it, KV bytes the cache holds in its rows and allocates
under them (headroom included), after prefill and after the decode steps,
decode tokens/s (one over the median of 32 step times); whether the 33
greedy tokens are the same in both libraries. Ratios are refreekv / kvpress; the "none" row is the
transformers-version baseline to read the others against. Prints a table and
asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "benchmarks" / "peers_worker.py"
MODEL_DIR = ROOT / "build" / "peers-model"
LATEST = ROOT / "benchmarks" / "results" / "latest.json"
QUESTION = "\n\nQuestion: According to the essays above, what should a founder focus on first? Answer:"
METHODS = ["none", "streamingllm", "snapkv", "snapkv_streaming", "adakv", "h2o_all", "adaptive"]
# ObservedAttentionPress materializes every layer's attention matrix in eager
# attention; at 8K that alone is minutes per repeat on 2 cores.
H2O_LENGTHS = (4096,)
PAIRED = {  # method -> (what refreekv runs, what kvpress runs)
    "none": ("no compression", "no compression"),
    "streamingllm": ("streamingllm 50%, 4 sinks", "StreamingLLMPress(0.5, n_sink=4)"),
    "snapkv": ("snapkv 50%, window 64, kernel 5, avg", "SnapKVPress(0.5, window_size=64, kernel_size=5)"),
    "adakv": ("adakv 50%, window 64, kernel 5, avg", "AdaKVPress(SnapKVPress(0.5, window_size=64, kernel_size=5)) (masks)"),
    "h2o_all": ("h2o 50%, observation='all', window 1 (sdpa)", "ObservedAttentionPress(0.5) (eager)"),
    "snapkv_streaming": ("snapkv 50% as above, streaming prefill in pieces of 1024, cap 50% of the prompt",
                         "SnapKVPress(0.5, window_size=64, kernel_size=5) after a full prefill"),
    "adaptive": ("refreekv, paper defaults", "SimLayerKVPress(lazy_threshold=0.9)"),
}
FIGURES = [
    "prefill_s", "compression_s", "peak_rss_bytes", "peak_growth_bytes", "kv_bytes", "kv_bytes_allocated",
    "decoded_kv_bytes", "decoded_kv_bytes_allocated", "decode_tok_s", "budget",
]  # fmt: skip


def export_model() -> Path:
    """The bundled model as float32 safetensors and its tokenizer, written once."""
    if (MODEL_DIR / "model.safetensors").is_file():
        return MODEL_DIR
    import torch
    from safetensors.torch import save_model

    from refreekv.assets import load_bundled_model

    model, tokenizer = load_bundled_model(dtype=torch.float32)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses a model loaded from GGUF; what it holds after
    # loading is plain float32, which the config without the GGUF marker
    # describes. save_model stores the tied embedding once.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(MODEL_DIR)
    tokenizer.save_pretrained(MODEL_DIR)
    save_model(model, str(MODEL_DIR / "model.safetensors"), metadata={"format": "pt"})
    return MODEL_DIR


def write_prompts(lengths: list[int], path: Path) -> None:
    """{length: ids}: essay tokens cut so that the question ends at `length`."""
    from transformers import AutoTokenizer

    from refreekv.haystack import essays

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = tokenizer(" ".join(essays()))["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    need = max(lengths) - len(question)
    if len(text) < need:
        raise RuntimeError(f"the essays hold {len(text)} tokens; a {max(lengths)}-token prompt needs {need}")
    path.write_text(json.dumps({str(n): text[: n - len(question)] + question for n in lengths}))


def package_versions(python: str) -> dict[str, str]:
    listing = subprocess.run([python, "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True)
    return {row["name"].lower(): row["version"] for row in json.loads(listing.stdout)}


def run_worker(python: str, library: str, prompts: Path, length: int, methods: list[str], threads: int, out: Path) -> dict:
    command = [python, str(WORKER), "--library", library, "--model", str(MODEL_DIR), "--prompts", str(prompts),
               "--length", str(length), "--methods", ",".join(methods), "--threads", str(threads), "--out", str(out)]  # fmt: skip
    # Neither process may see the other's packages; the worker finds refreekv
    # through its installed (editable) package only.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{library} worker at {length} tokens failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def summarize(runs: dict, lengths: list[int]) -> dict:
    """Medians per library, length and method; ratios refreekv / kvpress."""
    table = {}
    for length in lengths:
        rows = {}
        for method in METHODS:
            per_library = {}
            for library in ("refreekv", "kvpress"):
                repeats = [r["methods"][method] for r in runs[library][length] if method in r["methods"]]
                if not repeats:
                    break
                per_library[library] = {f: statistics.median(r[f] for r in repeats) for f in FIGURES}
                per_library[library]["per_repeat"] = {f: [r[f] for r in repeats] for f in FIGURES}
                per_library[library]["tokens"] = repeats[0]["tokens"]
                per_library[library]["deterministic"] = all(r["tokens"] == repeats[0]["tokens"] for r in repeats)
                per_library[library]["repeats"] = len(repeats)
            if len(per_library) < 2:
                continue
            ours, theirs = per_library["refreekv"], per_library["kvpress"]
            same = sum(a == b for a, b in zip(ours["tokens"], theirs["tokens"]))
            rows[method] = {
                "refreekv": ours,
                "kvpress": theirs,
                "ours_vs": PAIRED[method],
                "ratio": {f: ours[f] / theirs[f] for f in FIGURES if theirs[f]},
                "tokens_identical": ours["tokens"] == theirs["tokens"],
                "tokens_identical_prefix": next((i for i, (a, b) in enumerate(zip(ours["tokens"], theirs["tokens"])) if a != b), len(ours["tokens"])),
                "tokens_same_count": same,
                # time in the library's compression step / its prefill time
                "compression_share": {lib: r["compression_s"] / r["prefill_s"] for lib, r in per_library.items()},
            }  # fmt: skip
        table[str(length)] = rows
    return table


def format_table(table: dict) -> str:
    lines = [
        "ratios refreekv / kvpress (medians); 'none' is the transformers-version baseline",
        f"{'tokens':>6} {'method':13s} {'prefill':>8} {'peak RSS':>9} {'growth':>7} {'KV bytes':>9} {'KV alloc':>9}"
        f" {'decoded KV alloc':>16} {'decode':>7}"
        f" {'budget ours/theirs':>19} {'compress share ours/theirs':>27}  tokens",
    ]
    for length, rows in table.items():
        for method, row in rows.items():
            r = row["ratio"]
            same = "identical" if row["tokens_identical"] else f"same first {row['tokens_identical_prefix']}/{len(row['refreekv']['tokens'])}"
            lines.append(
                f"{length:>6} {method:13s} {r['prefill_s']:8.3f} {r['peak_rss_bytes']:9.3f} {r['peak_growth_bytes']:7.3f}"
                f" {r.get('kv_bytes', float('nan')):9.3f} {r.get('kv_bytes_allocated', float('nan')):9.3f}"
                f" {r.get('decoded_kv_bytes_allocated', float('nan')):16.3f} {r['decode_tok_s']:7.3f}"
                f" {row['refreekv']['budget']:9.3f}/{row['kvpress']['budget']:.3f}"
                f" {row['compression_share']['refreekv']:17.2%}/{row['compression_share']['kvpress']:.2%}  {same}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="refreekv against kvpress, same model and prompts")
    parser.add_argument("--peers-python", default=str(ROOT / ".venv-peers" / "bin" / "python"))
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one repeat at 2048 tokens (a smoke run)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--update-latest", action="store_true", help=f"also set `peers` in {LATEST.relative_to(ROOT)}")
    args = parser.parse_args()
    if not Path(args.peers_python).is_file():
        raise SystemExit(f"{args.peers_python} not found; `make bench-peers` creates .venv-peers")
    # Quick runs stay above 1029 tokens, below which SimLayerKV compresses nothing.
    lengths, repeats = ([2048], 1) if args.quick else ([int(n) for n in args.lengths.split(",")], args.repeats)
    h2o_lengths = lengths if args.quick else H2O_LENGTHS
    start = time.perf_counter()
    export_model()
    pythons = {"refreekv": sys.executable, "kvpress": args.peers_python}
    runs = {library: {n: [] for n in lengths} for library in pythons}
    with tempfile.TemporaryDirectory() as scratch:
        prompts = Path(scratch) / "prompts.json"
        write_prompts(lengths, prompts)
        for repeat in range(repeats):
            for length in lengths:
                methods = [m for m in METHODS if m != "h2o_all" or length in h2o_lengths]
                order = ["refreekv", "kvpress"] if (repeat + lengths.index(length)) % 2 == 0 else ["kvpress", "refreekv"]
                for library in order:
                    out = Path(scratch) / f"{library}-{length}-{repeat}.json"
                    runs[library][length].append(run_worker(pythons[library], library, prompts, length, methods, args.threads, out))
                    print(f"  repeat {repeat + 1}/{repeats}  {length:>5} tokens  {library:8s} done after "
                          f"{time.perf_counter() - start:6.0f} s", flush=True)
    table = summarize(runs, lengths)
    versions = {library: package_versions(python) for library, python in pythons.items()}
    results = {
        "peers": {
            "model": "SmolLM2-135M-Instruct (float32; sdpa, eager for ObservedAttentionPress)",
            "threads": args.threads,
            "repeats": repeats,
            "quick": args.quick,
            "seconds": time.perf_counter() - start,
            "versions": {"refreekv_env": versions["refreekv"], "kvpress_env": versions["kvpress"]},
            "worker_versions": {lib: runs[lib][lengths[0]][0]["versions"] for lib in runs},
            "table": table,
        }
    }
    print(format_table(table))
    print(f"bench_peers: {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.update_latest:
        latest = json.loads(LATEST.read_text()) if LATEST.is_file() else {}
        latest["peers"] = results["peers"]
        LATEST.write_text(json.dumps(latest, indent=2) + "\n")
        print(f"set `peers` in {LATEST}")


if __name__ == "__main__":
    main()
