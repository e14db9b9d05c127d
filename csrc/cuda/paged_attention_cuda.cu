// CUDA implementation of refreekv::paged_attention (SPEC 10): attention of
// the newest q tokens over a paged KV cache in which each (sequence, KV head)
// holds its own number of rows.
//
// Design (flash-decoding). Decode is memory-bound: the aim is to read every
// K and V row a head holds from HBM once, with enough of them in flight to
// keep HBM busy also when b * Hkv is far below the number of SMs.
//
// * Split kernel: one CTA of 128 threads per (sequence, KV head, row chunk,
//   value chunk, key split).
//   - Row chunk: up to 8 (16-bit types) or 16 (float32) of the g * q query
//     rows of the GQA group that reads the KV head. Decode (q = 1, g <= 8)
//     has a single chunk, so each K/V row is read once for the whole group.
//   - Value chunk: up to 128 16-byte words of dv (one per thread); only
//     dv > 1024 (16-bit) or > 512 (float32) has more than one.
//   - Tiles: the split's rows are walked in tiles of up to 64 rows through the
//     block table. A two-stage cp.async pipeline gathers the next tile's K and
//     V rows into shared memory (16-byte copies; element copies where rows are
//     not 16-byte aligned) while the current tile is used. The lanes of a
//     warp look up their rows' blocks at once, so the block-table latency is
//     paid once per tile, not once per row.
//   - Per tile: float32 dot products (each thread one key against all rows of
//     the chunk, the head dim split over 128 / tile threads), logits with the
//     scale, the softcap c * tanh(x / c) and the bottom-right causal mask
//     (query row i sees rows j <= L - q + i), an online-softmax update of
//     each row's running max and sum (one warp per row), and P.V accumulated
//     in registers: each thread owns one 16-byte column word of V for all
//     rows of the chunk and a residue class of the tile's rows; the classes
//     are summed in a fixed order after the last tile.
//   - Epilogue: with one split the CTA normalizes and writes the output in
//     the query dtype; with several it writes its (max, sum) per row and its
//     unnormalized output to a float32 workspace [b * H * q, splits, dv + 2].
// * Combine kernel (several splits only): one CTA per output row merges the
//   splits in split order (deterministic; no atomics), adds exp(sink) to the
//   denominator when there are sinks (a sink carries no value), normalizes
//   and writes the query dtype. A row that sees no key is zero.
// * Splits: the lengths stay on the device, so the split count comes from the
//   longest possible head, max_blocks * block_rows: enough splits that the
//   CTAs fill the GPU's resident slots once (occupancy x SMs), at least two
//   tiles per split, at most 128. Splits past a head's length exit at once
//   (and the combine kernel skips them by the same rule).
//
// Memory traffic aimed for: the K and V rows each head holds, read once per
// row chunk (once for decode), plus the block-table entries and the queries,
// plus (dv + 2) float32 per row and split written and read back by the
// combine kernel: at 8k rows per head, b = 1, H = 32, Hkv = 8, d = dv = 128,
// bfloat16 and about 40 splits, some 1.4 MB next to 32 MiB of K and V (4%).
// Target: >= 60% of HBM bandwidth at 8k rows per head on an H200
// (benchmarks/bench_cuda.py measures it; it was not measured where this was
// written, a machine without a GPU). Large q (a chunked prefill) is correct
// but not tuned: each chunk of 8 or 16 rows re-reads the rows it sees, and
// the dot products use CUDA cores, not tensor cores.
//
// Checks: a length outside [0, max_blocks * block_rows] or a block id outside
// [0, blocks) is a device-side assertion (the kernels read those values
// anyway, and a decode step must not wait for the host; the CPU kernel raises
// for the same inputs). Sinks are used as given, converted to float32 on the
// device, as the CPU kernel uses them (it does not check them either): no
// host copy, so no call synchronizes with the host, sinks or not.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "../checks.h"
#include "common.cuh"

