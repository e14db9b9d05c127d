"""The CUDA operators on one GPU, against the hardware and plain PyTorch,
measured in the same run.

    python benchmarks/bench_cuda.py [--quick]

Prints, and asserts nothing about time:

  attention_importance, w = 1   b=1, H=32, Hkv=8, n=512Ki, d=128, bfloat16: a
      1 GiB key tensor. Achieved bandwidth = key bytes / time (the bytes the
      operator must read; its own extra traffic, the float32 logits written
      and re-read, is listed but not credited), next to the bandwidth of a
      device-to-device copy of the same tensor in the same run
      (2 x bytes / time: read + write) and the HBM peak. Target >= 60% of
      the copy.
  attention_importance, w = n   n=16384, H=32, Hkv=8, d=128, bfloat16 (H2O
      accumulation), next to torch.nn.functional.scaled_dot_product_attention
      (is_causal=True, enable_gqa=True) on the same shapes. Target <= 1.5x
      SDPA's time. FLOPs counted: the QK^T products the kernels compute,
      2 * 64 * 64 * d per 64 x 64 tile, over the tiles on or below the causal
      diagonal, once per pass (2 passes); SDPA: QK^T and PV over the causal
      half, 4 * d * n (n + 1) / 2 per head.
  adaptive_keep_count   [b, 32, c] float32, T = 0.01, against
      refreekv.reference.adaptive_keep_count (plain PyTorch, float64);
      mass_keep_count the same way, delta = 0.01.
  compact_kv            [1, 8, n, 128] bfloat16 keys and values, half the
      positions kept, against refreekv.reference.compact_kv (torch.gather).
  paged_attention, decode   q = 1, b in {1, 8}, H=32, Hkv=8, d=128, 8k rows
      per head in 16-row blocks scattered over the pool, bfloat16. Achieved
      bandwidth = K + V bytes the heads hold / time, against the HBM peak
      and a device-to-device copy of the same pools in the same run
      (2 x bytes / time); target >= 60% of the HBM peak. Time next to
      torch.nn.functional.scaled_dot_product_attention (enable_gqa=True) over
      the equivalent padded [b, Hkv, 8k, d] cache.

Times are medians of CUDA-event-timed repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import refreekv
from refreekv import reference

GiB = 1024**3
# Dense bfloat16 tensor-core peak and HBM bandwidth from the vendors' data
# sheets (SXM parts); used only for the "of peak" columns.
PEAKS = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.04e12),
}


def peaks_for(name: str):
    for key, value in PEAKS.items():
        if key in name:
            return value
    return None, None


def cuda_time(fn, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def extra_memory(fn) -> int:
    """Peak bytes allocated by one call beyond what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def bench_window_one(keys: int, peak_bw, generator) -> None:
    b, heads, kv_heads, d = 1, 32, 8, 128
    query = torch.randn(b, heads, 1, d, device="cuda", dtype=torch.bfloat16, generator=generator)
    key = torch.randn(b, kv_heads, keys, d, device="cuda", dtype=torch.bfloat16, generator=generator)
    key_bytes = key.numel() * key.element_size()
    scale = d**-0.5

    def ours():
        return refreekv.attention_importance(query, key, scale)

    copy_target = torch.empty_like(key)
    t_ours = cuda_time(ours)
    t_copy = cuda_time(lambda: copy_target.copy_(key))
    bw_ours = key_bytes / t_ours
    bw_copy = 2 * key_bytes / t_copy
    extra = 3 * 4 * b * heads * keys  # float32 logits: written, read, written again as scores
    # Spot check against the literal softmax of the one row (float32).
    group = heads // kv_heads
    logits = (query.float().view(b, kv_heads, group, d) @ key.float().transpose(-1, -2)) * scale
    expected = torch.softmax(logits, dim=-1).view(b, heads, keys)
    error = (ours() - expected).abs().max().item()
    print(f"\nattention_importance w=1: b={b} H={heads} Hkv={kv_heads} n={keys} d={d} bfloat16, key tensor {key_bytes / GiB:.2f} GiB")
    print(f"  ours               {t_ours * 1e3:9.3f} ms   {bw_ours / 1e9:8.1f} GB/s of key reads "
          f"({(key_bytes + extra) / t_ours / 1e9:.1f} GB/s counting its float32 logit traffic)")
    print(f"  device copy        {t_copy * 1e3:9.3f} ms   {bw_copy / 1e9:8.1f} GB/s (read + write of the same bytes)")
    ratio = bw_ours / bw_copy
    print(f"  ours / copy bandwidth = {ratio:.1%} (target >= 60%: {'met' if ratio >= 0.6 else 'NOT met'})")
    if peak_bw:
        print(f"  HBM peak {peak_bw / 1e12:.2f} TB/s: ours {bw_ours / peak_bw:.1%}, copy {bw_copy / peak_bw:.1%}")
    print(f"  max |ours - float32 softmax| = {error:.2e}")


