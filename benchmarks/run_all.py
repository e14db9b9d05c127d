"""`make bench`: every benchmark, one results file, one summary.

Runs benchmarks/bench_ops.py, benchmarks/bench_e2e.py,
benchmarks/bench_paged.py, benchmarks/bench_long_prompts.py,
benchmarks/bench_decode.py and benchmarks/bench_peers.py (each prints its own
tables as it goes), then writes

  benchmarks/results/latest.json          all figures + the machine they ran on
  benchmarks/results/<UTC date-time>.json a dated copy
  benchmarks/results/summary.md           the headline figures against their targets
  benchmarks/results/figures.png          prefill overhead, decode speedup, operator speedups
  benchmarks/results/decode_rows.png      KV rows held while generating, per decode-time setting
  benchmarks/results/long_prompts_peak.png  peak RSS growth of the prefill against prompt length,
                                          one forward against chunked and streaming

    python benchmarks/run_all.py [--quick] [--peers-python .venv-peers/bin/python]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

import refreekv

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def machine() -> dict:
    with open("/proc/cpuinfo") as cpuinfo:
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.M)
    return {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "refreekv": refreekv.__version__,
        "python": platform.python_version(),
    }


def run(script: str, json_path: Path, quick: bool, *extra: str) -> dict:
    command = [sys.executable, str(HERE / script), "--json", str(json_path), *extra] + (["--quick"] if quick else [])
    print(f"\n$ {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True)
    return json.loads(json_path.read_text())


def summary(results: dict) -> str:
    host = results["machine"]
    lines = [
        f"# Benchmark summary ({results['date']})",
        "",
        f"Machine: {host['cpu']}, {host['threads']} threads; torch {host['torch']}, transformers {host['transformers']}, "
        f"refreekv {host['refreekv']}. Model: {results['model']}. Ratios are against a baseline measured in the same run.",
        "",
        "| figure | measured | target |",
        "|---|---|---|",
    ]
    for tokens, row in results["prefill_overhead"].items():
        lines.append(f"| prefill_overhead @ {tokens} tokens (patched / unpatched) | {row['ratio']:.3f} | <= 1.03 |")
        if "coverage_ratio" in row:
            lines.append(f"| prefill_overhead coverage @ {tokens} tokens | {row['coverage_ratio']:.3f} | <= 1.03 |")
    for name, row in results["kv_bytes"].items():
        lines += [
            f"| kv_bytes {name} after prefill (in use / full; allocated / full) | {row['kv_bytes_ratio']:.4f}; "
            f"{row['kv_allocated_ratio']:.4f} (reported budget {row['reported_budget']:.4f}) | = budget |",
            f"| kv_bytes {name} after {row['decode_steps']} decoded tokens (in use / full; allocated / full) | "
            f"{row['decoded_kv_bytes_ratio']:.4f}; {row['decoded_kv_allocated_ratio']:.4f} | allocated <= 1.0 |",
        ]
    for tokens, row in results["decode_speedup"].items():
        lines.append(
            f"| decode_speedup @ {tokens} tokens, rope {row['rope']} (ReFreeKV / full; {row['budget']:.1%} kept) | {row['ratio']:.3f} | >= 1.0 |"
        )
        if "budget_without_scaling" in row:
            lines.append(f"| ReFreeKV kept @ {tokens} tokens with the default rope | {row['budget_without_scaling']:.1%} | |")
    for tokens, rows in results["paged"].items():
        for method in ("coverage", "adakv"):
            row = rows[method]
            decode_target = ">= 1.0" if int(tokens) in (4096, 8192) else ""
            full_target = ">= 1.1" if method == "coverage" and int(tokens) == 8192 else ""
            lines += [
                f"| paged {method} @ {tokens} tokens: held / kept rows (block rounding) | {row['held_over_kept']:.4f} | "
                f"{'<= 1.02' if int(tokens) == 4096 else ''} |",
                f"| paged {method} @ {tokens} tokens: KV bytes paged / padded / full | {row['paged']['kv_bytes'] / 2**20:.2f} / "
                f"{row['padded']['kv_bytes'] / 2**20:.2f} / {row['full_kv_bytes'] / 2**20:.2f} MiB "
                f"({row['kv_bytes_paged_over_padded']:.3f} of padded) | |",
                f"| paged {method} @ {tokens} tokens: decode tok/s paged / padded | {row['decode_paged_over_padded']:.3f} | {decode_target} |",
                f"| paged {method} @ {tokens} tokens: decode tok/s paged / full cache | {row['decode_paged_over_full']:.3f} | {full_target} |",
                f"| paged {method} @ {tokens} tokens: packing share of prefill | {row['pack_share']:.3%} | <= 1% |",
            ]
    if "long_prompts" in results:  # older results files have none
        lines += long_prompts_summary(results["long_prompts"])
    peak = results["peak_memory_ratio"]
    lines.append(f"| peak_memory_ratio @ {peak['tokens']} tokens (patched / unpatched) | {peak['ratio']:.3f} | <= 1.05 |")
    ref = results["reference_ratios"]
    lines += [
        f"| released-code way / ours, prefill time @ {ref['tokens']} tokens | {ref['time_ratio']:.2f}x | |",
        f"| released-code way / ours, peak memory @ {ref['tokens']} tokens | {ref['peak_memory_ratio']:.2f}x | |",
        f"| released-code way / ours, KV bytes @ {ref['tokens']} tokens | {ref['kv_bytes_ratio']:.2f}x | |",
    ]
    decode = results["decode_compression"]
    recall = decode["recall"]
    full_recall = recall["full cache"]
    for name, row in decode["long_generation"].items():
        if "final_kv_ratio" not in row:
            continue
        target_kv = "<= 0.5" if name == "refreekv every 256" else ""
        lines += [
            f"| decode_compression {name}: final / peak KV bytes vs full cache @ {decode['new_tokens']} generated tokens, rows held | "
            f"{row['final_kv_ratio']:.3f} / {row['peak_kv_ratio']:.3f} | |",
            f"| decode_compression {name}: final / peak KV bytes allocated (headroom included) vs full cache | "
            f"{row['final_kv_allocated_ratio']:.3f} / {row['peak_kv_allocated_ratio']:.3f} | {target_kv} |",
            f"| decode_compression {name}: decode tokens/s vs full cache | {row['throughput_ratio']:.3f} | >= 1.0 |",
            f"| decode_compression {name}: share of generation time in events ({row['events']} layer cuts) | {row['event_share']:.2%} | <= 5% |",
            f"| decode_compression {name}: tokens identical to the full cache before the first divergence | "
            f"{row['identical_prefix']} ({row['identical_prefix_share']:.1%}) | |",
            f"| decode_compression {name}: item-k recall from its own list (full cache {full_recall['correct']}/{full_recall['asked']}) | "
            f"{recall[name]['correct']}/{recall[name]['asked']} | |",
        ]
    for tokens, rows in results["peers"]["table"].items():
        for method, row in rows.items():
            ratio = row["ratio"]
            lines.append(
                f"| peers @ {tokens} tokens, {method} (refreekv / kvpress: prefill, peak RSS growth, KV bytes, decode tok/s) | "
                f"{ratio['prefill_s']:.3f}, {ratio['peak_growth_bytes']:.3f}, {ratio.get('kv_bytes', float('nan')):.3f}, "
                f"{ratio['decode_tok_s']:.3f}; tokens {'identical' if row['tokens_identical'] else 'differ'} | "
                f"<= 1.00, <= 0.7, <= 1.0, >= 1.0 |"
            )
            lines.append(
                f"| peers @ {tokens} tokens, {method} (refreekv / kvpress: KV bytes allocated after prefill, after decoding) | "
                f"{ratio.get('kv_bytes_allocated', float('nan')):.3f}, {ratio.get('decoded_kv_bytes_allocated', float('nan')):.3f} | |"
            )
    for operator in ("attention_importance", "adaptive_keep_count", "mass_keep_count", "compact_kv"):
        for row in results["ops"][operator]:
            case = ", ".join(f"{k}={v}" for k, v in row["case"].items())
            ours = row["ours"]
            speed = f"{row['speedup']:.2f}x faster" if "speedup" in row else row["reference"].get("skipped", "reference failed")
            memory = f"{ours['peak_extra_mib']:.1f} MiB extra" if "peak_extra_mib" in ours else ""
            lines.append(f"| ops {operator} ({case}) | {ours.get('ms', float('nan')):.3f} ms, {speed}; {memory} | |")
    return "\n".join(lines) + "\n"


def long_prompts_summary(long_prompts: dict) -> list[str]:
    """Rows of benchmarks/bench_long_prompts.py against their targets."""
    lines = []
    for tokens, rows in long_prompts["lengths"].items():
        for name in ("coverage_streaming", "snapkv_streaming"):
            row = rows.get(name)
            if row is None:
                continue
            lines.append(
                f"| long_prompts {name} @ {tokens} tokens: KV held at the peak / kept + one piece per layer; every layer "
                f"within its held rows + one piece at every piece | {row['kv_peak_bytes'] / 2**20:.1f} / "
                f"{row['kv_kept_plus_chunk_bytes'] / 2**20:.1f} MiB; {'yes' if row['kv_bound_ok'] else 'NO'} | yes |"
            )
        for name, row in rows.items():
            if name == "full" or "peak_rss_growth_over_full" not in row:
                continue
            growth_target = "<= 0.4" if name == "coverage_streaming" and int(tokens) == 32768 else "-"
            time_target = "<= 1.1" if name.endswith("_streaming") and int(tokens) == 8192 else "-"
            lines.append(
                f"| long_prompts {name} @ {tokens} tokens ({row['budget']:.1%} kept): peak RSS growth of the prefill; "
                f"prefill time (/ full cache in one forward) | {row['peak_rss_growth_over_full']:.3f} "
                f"({row['peak_rss_growth_bytes'] / 2**20:.0f} MiB); {row['prefill_over_full']:.3f} ({row['prefill_s']:.1f} s) | "
                f"{growth_target}; {time_target} |"
            )
    for tokens, rows in long_prompts.get("rows_left_out", {}).items():
        lines.append(f"| long_prompts @ {tokens} tokens: rows not run (time) | {', '.join(rows)} | |")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    tokens = list(results["prefill_overhead"])
    axes[0].plot(tokens, [results["prefill_overhead"][t]["ratio"] for t in tokens], marker="o")
    axes[0].axhline(1.03, color="red", linestyle="--", label="target 1.03")
    axes[0].set(title="Prefill time, ReFreeKV / unpatched", xlabel="prompt tokens", ylabel="ratio")
    axes[0].legend()
    tokens = list(results["decode_speedup"])
    axes[1].bar(tokens, [results["decode_speedup"][t]["ratio"] for t in tokens])
    axes[1].axhline(1.0, color="red", linestyle="--", label="target 1.0")
    axes[1].set(title="Decode tokens/s, ReFreeKV / full cache", xlabel="prompt tokens", ylabel="speedup")
    axes[1].legend()
    rows = [r for r in results["ops"]["attention_importance"] if "speedup" in r]
    labels = [f"n={r['case']['n']}\nw={r['case']['w']}" for r in rows]
    axes[2].bar(range(len(rows)), [r["speedup"] for r in rows])
    axes[2].set_xticks(range(len(rows)), labels, fontsize=7)
    axes[2].axhline(1.0, color="red", linestyle="--")
    axes[2].set(title="attention_importance speedup vs materialized reference", ylabel="reference / ours")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run every benchmark and write benchmarks/results/")
    parser.add_argument("--quick", action="store_true", help="reduced sizes (a smoke run)")
    parser.add_argument("--peers-python", default=str(HERE.parent / ".venv-peers" / "bin" / "python"),
                        help="python of the kvpress environment (`make bench` creates it)")  # fmt: skip
    args = parser.parse_args()
    stamp = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory() as scratch:
        ops = run("bench_ops.py", Path(scratch) / "ops.json", args.quick)
        e2e = run("bench_e2e.py", Path(scratch) / "e2e.json", args.quick)
        RESULTS.mkdir(exist_ok=True)
        paged = run("bench_paged.py", Path(scratch) / "paged.json", args.quick, "--plot", str(RESULTS / "paged_held_bytes.png"))
        long_prompts = run(
            "bench_long_prompts.py", Path(scratch) / "long_prompts.json", args.quick, "--plot", str(RESULTS / "long_prompts_peak.png")
        )
        decode = run("bench_decode.py", Path(scratch) / "decode.json", args.quick, "--plot", str(RESULTS / "decode_rows.png"))
        peers = run("bench_peers.py", Path(scratch) / "peers.json", args.quick, "--peers-python", args.peers_python)
    results = {"date": stamp.isoformat(timespec="seconds"), "quick": args.quick, "machine": machine(), **e2e, **paged, **long_prompts, **decode, **peers, "ops": ops}
    latest = RESULTS / "latest.json"
    latest.write_text(json.dumps(results, indent=2) + "\n")
    shutil.copy(latest, RESULTS / f"{stamp.strftime('%Y-%m-%dT%H%M%SZ')}.json")
    (RESULTS / "summary.md").write_text(summary(results))
    plot(results, RESULTS / "figures.png")
    print(f"\nwrote {latest}, a dated copy, summary.md and figures.png in {RESULTS}")
    print(summary(results))


if __name__ == "__main__":
    main()