namespace refreekv {
namespace cuda {
namespace {

constexpr int kThreads = 128;             // both kernels: 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTileKeys = 64;          // K/V rows per pipeline stage
constexpr int kStages = 2;
constexpr int kMaxValueWords = kThreads;  // 16-byte V words per CTA: one column word per thread
constexpr int kMaxSplits = kThreads;      // the combine kernel stages one split per thread
constexpr int64_t kMinTilesPerSplit = 2;  // below that the partials cost more than the split gains
// Shared memory a CTA should stay under, so that two or three CTAs share an
// SM on sm_80+ (a CTA's own two stages keep one tile in flight while it
// computes, the others fill the gaps); larger head dims get smaller tiles.
constexpr int64_t kPreferredSmemBytes = 96 * 1024;

// Query rows per CTA: each thread accumulates P.V for all of them in one
// 16-byte column word, ROWS x (16 / sizeof(T)) floats, at most 64 registers.
template <typename T>
constexpr int max_chunk_rows() {
  return 64 / (16 / static_cast<int>(sizeof(T)));
}

struct PagedAttentionKernelParams {
  const void* query;           // [b, H, q, d], contiguous
  const void* key_pool;        // [blocks, block_rows, d], contiguous
  const void* value_pool;      // [blocks, block_rows, dv], contiguous
  const int64_t* block_table;  // [b, Hkv, max_blocks]
  const int64_t* lengths;      // [b, Hkv]
  const float* sinks;          // [H] sink logits, or nullptr
  void* out;                   // [b, H, q, dv]
  float* partial_out;          // [b * H * q, splits, dv]: a split's sum of exp(x - max) v
  float2* partial_stats;       // [b * H * q, splits]: a split's (max, sum of exp(x - max))
  int64_t batch, heads, kv_heads, group, queries, head_dim, value_dim;
  int64_t blocks, block_rows, max_blocks;
  int64_t max_rows;      // max_blocks * block_rows, the most rows a head can hold
  int64_t row_chunks;    // CTAs over a group's g * q rows
  int64_t chunk_rows;    // rows per chunk (the last one may hold fewer)
  int64_t value_chunks;  // CTAs over dv, kMaxValueWords words each
  int64_t splits;        // CTAs over a head's rows
  int64_t split_rows;    // rows per split, a multiple of tile_keys
  int tile_keys;         // rows per pipeline stage, a power of two <= kMaxTileKeys
  int key_words;         // 16-byte words of a key row (the last one zero-padded)
  int key_stride;        // words between key rows in shared memory: odd, so the
                         // rows that 8 lanes read at once sit on distinct banks
  int chunk_value_words;  // 16-byte words of a value row per value chunk (at most)
  float scale;
  float softcap;         // > 0: logits are capped to softcap * tanh(x / softcap)
  bool key_vec16;        // key rows allow 16-byte copies
  bool value_vec16;      // value rows allow 16-byte copies
};

constexpr int64_t round_up16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// The split kernel's dynamic shared memory for `rows` query rows per CTA, in
// bytes from its start. Region 0 holds the pipeline stages and, after the
// last tile, the per-thread P.V sums (at most one 16-byte word of floats per
// row and thread); the query rows are float32 and 16-byte aligned.
struct SplitSmemLayout {
  int64_t query, dots, probs, stats, total;
  __host__ __device__ SplitSmemLayout(const PagedAttentionKernelParams& p, int rows,
                                      int elem_bytes) {
    const int64_t elems_per_word = 16 / elem_bytes;
    const int64_t stages = int64_t{kStages} * p.tile_keys * (p.key_stride + p.chunk_value_words) * 16;
    const int64_t sums = int64_t{kThreads} * rows * elems_per_word * 4;
    query = round_up16(stages > sums ? stages : sums);
    dots = query + int64_t{rows} * p.key_words * elems_per_word * 4;  // [rows][d rounded up]
    probs = dots + int64_t{kThreads} * rows * 4;  // [128 / tile parts][rows][tile]
    stats = probs + int64_t{rows} * p.tile_keys * 4;  // [rows][tile]
    total = stats + 3 * rows * 4;  // running max, running sum, rescale, [rows] each
  }
};

// The logit of a raw dot product: scaled, then capped when there is a
// softcap, in Gemma 2's order (as attention_importance).
__device__ __forceinline__ float logit(const PagedAttentionKernelParams& p, float dot) {
  const float x = p.scale * dot;
  return p.softcap > 0.0f ? p.softcap * tanhf(x / p.softcap) : x;
}

// The factor that turns a row's sum of exp(x - m) v (m its max, l its sum of
// exp(x - m)) into its output: 1 / (l + exp(sink - m)), formed relative to
// max(m, sink) so that no exponential overflows. The sink is unscaled and
// uncapped, as in GPT-OSS. A row that saw no key (m = -inf) is zero, with a
// sink or without.
__device__ __forceinline__ float output_scale(float m, float l, const float* sink) {
  if (m == -INFINITY) return 0.0f;
  if (sink == nullptr) return 1.0f / l;
  const float top = fmaxf(m, *sink);
  const float kept = expf(m - top);
  return kept / (l * kept + expf(*sink - top));
}

// Word w of a row of `cols` elements into shared memory: a 16-byte copy when
// the row allows it (then cols is a whole number of words), else element by
// element, with zeros past the row's end (the dot products run over whole
// words).
template <typename T>
__device__ __forceinline__ void copy_word(T* dst, const T* src, int w, int cols, bool vec16) {
  constexpr int kE = 16 / sizeof(T);
  const int c = w * kE;
  if (vec16) {
    copy16_async(dst + c, src + c);
    return;
  }
#pragma unroll
  for (int e = 0; e < kE; ++e) dst[c + e] = c + e < cols ? src[c + e] : zero_value<T>();
}

// Gathers rows [start, start + count) of head `head_index` (s * Hkv + kv
// head) into one pipeline stage: row kk goes to warp kk % 4, whose lane
// kk / 4 looks up the row's block, all lanes at once; then the warp copies
// its rows one after the other, the key and value words of a row together.
template <typename T>
__device__ void load_stage(const PagedAttentionKernelParams& p, int64_t head_index,
                           int64_t start, int count, int64_t value_col0, int value_cols,
                           int value_words, T* keys, T* values) {
  constexpr int kE = 16 / sizeof(T);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int rows_per_warp = (count + kWarps - 1) / kWarps;  // <= kMaxTileKeys / kWarps lanes
  int64_t pool_row = 0;
  if (lane < rows_per_warp && warp + kWarps * lane < count) {
    const int64_t position = start + warp + kWarps * lane;
    const int64_t block = p.block_table[head_index * p.max_blocks + position / p.block_rows];
    CUDA_KERNEL_ASSERT_MSG(block >= 0 && block < p.blocks,
                           "paged_attention: expected block_table entries in [0, blocks)");
    pool_row = block * p.block_rows + position % p.block_rows;
  }
  const T* key_pool = static_cast<const T*>(p.key_pool);
  const T* value_pool = static_cast<const T*>(p.value_pool) + value_col0;
  const int words = p.key_words + value_words;
  for (int u = 0; u < rows_per_warp; ++u) {
    const int64_t row = __shfl_sync(0xffffffffu, pool_row, u);
    const int kk = warp + kWarps * u;
    if (kk >= count) break;  // uniform over the warp
    T* key_dst = keys + kk * p.key_stride * kE;
    T* value_dst = values + kk * p.chunk_value_words * kE;
    for (int w = lane; w < words; w += 32) {
      if (w < p.key_words) {
        copy_word(key_dst, key_pool + row * p.head_dim, w, static_cast<int>(p.head_dim), p.key_vec16);
      } else {
        copy_word(value_dst, value_pool + row * p.value_dim, w - p.key_words, value_cols, p.value_vec16);
      }
    }
  }
}

template <typename T, int ROWS>
__global__ void __launch_bounds__(kThreads)
    paged_attention_split_kernel(const PagedAttentionKernelParams p) {
  constexpr int kE = 16 / sizeof(T);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const SplitSmemLayout layout(p, ROWS, sizeof(T));
  T* const stage_keys = reinterpret_cast<T*>(smem_raw);  // [stage][tile row][key_stride words]
  T* const stage_values = stage_keys + kStages * p.tile_keys * p.key_stride * kE;  // [stage][tile row][chunk words]
  float* const thread_sums = reinterpret_cast<float*>(smem_raw);  // after the last tile
  float* const query_s = reinterpret_cast<float*>(smem_raw + layout.query);
  float* const dots = reinterpret_cast<float*>(smem_raw + layout.dots);
  float* const probs = reinterpret_cast<float*>(smem_raw + layout.probs);
  float* const row_max = reinterpret_cast<float*>(smem_raw + layout.stats);
  float* const row_sum = row_max + ROWS;
  float* const row_rescale = row_sum + ROWS;

  // blockIdx.x = ((head_index * row_chunks + row_chunk) * value_chunks +
  // value_chunk) * splits + split, head_index = s * Hkv + kv_head.
  int64_t index = blockIdx.x;
  const int64_t split = index % p.splits;
  index /= p.splits;
  const int64_t value_chunk = index % p.value_chunks;
  index /= p.value_chunks;
  const int64_t row_chunk = index % p.row_chunks;
  const int64_t head_index = index / p.row_chunks;
  const int64_t seq = head_index / p.kv_heads;
  const int64_t kv_head = head_index % p.kv_heads;

  const int64_t length = p.lengths[head_index];
  CUDA_KERNEL_ASSERT_MSG(length >= 0 && length <= p.max_rows,
                         "paged_attention: expected lengths in [0, max_blocks * block_rows]");
  const int64_t split_start = split * p.split_rows;
  // A split at or past the head's end adds nothing (the combine kernel skips
  // it by the same rule); a lone split still writes the (zero) output.
  if (p.splits > 1 && split_start >= length) return;

  // Row r of the chunk is group row chunk_start + r = hg * q + i: query head
  // kv_head * g + hg, query row i, which sees rows j <= length - q + i. The
  // group's rows are contiguous in query and out.
  const int64_t chunk_start = row_chunk * p.chunk_rows;
  const int rows = static_cast<int>(std::min<int64_t>(p.chunk_rows, p.group * p.queries - chunk_start));
  const int64_t first_row = (seq * p.heads + kv_head * p.group) * p.queries + chunk_start;
  int64_t last_visible = -1;  // over the chunk's rows: rows past it are skipped
  for (int r = 0; r < rows; ++r) {
    last_visible = std::max<int64_t>(last_visible, length - p.queries + (chunk_start + r) % p.queries);
  }
  const int64_t split_end = std::min(std::min(split_start + p.split_rows, length), last_visible + 1);
  const int64_t tiles = split_end > split_start ? ceil_div(split_end - split_start, p.tile_keys) : 0;

  const int64_t value_col0 = value_chunk * kMaxValueWords * kE;
  const int value_cols = static_cast<int>(std::min<int64_t>(p.value_dim - value_col0, kMaxValueWords * kE));
  const int value_words = (value_cols + kE - 1) / kE;

  if (tiles > 0) {
    load_stage<T>(p, head_index, split_start, static_cast<int>(std::min<int64_t>(p.tile_keys, split_end - split_start)),
                  value_col0, value_cols, value_words, stage_keys, stage_values);
  }
  cp_async_commit();

  // The chunk's queries as float32, zero past d and past the chunk's rows
  // (those rows compute harmless zeros and are never written).
  const int query_cols = p.key_words * kE;
  const T* query = static_cast<const T*>(p.query) + first_row * p.head_dim;
  for (int e = threadIdx.x; e < ROWS * query_cols; e += kThreads) {
    const int r = e / query_cols;
    const int c = e - r * query_cols;
    query_s[e] = r < rows && c < p.head_dim ? to_float(query[r * p.head_dim + c]) : 0.0f;
  }
  if (threadIdx.x < ROWS) {
    row_max[threadIdx.x] = -INFINITY;
    row_sum[threadIdx.x] = 0.0f;
  }

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // Dot products: thread (key, part) takes key `key` of the tile and words
  // part, part + parts, ... of the head dim.
  const int parts = kThreads / p.tile_keys;
  const int key = threadIdx.x % p.tile_keys;
  const int part = threadIdx.x / p.tile_keys;
  // P.V: thread (column, phase) takes column word `column` and the tile rows
  // phase, phase + phases, ...; threads past phases * value_words idle.
  const int phases = kThreads / value_words;
  const int column = threadIdx.x % value_words;
  const int phase = threadIdx.x / value_words;
  float acc[ROWS][kE];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int e = 0; e < kE; ++e) acc[r][e] = 0.0f;