def bench_window_n(keys: int, peak_flops, generator) -> None:
    b, heads, kv_heads, d = 1, 32, 8, 128
    query = torch.randn(b, heads, keys, d, device="cuda", dtype=torch.bfloat16, generator=generator)
    key = torch.randn(b, kv_heads, keys, d, device="cuda", dtype=torch.bfloat16, generator=generator)
    value = torch.randn_like(key)
    scale = d**-0.5

    def ours():
        return refreekv.attention_importance(query, key, scale, normalize=False)

    def sdpa():
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)

    t_ours = cuda_time(ours, repeats=5)
    t_sdpa = cuda_time(sdpa, repeats=5)
    tiles = -(-keys // 64)
    tile_pairs = tiles * (tiles + 1) // 2  # query tile t sees key tiles 0..t
    flops_ours = 2 * tile_pairs * (2 * 64 * 64 * d) * b * heads
    flops_sdpa = 4 * d * keys * (keys + 1) // 2 * b * heads
    memory = extra_memory(ours)
    sums = ours().sum(-1)  # every row distributes one unit: sums are n
    mass_error = (sums - keys).abs().max().item() / keys
    print(f"\nattention_importance w=n: b={b} H={heads} Hkv={kv_heads} n={keys} d={d} bfloat16")
    print(f"  ours               {t_ours * 1e3:9.3f} ms   {flops_ours / t_ours / 1e12:7.1f} TFLOP/s "
          f"({flops_ours / 1e12:.2f} TFLOP: QK^T on {tile_pairs} causal 64x64 tiles per head, 2 passes)")
    print(f"  SDPA (causal, GQA) {t_sdpa * 1e3:9.3f} ms   {flops_sdpa / t_sdpa / 1e12:7.1f} TFLOP/s "
          f"({flops_sdpa / 1e12:.2f} TFLOP: QK^T and PV over the causal half)")
    ratio = t_ours / t_sdpa
    print(f"  ours / SDPA time = {ratio:.2f}x (target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")
    if peak_flops:
        print(f"  dense bf16 peak {peak_flops / 1e12:.0f} TFLOP/s: ours {flops_ours / t_ours / peak_flops:.1%}, "
              f"SDPA {flops_sdpa / t_sdpa / peak_flops:.1%}")
    print(f"  extra memory of one call: {memory / 2**20:.1f} MiB (a w x n float32 matrix would be "
          f"{4 * heads * keys * keys / GiB:.0f} GiB); relative probability-mass error {mass_error:.1e}")


def bench_keep_count(candidates: int, batch: int, generator) -> None:
    heads = 32
    ranks = torch.arange(candidates, device="cuda") / candidates
    scores = torch.rand(batch, heads, candidates, device="cuda", generator=generator) * torch.exp(-3 * ranks)
    for name in ("adaptive_keep_count", "mass_keep_count"):
        ours, plain = getattr(refreekv, name), getattr(reference, name)
        t_ours = cuda_time(lambda: ours(scores, 0.01), repeats=20)
        t_ref = cuda_time(lambda: plain(scores, 0.01), repeats=5, warmup=1)
        same = torch.equal(ours(scores, 0.01), plain(scores, 0.01))
        print(f"  {name} b={batch} H={heads} c={candidates}: ours {t_ours * 1e6:8.1f} us, "
              f"plain PyTorch {t_ref * 1e6:9.1f} us ({t_ref / t_ours:.1f}x), equal: {same}")


def bench_compact(keys: int, generator) -> None:
    b, kv_heads, d = 1, 8, 128
    key = torch.randn(b, kv_heads, keys, d, device="cuda", dtype=torch.bfloat16, generator=generator)
    value = torch.randn_like(key)
    kept = keys // 2
    positions = torch.cat([torch.arange(4), torch.arange(keys - kept + 4, keys)]).to("cuda")
    keep_index = positions.expand(b, kv_heads, kept).contiguous()
    keep_len = torch.full((b,), kept, device="cuda", dtype=torch.int64)
    t_ours = cuda_time(lambda: refreekv.compact_kv(key, value, keep_index, keep_len), repeats=20)
    t_ref = cuda_time(lambda: reference.compact_kv(key, value, keep_index, keep_len), repeats=20)
    moved = 2 * 2 * key.element_size() * b * kv_heads * kept * d  # read + write, keys and values
    same = all(torch.equal(x, y) for x, y in zip(refreekv.compact_kv(key, value, keep_index, keep_len),
                                                  reference.compact_kv(key, value, keep_index, keep_len)))
    print(f"  compact_kv Hkv={kv_heads} n={keys} d={d} bf16, keep {kept}: ours {t_ours * 1e6:8.1f} us "
          f"({moved / t_ours / 1e9:.0f} GB/s), torch.gather {t_ref * 1e6:8.1f} us ({t_ref / t_ours:.1f}x), equal: {same}")


def bench_paged_decode(batch: int, rows: int, peak_bw, generator) -> None:
    heads, kv_heads, d, block_rows = 32, 8, 128, 16
    per_head = rows // block_rows
    blocks = batch * kv_heads * per_head
    key_pool = torch.randn(blocks, block_rows, d, device="cuda", dtype=torch.bfloat16, generator=generator)
    value_pool = torch.randn_like(key_pool)
    # Each head's blocks scattered over the pool, as after many appends and cuts.
    order = torch.randperm(blocks, device="cuda", generator=generator)
    block_table = order.view(batch, kv_heads, per_head)
    lengths = torch.full((batch, kv_heads), rows, device="cuda", dtype=torch.int64)
    query = torch.randn(batch, heads, 1, d, device="cuda", dtype=torch.bfloat16, generator=generator)
    scale = d**-0.5
    kv_bytes = 2 * key_pool.numel() * key_pool.element_size()  # every pool row is held

    def ours():
        return refreekv.paged_attention(query, key_pool, value_pool, block_table, lengths, scale)

    # The equivalent padded cache, each head's rows in order.
    key = key_pool[block_table].view(batch, kv_heads, rows, d)
    value = value_pool[block_table].view(batch, kv_heads, rows, d)

    def sdpa():
        # q = 1 sees every row: no mask (is_causal would align top-left).
        return F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=True)

    key_copy, value_copy = torch.empty_like(key_pool), torch.empty_like(value_pool)

    def copy():
        key_copy.copy_(key_pool)
        value_copy.copy_(value_pool)

    t_ours = cuda_time(ours, repeats=50, warmup=5)
    t_sdpa = cuda_time(sdpa, repeats=50, warmup=5)
    t_copy = cuda_time(copy, repeats=50, warmup=5)
    bw_ours = kv_bytes / t_ours
    bw_copy = 2 * kv_bytes / t_copy
    error = (ours().float() - sdpa().float()).abs().max().item()
    print(f"  b={batch}: K+V {kv_bytes / 2**20:.0f} MiB")
    print(f"    ours         {t_ours * 1e6:9.1f} us   {bw_ours / 1e9:8.1f} GB/s of K+V reads")
    print(f"    device copy  {t_copy * 1e6:9.1f} us   {bw_copy / 1e9:8.1f} GB/s (read + write of the same pools)")
    print(f"    SDPA, padded {t_sdpa * 1e6:9.1f} us   ours / SDPA time = {t_ours / t_sdpa:.2f}x")
    if peak_bw:
        ratio = bw_ours / peak_bw
        print(f"    HBM peak {peak_bw / 1e12:.2f} TB/s: ours {ratio:.1%} (target >= 60%: "
              f"{'met' if ratio >= 0.6 else 'NOT met'}), copy {bw_copy / peak_bw:.1%}; ours / copy {bw_ours / bw_copy:.1%}")
    else:
        print(f"    ours / copy bandwidth = {bw_ours / bw_copy:.1%}")
    print(f"    max |ours - SDPA| = {error:.2e} (bfloat16 outputs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run, not the targets)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA device")
    if not refreekv.built_with_cuda():
        raise SystemExit("refreekv was built without CUDA kernels; build with REFREEKV_FORCE_CUDA=1")
    props = torch.cuda.get_device_properties(0)
    peak_flops, peak_bw = peaks_for(props.name)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / GiB:.0f} GiB; torch {torch.__version__}")
    if peak_flops:
        print(f"peaks used: {peak_flops / 1e12:.0f} TFLOP/s dense bf16, {peak_bw / 1e12:.2f} TB/s HBM (data sheet)")
    else:
        print("peaks: unknown for this device; only measured figures are printed")
    generator = torch.Generator(device="cuda").manual_seed(0)
    bench_window_one(64 * 1024 if args.quick else 512 * 1024, peak_bw, generator)
    bench_window_n(2048 if args.quick else 16384, peak_flops, generator)
    print("\nadaptive_keep_count, mass_keep_count and compact_kv against plain PyTorch:")
    for candidates, batch in ((4096, 1), (16384, 1), (16384, 8)):
        bench_keep_count(candidates, batch, generator)
    for keys in (16384, 131072):
        bench_compact(keys, generator)
    rows = 2048 if args.quick else 8192
    print(f"\npaged_attention decode: q=1, H=32, Hkv=8, d=128, {rows} rows per head in 16-row blocks, bfloat16")
    for batch in (1, 8):
        bench_paged_decode(batch, rows, peak_bw, generator)


if __name__ == "__main__":
    main()