  for (int64_t t = 0; t < tiles; ++t) {
    const int stage = static_cast<int>(t % kStages);
    const int64_t tile_start = split_start + t * p.tile_keys;
    const int tile_rows = static_cast<int>(std::min<int64_t>(p.tile_keys, split_end - tile_start));
    if (t + 1 < tiles) {
      const int64_t next_start = tile_start + p.tile_keys;
      const int next_stage = stage ^ 1;
      load_stage<T>(p, head_index, next_start, static_cast<int>(std::min<int64_t>(p.tile_keys, split_end - next_start)),
                    value_col0, value_cols, value_words,
                    stage_keys + next_stage * p.tile_keys * p.key_stride * kE,
                    stage_values + next_stage * p.tile_keys * p.chunk_value_words * kE);
      cp_async_commit();
      cp_async_wait<1>();  // this tile's stage has landed; the next one is in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* keys = stage_keys + stage * p.tile_keys * p.key_stride * kE;
    const T* values = stage_values + stage * p.tile_keys * p.chunk_value_words * kE;

    // 1. Partial dot products of the thread's key with every row.
    {
      float dot[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) dot[r] = 0.0f;
      const T* key_row = keys + key * p.key_stride * kE;
      for (int w = part; w < p.key_words; w += parts) {
        float k[kE];
        Vec16<T>::to_floats(*reinterpret_cast<const uint4*>(key_row + w * kE), k);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          // Every lane of a warp reads the same query word: a broadcast.
          const float4* q4 = reinterpret_cast<const float4*>(query_s + r * query_cols + w * kE);
#pragma unroll
          for (int e4 = 0; e4 < kE / 4; ++e4) {
            const float4 q = q4[e4];
            dot[r] = fmaf(q.x, k[4 * e4 + 0], dot[r]);
            dot[r] = fmaf(q.y, k[4 * e4 + 1], dot[r]);
            dot[r] = fmaf(q.z, k[4 * e4 + 2], dot[r]);
            dot[r] = fmaf(q.w, k[4 * e4 + 3], dot[r]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) dots[(part * ROWS + r) * p.tile_keys + key] = dot[r];
    }
    __syncthreads();

    // 2. Online softmax, one warp per row: the tile's logits (masked ones
    // -inf), the new running max, the tile's probabilities relative to it,
    // and the factor that rescales what was accumulated under the old max.
    for (int r = warp; r < ROWS; r += kWarps) {
      const int64_t last = r < rows ? length - p.queries + (chunk_start + r) % p.queries : -1;
      float x[kMaxTileKeys / 32];
      float tile_max = -INFINITY;
#pragma unroll
      for (int u = 0; u < kMaxTileKeys / 32; ++u) {
        const int kk = lane + 32 * u;
        x[u] = -INFINITY;
        if (kk < tile_rows && tile_start + kk <= last) {
          float sum = 0.0f;
          for (int other = 0; other < parts; ++other) sum += dots[(other * ROWS + r) * p.tile_keys + kk];
          x[u] = logit(p, sum);
        }
        tile_max = fmaxf(tile_max, x[u]);
      }
      tile_max = warp_max(tile_max);
      const float old_max = row_max[r];
      const float new_max = fmaxf(old_max, tile_max);
      float tile_sum = 0.0f;
#pragma unroll
      for (int u = 0; u < kMaxTileKeys / 32; ++u) {
        const int kk = lane + 32 * u;
        const float prob = x[u] == -INFINITY ? 0.0f : expf(x[u] - new_max);
        if (kk < p.tile_keys) probs[r * p.tile_keys + kk] = prob;
        tile_sum += prob;
      }
      tile_sum = warp_sum(tile_sum);
      if (lane == 0) {
        // Nothing visible yet (new_max = -inf): sum and accumulators are zero
        // and stay so.
        const float rescale = new_max == -INFINITY ? 1.0f : expf(old_max - new_max);
        row_rescale[r] = rescale;
        row_sum[r] = row_sum[r] * rescale + tile_sum;
        row_max[r] = new_max;
      }
    }
    __syncthreads();

    // 3. P.V into the thread's column word, all rows at once (each V word is
    // converted once and used ROWS times).
    if (phase < phases) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float rescale = row_rescale[r];
#pragma unroll
        for (int e = 0; e < kE; ++e) acc[r][e] *= rescale;
      }
      for (int j = phase; j < tile_rows; j += phases) {
        float v[kE];
        Vec16<T>::to_floats(
            *reinterpret_cast<const uint4*>(values + (j * p.chunk_value_words + column) * kE), v);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float prob = probs[r * p.tile_keys + j];
#pragma unroll
          for (int e = 0; e < kE; ++e) acc[r][e] = fmaf(prob, v[e], acc[r][e]);
        }
      }
    }
    __syncthreads();  // the next iteration reloads this stage and rewrites dots and probs
  }

  // Epilogue: the phases' sums of each column, added in phase order.
  const int sum_cols = value_words * kE;
  if (phase < phases) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int e = 0; e < kE; ++e) thread_sums[(phase * ROWS + r) * sum_cols + column * kE + e] = acc[r][e];
  }
  if (p.splits == 1 && threadIdx.x < rows) {
    // Each row's output factor (this thread initialized row_max[r] and
    // row_sum[r], or a barrier since the last tile published them).
    const int64_t head = kv_head * p.group + (chunk_start + threadIdx.x) / p.queries;
    row_rescale[threadIdx.x] = output_scale(row_max[threadIdx.x], row_sum[threadIdx.x],
                                            p.sinks == nullptr ? nullptr : p.sinks + head);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < rows * value_cols; idx += kThreads) {
    const int r = idx / value_cols;
    const int c = idx - r * value_cols;
    float o = 0.0f;
    for (int ph = 0; ph < phases; ++ph) o += thread_sums[(ph * ROWS + r) * sum_cols + c];
    const int64_t row = first_row + r;
    if (p.splits == 1) {
      static_cast<T*>(p.out)[row * p.value_dim + value_col0 + c] = from_float<T>(o * row_rescale[r]);
    } else {
      p.partial_out[(row * p.splits + split) * p.value_dim + value_col0 + c] = o;
    }
  }
  if (p.splits > 1 && value_chunk == 0 && threadIdx.x < rows) {
    p.partial_stats[(first_row + threadIdx.x) * p.splits + split] =
        make_float2(row_max[threadIdx.x], row_sum[threadIdx.x]);
  }
}

// Merges the splits of one output row ((s * H + head) * q + i): the running
// maxima to a common one, then sums and outputs weighted by exp(max_k - max),
// in split order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    paged_attention_combine_kernel(const PagedAttentionKernelParams p) {
  __shared__ float2 stats[kMaxSplits];
  __shared__ float weights[kMaxSplits];
  const int64_t row = blockIdx.x;
  const int64_t head_row = row / p.queries;  // s * H + head
  const int64_t head = head_row % p.heads;
  const int64_t seq = head_row / p.heads;
  const int64_t length = p.lengths[seq * p.kv_heads + head / p.group];
  // The splits the split kernel ran (see its early exit); the length itself
  // was checked there.
  const int live = static_cast<int>(std::min<int64_t>(p.splits, ceil_div(length, p.split_rows)));
  if (static_cast<int>(threadIdx.x) < live) stats[threadIdx.x] = p.partial_stats[row * p.splits + threadIdx.x];
  __syncthreads();
  float m = -INFINITY;
  for (int k = 0; k < live; ++k) m = fmaxf(m, stats[k].x);
  if (static_cast<int>(threadIdx.x) < live) {
    const float split_max = stats[threadIdx.x].x;
    weights[threadIdx.x] = split_max == -INFINITY ? 0.0f : expf(split_max - m);
  }
  __syncthreads();
  float l = 0.0f;
  for (int k = 0; k < live; ++k) l += weights[k] * stats[k].y;
  const float scale = output_scale(m, l, p.sinks == nullptr ? nullptr : p.sinks + head);
  const float* partial = p.partial_out + row * p.splits * p.value_dim;
  T* out = static_cast<T*>(p.out) + row * p.value_dim;
  for (int64_t c = threadIdx.x; c < p.value_dim; c += kThreads) {
    float o = 0.0f;
    for (int k = 0; k < live; ++k) o += weights[k] * partial[k * p.value_dim + c];
    out[c] = from_float<T>(o * scale);
  }
}

template <typename T, int ROWS>
void launch_with_rows(PagedAttentionKernelParams& p, const at::TensorOptions& float_options,
                      cudaStream_t stream) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int64_t smem_limit = static_cast<int64_t>(props->sharedMemPerBlockOptin);
  // The largest tile within the preferred budget; a tile of one row where
  // even the smallest exceeds it (very large head dims).
  int64_t smem = 0;
  for (p.tile_keys = kMaxTileKeys;; p.tile_keys /= 2) {
    smem = SplitSmemLayout(p, ROWS, sizeof(T)).total;
    if (smem <= std::min(kPreferredSmemBytes, smem_limit) || p.tile_keys == 1) break;
  }
  TORCH_CHECK(smem <= smem_limit, "paged_attention: head_dim ", p.head_dim, " and value_dim ",
              p.value_dim, " need ", smem, " bytes of shared memory per block on CUDA; this GPU allows ",
              smem_limit);
  const auto kernel = paged_attention_split_kernel<T, ROWS>;
  // Above 48 KiB, dynamic shared memory must be opted into.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  int ctas_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, kernel, kThreads,
                                                               static_cast<size_t>(smem)));
  const int64_t slots = int64_t{std::max(ctas_per_sm, 1)} * props->multiProcessorCount;
  const int64_t ctas_per_split = p.batch * p.kv_heads * p.row_chunks * p.value_chunks;
  const int64_t max_tiles = ceil_div(p.max_rows, p.tile_keys);
  // Fill the resident slots once (no tail wave), but never below
  // kMinTilesPerSplit tiles per split; then even out the splits' tiles.
  const int64_t most_splits = std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, ceil_div(max_tiles, kMinTilesPerSplit)));
  const int64_t wanted_splits = std::clamp<int64_t>(slots / ctas_per_split, 1, most_splits);
  const int64_t tiles_per_split = std::max<int64_t>(1, ceil_div(max_tiles, wanted_splits));
  p.split_rows = tiles_per_split * p.tile_keys;
  p.splits = std::max<int64_t>(1, ceil_div(max_tiles, tiles_per_split));

  const int64_t out_rows = p.batch * p.heads * p.queries;
  at::Tensor partial_out, partial_stats;  // freed in stream order, after the kernels
  if (p.splits > 1) {
    partial_out = at::empty({out_rows, p.splits, p.value_dim}, float_options);
    partial_stats = at::empty({out_rows, p.splits, 2}, float_options);
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_stats = reinterpret_cast<float2*>(partial_stats.data_ptr<float>());
  }
  kernel<<<grid_size(ctas_per_split * p.splits), kThreads, static_cast<size_t>(smem), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.splits > 1) {
    paged_attention_combine_kernel<T><<<grid_size(out_rows), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_paged_attention(PagedAttentionKernelParams& p, const at::TensorOptions& float_options,
                            cudaStream_t stream) {
  // Balanced chunks of at most max_chunk_rows<T>() rows; the kernel is
  // instantiated for powers of two and masks the rows past a chunk's own.
  const int64_t group_rows = p.group * p.queries;
  p.row_chunks = ceil_div(group_rows, max_chunk_rows<T>());
  p.chunk_rows = ceil_div(group_rows, p.row_chunks);
  if (p.chunk_rows <= 1) {
    launch_with_rows<T, 1>(p, float_options, stream);
  } else if (p.chunk_rows <= 2) {
    launch_with_rows<T, 2>(p, float_options, stream);
  } else if (p.chunk_rows <= 4) {
    launch_with_rows<T, 4>(p, float_options, stream);
  } else if (p.chunk_rows <= 8) {
    launch_with_rows<T, 8>(p, float_options, stream);
  } else if constexpr (max_chunk_rows<T>() >= 16) {
    launch_with_rows<T, 16>(p, float_options, stream);  // float32 only
  }
}

at::Tensor paged_attention_cuda(const at::Tensor& query, const at::Tensor& key_pool,
                                const at::Tensor& value_pool, const at::Tensor& block_table,
                                const at::Tensor& lengths, double scale, double softcap,
                                const std::optional<at::Tensor>& sinks) {
  const PagedAttentionParams s = check_paged_attention_inputs(
      query, key_pool, value_pool, block_table, lengths, scale, softcap, sinks);
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor sinks_f32 = sinks.has_value() ? sinks->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.batch, s.heads, s.queries, s.value_dim}, query.options());
  if (out.numel() == 0) return out;
  const at::Tensor q = query.contiguous();
  const at::Tensor k = key_pool.contiguous();
  const at::Tensor v = value_pool.contiguous();
  const at::Tensor table = block_table.contiguous();
  const at::Tensor lens = lengths.contiguous();

  PagedAttentionKernelParams p{};
  p.query = q.const_data_ptr();
  p.key_pool = k.const_data_ptr();
  p.value_pool = v.const_data_ptr();
  p.block_table = table.const_data_ptr<int64_t>();
  p.lengths = lens.const_data_ptr<int64_t>();
  p.sinks = sinks_f32.defined() ? sinks_f32.const_data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.batch = s.batch;
  p.heads = s.heads;
  p.kv_heads = s.kv_heads;
  p.group = s.group;
  p.queries = s.queries;
  p.head_dim = s.head_dim;
  p.value_dim = s.value_dim;
  p.blocks = s.blocks;
  p.block_rows = s.block_rows;
  p.max_blocks = s.max_blocks;
  p.max_rows = s.max_blocks * s.block_rows;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  const int64_t elem_bytes = q.element_size();
  const int64_t elems_per_word = 16 / elem_bytes;
  p.key_words = static_cast<int>(ceil_div(s.head_dim, elems_per_word));
  p.key_stride = p.key_words | 1;
  const int64_t value_words = ceil_div(s.value_dim, elems_per_word);
  p.chunk_value_words = static_cast<int>(std::min<int64_t>(value_words, kMaxValueWords));
  p.value_chunks = ceil_div(value_words, kMaxValueWords);
  const auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  p.key_vec16 = (s.head_dim * elem_bytes) % 16 == 0 && aligned16(p.key_pool);
  p.value_vec16 = (s.value_dim * elem_bytes) % 16 == 0 && aligned16(p.value_pool);

  const auto float_options = query.options().dtype(at::kFloat);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  REFREEKV_DISPATCH_FLOATS(q.scalar_type(), "paged_attention_cuda", [&] {
    launch_paged_attention<typename DeviceType<scalar_t>::type>(p, float_options, stream);
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(refreekv, CUDA, m) {
  m.impl("paged_attention", &cuda::paged_attention_cuda);
}

}  // namespace refreekv
