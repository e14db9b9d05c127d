// CUDA implementation of refreekv::attention_importance (SPEC 4).
//
// Two paths, both two-pass so that a row's softmax normalizer is global over
// all of its keys before any probability is formed, and both deterministic
// (every sum has a fixed order; no floating-point atomics):
//
// * Small window (w <= kSmallWindowMax, the ReFreeKV default w = 1): the job
//   is bandwidth-bound, so K is read once per kSmallRowsMax query rows of a
//   GQA group (exactly once up to g * w = 32). One block owns a tile of
//   kSmallKeys keys of one (batch, kv head) and computes the logits of up to
//   kSmallRowsMax of the group's g * w query rows for it, storing the logits
//   (O(b H w n), w small) and a per-tile (max, sum exp) partial per row. A tiny kernel
//   merges the partials into each row's log-sum-exp, and a last elementwise
//   kernel turns the stored logits into probabilities, sums the rows, reduces
//   the group and normalizes.
// * Large window (up to w = n, H2O accumulation): flash-attention style tiles.
//   Pass 1: one block per (query tile, head) runs an online softmax over the
//   key tiles its rows can see (causally hidden tiles are skipped) and writes
//   each row's log-sum-exp. Pass 2: one block per (key tile, batch, kv head)
//   keeps its key tile in shared memory and loops over the GQA group's heads
//   and over the query tiles that can see the tile, re-forming
//   exp(s q.k - lse) and summing per key. Only O(b H w) log-sum-exps and
//   tiles ever exist; the w x n matrix never does. The QK^T tile uses tensor
//   cores (WMMA, float32 accumulation) for float16/bfloat16 inputs and exact
//   float32 FMAs for float32 inputs (no TF32, so float32 keeps float32
//   accuracy). Before sm_80 WMMA has no bfloat16 fragments, so bfloat16 tiles
//   are float32 FMAs there (chosen at compile time, per architecture).
//
// Masking: key j is visible to window row i (absolute position n - w + i)
// when j <= n - w + i and kv_valid[b, j]. A row that sees no key gets
// lse = +inf (its sink, with sinks), so all of its probabilities are
// exp(-inf - lse) = 0: it contributes nothing, as on the CPU.
//
// Variants: a softcap is applied wherever a logit is formed (logit()), before
// masking; a sink enters only a row's log-sum-exp (row_lse()), as one more
// term of the normalizer, so every probability formed afterwards shrinks by
// the right factor. Sinks are checked to be finite on the host before any
// launch, with the CPU's words: a copy of H floats, and a synchronization
// only for models that have sinks. A device-side assertion instead would end
// CUDA for the whole process, where the CPU raises an error one can catch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../checks.h"
#include "common.cuh"

namespace refreekv {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------
// Parameters shared by the kernels of one call.
// ---------------------------------------------------------------------------
struct ImportanceKernelParams {
  const void* query;   // [b, H, w, d], contiguous
  const void* key;     // [b, Hkv, n, d], contiguous
  const bool* valid;   // [b, n] or nullptr
  const float* sinks;  // [H] sink logits, or nullptr
  float* logits;       // small path: [b, H, w, n] (may alias out)
  float2* partials;    // small path: [b * H * w, tiles] (max, sum exp)
  float* lse;          // [b * H * w] row log-sum-exp (+inf: blind row, no sink)
  float* out;          // [b, H or Hkv, n]
  int64_t batch, heads, kv_heads, group, window, keys, head_dim;
  int64_t tiles;       // small path: key tiles per (b, kv head)
  int64_t row_chunks;  // small path: blocks of kSmallRowsMax rows per GQA group
  float scale;
  float softcap;       // > 0: logits are capped to softcap * tanh(x / softcap)
  int reduce;          // GroupReduce as int
  bool normalize;
  bool vec16;          // rows of query and key allow 16-byte copies
};

constexpr int kReduceNone = static_cast<int>(GroupReduce::kNone);
constexpr int kReduceMean = static_cast<int>(GroupReduce::kMean);  // else kMax

__device__ __forceinline__ bool key_valid(const ImportanceKernelParams& p,
                                          int64_t b, int64_t j) {
  return p.valid == nullptr || p.valid[b * p.keys + j];
}

// The logit of a raw dot product q.k: scaled, then capped when there is a
// softcap, in Gemma 2's order. Every pass forms its logits here, so a row's
// log-sum-exp and its probabilities see the same values.
__device__ __forceinline__ float logit(const ImportanceKernelParams& p, float dot) {
  const float x = p.scale * dot;
  return p.softcap > 0.0f ? p.softcap * tanhf(x / p.softcap) : x;
}

// The log-sum-exp of one row of query head `head` from its running
// (max, sum of exp(x - max)) over the visible keys. The head's sink, when
// there are sinks, is one more term exp(sink) of the sum; it is unscaled and
// uncapped, as in GPT-OSS. A row that sees no key gets +inf without a sink
// and the sink with one: its probabilities are 0 either way.
__device__ __forceinline__ float row_lse(const ImportanceKernelParams& p,
                                         int64_t head, float m, float s) {
  if (p.sinks != nullptr) merge_softmax(m, s, p.sinks[head], 1.0f);  // finite: checked on the host
  return m == -INFINITY ? INFINITY : m + logf(s);
}

// Writes one key's group-reduced, normalized score. raw[] holds the summed
// probabilities of the group's heads for key j. Order as on the CPU: group
// reduction first, then division by the number of rows that see the key.
__device__ __forceinline__ void write_scores(const ImportanceKernelParams& p,
                                             int64_t b, int64_t kv_head,
                                             int64_t j, int hg, float raw,
                                             float& reduced) {
  const float count = static_cast<float>(std::min<int64_t>(p.window, p.keys - j));
  if (p.reduce == kReduceNone) {
    const int64_t h = kv_head * p.group + hg;
    p.out[(b * p.heads + h) * p.keys + j] = p.normalize ? raw / count : raw;
    return;
  }
  if (p.reduce == kReduceMean) {
    reduced = hg == 0 ? raw : reduced + raw;
  } else {
    reduced = hg == 0 ? raw : fmaxf(reduced, raw);
  }
  if (hg == p.group - 1) {
    float v = p.reduce == kReduceMean ? reduced / static_cast<float>(p.group) : reduced;
    if (p.normalize) v /= count;
    p.out[(b * p.kv_heads + kv_head) * p.keys + j] = v;
  }
}

// ===========================================================================
// Small-window path
// ===========================================================================
constexpr int kSmallKeys = 128;        // keys per block, one per thread
constexpr int kSmallChunkBytes = 128;  // bytes of each key row staged at once
constexpr int kSmallWindowMax = 4;
constexpr int kSmallRowsMax = 32;      // query rows handled by one block
constexpr int kFinalizeThreads = 256;

// Pass 1: logits of one chunk of the group's g * w rows (rows
// [c * kSmallRowsMax, (c + 1) * kSmallRowsMax) of the group, chunk c) for one
// key tile, plus per-row (max, sum exp) over the tile. ROWS >= the chunk's
// rows; rows past them are zero queries whose results are discarded (ROWS is
// a compile-time bound so the accumulators stay in registers).
template <typename T, int ROWS>
__global__ void __launch_bounds__(kSmallKeys)
    small_window_logits_kernel(const ImportanceKernelParams p) {
  constexpr int kE = 16 / sizeof(T);                        // elements per 16 B
  constexpr int kChunk = kSmallChunkBytes / sizeof(T);      // elements per chunk
  // Row stride 144 B = 9 x 16 B: odd, so the 16-byte reads of 8 consecutive
  // rows (one shared-memory phase) hit distinct banks.
  constexpr int kStride = kChunk + kE;
  __shared__ __align__(16) T k_s[kSmallKeys * kStride];
  __shared__ __align__(16) float q_s[ROWS * kChunk];
  __shared__ float2 warp_part[ROWS][kSmallKeys / 32];

  const int64_t tile = blockIdx.x % p.tiles;
  const int64_t chunk = (blockIdx.x / p.tiles) % p.row_chunks;
  const int64_t bkv = blockIdx.x / (p.tiles * p.row_chunks);  // b * Hkv + kv_head
  const int64_t b = bkv / p.kv_heads;
  const int64_t kv_head = bkv % p.kv_heads;
  const int64_t j0 = tile * kSmallKeys;
  const int key_rows = static_cast<int>(std::min<int64_t>(kSmallKeys, p.keys - j0));
  const int64_t chunk_start = chunk * kSmallRowsMax;  // first group row of the chunk
  const int rows = static_cast<int>(std::min<int64_t>(kSmallRowsMax, p.group * p.window - chunk_start));  // <= ROWS
  const int64_t d = p.head_dim;
  const T* key = static_cast<const T*>(p.key) + (bkv * p.keys + j0) * d;
  // The group's query rows are contiguous: heads kv_head*g .. +g-1, each with
  // w rows, so group row r is head kv_head*g + r / w, window row r % w.
  const int64_t first_row = (b * p.heads + kv_head * p.group) * p.window + chunk_start;
  const T* query = static_cast<const T*>(p.query) + first_row * d;

  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;

  for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
    const int cols = static_cast<int>(std::min<int64_t>(kChunk, d - c0));
    const int words = (cols + kE - 1) / kE;
    load_tile<T>(k_s, kStride, words * kE, key + c0, d, key_rows, kSmallKeys, cols,
                 p.vec16);
    for (int e = threadIdx.x; e < ROWS * kChunk; e += blockDim.x) {
      const int r = e / kChunk;
      const int c = e % kChunk;
      q_s[e] = (r < rows && c < cols) ? to_float(query[r * d + c0 + c]) : 0.0f;
    }
    cp_async_wait_all();
    __syncthreads();
    const T* k_row = k_s + threadIdx.x * kStride;
#pragma unroll 2
    for (int v = 0; v < words; ++v) {
      float kf[kE];
      Vec16<T>::to_floats(*reinterpret_cast<const uint4*>(k_row + v * kE), kf);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        // Every lane reads the same query word: a shared-memory broadcast.
        const float4* qv = reinterpret_cast<const float4*>(q_s + r * kChunk + v * kE);
#pragma unroll
        for (int e4 = 0; e4 < kE / 4; ++e4) {
          const float4 q4 = qv[e4];
          acc[r] = fmaf(q4.x, kf[4 * e4 + 0], acc[r]);
          acc[r] = fmaf(q4.y, kf[4 * e4 + 1], acc[r]);
          acc[r] = fmaf(q4.z, kf[4 * e4 + 2], acc[r]);
          acc[r] = fmaf(q4.w, kf[4 * e4 + 3], acc[r]);
        }
      }
    }
    __syncthreads();  // before the next chunk overwrites k_s and q_s
  }

  const int64_t j = j0 + threadIdx.x;
  const bool in_range = j < p.keys;
  const bool valid = in_range && key_valid(p, b, j);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (r >= rows) break;  // uniform over the block
    const int64_t i = (chunk_start + r) % p.window;
    const bool visible = valid && j <= p.keys - p.window + i;
    const float x = visible ? logit(p, acc[r]) : -INFINITY;
    if (in_range) p.logits[(first_row + r) * p.keys + j] = x;
    const float m = warp_max(x);
    const float s = warp_sum(m == -INFINITY ? 0.0f : expf(x - m));
    if (lane == 0) warp_part[r][warp] = make_float2(m, s);
  }
  __syncthreads();
  if (threadIdx.x < rows) {
    const int r = threadIdx.x;
    float m = -INFINITY, s = 0.0f;
#pragma unroll
    for (int w = 0; w < kSmallKeys / 32; ++w) merge_softmax(m, s, warp_part[r][w].x, warp_part[r][w].y);
    p.partials[(first_row + r) * p.tiles + tile] = make_float2(m, s);
  }
}

// Merges the per-tile partials of each row into its log-sum-exp; one warp per
// row, fixed merge order.
__global__ void small_window_lse_kernel(const ImportanceKernelParams p, int64_t total_rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= total_rows) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  float m = -INFINITY, s = 0.0f;
  for (int64_t t = lane; t < p.tiles; t += 32) {
    const float2 part = p.partials[row * p.tiles + t];
    merge_softmax(m, s, part.x, part.y);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge_softmax(m, s, m2, s2);
  }
  // Rows are (b, head, window row) in row-major order.
  if (lane == 0) p.lse[row] = row_lse(p, (row / p.window) % p.heads, m, s);
}

// Probabilities from the stored logits, summed over the window rows,
// reduced over the group and normalized; one thread per key. When w == 1 and
// there is no group reduction the logits live in `out` itself and each
// thread overwrites exactly the element it read.
__global__ void __launch_bounds__(kFinalizeThreads)
    small_window_finalize_kernel(const ImportanceKernelParams p, int64_t key_tiles) {
  const int64_t tile = blockIdx.x % key_tiles;
  const int64_t bkv = blockIdx.x / key_tiles;
  const int64_t b = bkv / p.kv_heads;
  const int64_t kv_head = bkv % p.kv_heads;
  const int64_t j = tile * kFinalizeThreads + threadIdx.x;
  if (j >= p.keys) return;
  float reduced = 0.0f;
  for (int hg = 0; hg < p.group; ++hg) {
    const int64_t row0 = (b * p.heads + kv_head * p.group + hg) * p.window;
    float raw = 0.0f;
    for (int64_t i = 0; i < p.window; ++i) {
      raw += expf(p.logits[(row0 + i) * p.keys + j] - p.lse[row0 + i]);
    }
    write_scores(p, b, kv_head, j, hg, raw, reduced);
  }
}

template <typename T, int ROWS>
void launch_small_rows(const ImportanceKernelParams& p, cudaStream_t stream) {
  const int64_t blocks = p.tiles * p.row_chunks * p.batch * p.kv_heads;
  small_window_logits_kernel<T, ROWS><<<grid_size(blocks), kSmallKeys, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_small_window(const ImportanceKernelParams& p, cudaStream_t stream) {
  const int64_t rows = std::min<int64_t>(p.group * p.window, kSmallRowsMax);  // per block
  if (rows <= 1) {
    launch_small_rows<T, 1>(p, stream);
  } else if (rows <= 4) {
    launch_small_rows<T, 4>(p, stream);
  } else if (rows <= 8) {
    launch_small_rows<T, 8>(p, stream);
  } else if (rows <= 16) {
    launch_small_rows<T, 16>(p, stream);
  } else {
    launch_small_rows<T, kSmallRowsMax>(p, stream);
  }
  const int64_t total_rows = p.batch * p.heads * p.window;
  constexpr int kWarps = 8;
  small_window_lse_kernel<<<grid_size(ceil_div(total_rows, kWarps)), kWarps * 32, 0, stream>>>(p, total_rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t key_tiles = ceil_div(p.keys, kFinalizeThreads);
  small_window_finalize_kernel<<<grid_size(key_tiles * p.batch * p.kv_heads), kFinalizeThreads, 0, stream>>>(
      p, key_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ===========================================================================
// Large-window path
// ===========================================================================
constexpr int kBM = 64;               // query rows per tile
constexpr int kBN = 64;               // keys per tile
constexpr int kTileThreads = 256;     // 8 warps
constexpr int kChunkBytes = 256;      // head_dim bytes staged at once
constexpr int kSStride = kBN + 4;     // float row stride of the score tile

template <typename T>
struct TileLayout {
  static constexpr int kE = 16 / sizeof(T);
  static constexpr int kChunk = kChunkBytes / sizeof(T);  // 128 half or 64 float
  // +16 bytes per row: keeps WMMA's ldm a multiple of 8 halves and makes
  // rows start on different banks.
  static constexpr int kStride = kChunk + kE;
  static constexpr size_t kQBytes = size_t{kBM} * kStride * sizeof(T);
  static constexpr size_t kKBytes = size_t{kBN} * kStride * sizeof(T);
  static constexpr size_t kSBytes = size_t{kBM} * kSStride * sizeof(float);
  static constexpr size_t kExtraBytes = (kBM + 4 * kBN) * sizeof(float);
  static constexpr size_t kSmemBytes = kQBytes + kKBytes + kSBytes + kExtraBytes;
  // Elements of a chunk rounded up to the MMA's k step (16) or to a 16-byte
  // word; the loads zero-fill up to it.
  __device__ static int padded_cols(int cols) {
    constexpr int step = sizeof(T) == 2 ? 16 : 4;
    return (cols + step - 1) / step * step;
  }
};

// WMMA has bfloat16 fragments from sm_80 on (float16 ones from sm_70). The
// host pass sees the newest architecture's declarations; TileMma is device
// code only, so each device pass may pick its own implementation.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define REFREEKV_BF16_WMMA 1
#endif

// S[r][c] = q_r . k_c over one head_dim chunk, accumulated into the caller's
// fragments. Half precision: WMMA 16x16x16, each of the 8 warps owns a 16-row
// strip and two 16-column blocks of the 64 x 64 tile.
template <typename T>
struct TileMma {
  using Frag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  Frag acc[2];
  __device__ void zero() {
    nvcuda::wmma::fill_fragment(acc[0], 0.0f);
    nvcuda::wmma::fill_fragment(acc[1], 0.0f);
  }
  __device__ void accumulate(const T* q_s, const T* k_s, int cols) {
    using namespace nvcuda;
    constexpr int ld = TileLayout<T>::kStride;
    const int warp = threadIdx.x / 32;
    const int row = (warp / 2) * 16;
    const int col = (warp % 2) * 32;
    for (int k = 0; k < cols; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, q_s + row * ld + k, ld);
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        // K is stored [key][dim], i.e. K^T in column-major order.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bfrag;
        wmma::load_matrix_sync(bfrag, k_s + (col + 16 * c) * ld + k, ld);
        wmma::mma_sync(acc[c], a, bfrag, acc[c]);
      }
    }
  }
  __device__ void store(float* s_s) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int row = (warp / 2) * 16;
    const int col = (warp % 2) * 32;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      wmma::store_matrix_sync(s_s + row * kSStride + col + 16 * c, acc[c], kSStride,
                              wmma::mem_row_major);
    }
  }
};

// Four consecutive elements of a shared-memory row as floats (8-byte aligned
// for 16-bit types, 16-byte aligned for float32).
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
template <typename T>
__device__ __forceinline__ float4 load4(const T* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
  return make_float4(to_float(e[0]), to_float(e[1]), to_float(e[2]), to_float(e[3]));
}

// Float32 FMAs: exact for float32 inputs, and the bfloat16 tile where WMMA
// has no bfloat16 fragments. Thread (tx, ty) of a 16 x 16 grid owns rows
// ty + 16a and columns tx + 16c (a, c < 4), reading four elements at a time.
template <typename T>
struct TileFma {
  float acc[4][4];
  __device__ void zero() {
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][c] = 0.0f;
  }
  __device__ void accumulate(const T* q_s, const T* k_s, int cols) {
    constexpr int ld = TileLayout<T>::kStride;
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    for (int k = 0; k < cols; k += 4) {
      float4 qv[4], kv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) qv[a] = load4(q_s + (ty + 16 * a) * ld + k);
#pragma unroll
      for (int c = 0; c < 4; ++c) kv[c] = load4(k_s + (tx + 16 * c) * ld + k);
#pragma unroll
      for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          acc[a][c] = fmaf(qv[a].x, kv[c].x, acc[a][c]);
          acc[a][c] = fmaf(qv[a].y, kv[c].y, acc[a][c]);
          acc[a][c] = fmaf(qv[a].z, kv[c].z, acc[a][c]);
          acc[a][c] = fmaf(qv[a].w, kv[c].w, acc[a][c]);
        }
      }
    }
  }
  __device__ void store(float* s_s) {
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int c = 0; c < 4; ++c) s_s[(ty + 16 * a) * kSStride + tx + 16 * c] = acc[a][c];
  }
};

template <>
struct TileMma<float> : TileFma<float> {};
#ifndef REFREEKV_BF16_WMMA
template <>
struct TileMma<__nv_bfloat16> : TileFma<__nv_bfloat16> {};
#endif

// Shared-memory views of one tile block.
template <typename T>
struct TileSmem {
  T* q;        // [kBM][kStride]
  T* k;        // [kBN][kStride]
  float* s;    // [kBM][kSStride] raw dot products
  float* lse;  // [kBM]
  float* red;  // [4][kBN]
  __device__ explicit TileSmem(unsigned char* base) {
    q = reinterpret_cast<T*>(base);
    k = reinterpret_cast<T*>(base + TileLayout<T>::kQBytes);
    s = reinterpret_cast<float*>(base + TileLayout<T>::kQBytes + TileLayout<T>::kKBytes);
    lse = s + kBM * kSStride;
    red = lse + kBM;
  }
};

// Fills smem.s with q_r . k_c for query rows [0, q_rows) of `query` and key
// rows [0, k_rows) of `key` (both row-major with row stride d). When the
// whole head_dim fits one chunk the caller may have loaded q (q_resident) or
// k (k_resident) already; they are then not reloaded. Ends synchronized:
// smem.s is readable by every thread.
template <typename T>
__device__ void tile_scores(const TileSmem<T>& smem, const T* query, int q_rows,
                            bool q_resident, const T* key, int k_rows,
                            bool k_resident, int64_t d, bool vec16) {
  using L = TileLayout<T>;
  TileMma<T> mma;
  mma.zero();
  for (int64_t c0 = 0; c0 < d; c0 += L::kChunk) {
    const int cols = static_cast<int>(std::min<int64_t>(L::kChunk, d - c0));
    const int padded = L::padded_cols(cols);
    if (!q_resident) load_tile<T>(smem.q, L::kStride, padded, query + c0, d, q_rows, kBM, cols, vec16);
    if (!k_resident) load_tile<T>(smem.k, L::kStride, padded, key + c0, d, k_rows, kBN, cols, vec16);
    cp_async_wait_all();
    __syncthreads();
    mma.accumulate(smem.q, smem.k, padded);
    __syncthreads();  // the next chunk (or tile) overwrites q and k
  }
  mma.store(smem.s);
  __syncthreads();
}

// Pass 1: the log-sum-exp of every window row. Blocks are ordered so the
// query tiles with the most visible keys start first.
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    row_lse_kernel(const ImportanceKernelParams p, int64_t query_tiles) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  using L = TileLayout<T>;
  const TileSmem<T> smem(smem_raw);
  const int64_t bh = blockIdx.x % (p.batch * p.heads);
  const int64_t qt = query_tiles - 1 - blockIdx.x / (p.batch * p.heads);
  const int64_t b = bh / p.heads;
  const int64_t kv_head = (bh % p.heads) / p.group;
  const int64_t d = p.head_dim;
  const int64_t i0 = qt * kBM;
  const int q_rows = static_cast<int>(std::min<int64_t>(kBM, p.window - i0));
  const T* query = static_cast<const T*>(p.query) + (bh * p.window + i0) * d;
  const T* key_head = static_cast<const T*>(p.key) + (b * p.kv_heads + kv_head) * p.keys * d;
  const int64_t first_pos = p.keys - p.window + i0;  // position of tile row 0
  const int64_t last_pos = first_pos + q_rows - 1;
  const int64_t key_tiles = last_pos / kBN + 1;     // later tiles are hidden

  const bool q_resident = d <= L::kChunk;
  if (q_resident) {
    load_tile<T>(smem.q, L::kStride, L::padded_cols(static_cast<int>(d)), query, d, q_rows, kBM,
                 static_cast<int>(d), p.vec16);
  }
  // Four threads per row, 16 columns each.
  const int r = threadIdx.x / 4;
  const int part = threadIdx.x % 4;
  const int64_t pos = first_pos + r;
  float m = -INFINITY, l = 0.0f;
  for (int64_t kt = 0; kt < key_tiles; ++kt) {
    const int64_t j0 = kt * kBN;
    const int k_rows = static_cast<int>(std::min<int64_t>(kBN, p.keys - j0));
    tile_scores<T>(smem, query, q_rows, q_resident, key_head + j0 * d, k_rows, false, d, p.vec16);
    float x[16];
    float tile_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const int col = part * 16 + c;
      const int64_t j = j0 + col;
      const bool visible = r < q_rows && col < k_rows && j <= pos && key_valid(p, b, j);
      x[c] = visible ? logit(p, smem.s[r * kSStride + col]) : -INFINITY;
      tile_max = fmaxf(tile_max, x[c]);
    }
    // The row's four threads are adjacent lanes of one warp.
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float m_new = fmaxf(m, tile_max);
    if (m_new != -INFINITY) {
      l *= expf(m - m_new);  // m == -inf: l is 0 and stays 0
#pragma unroll
      for (int c = 0; c < 16; ++c) l += expf(x[c] - m_new);
      m = m_new;
    }
    __syncthreads();  // smem.s is rewritten by the next tile
  }
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  if (part == 0 && r < q_rows) {
    p.lse[bh * p.window + i0 + r] = row_lse(p, bh % p.heads, m, l);
  }
}

// Pass 2: per-key sums of exp(s q.k - lse). One block owns a key tile of one
// (batch, kv head) and loops over the group's heads and over the query tiles
// that can see the tile, in a fixed order. Blocks are ordered so the key tiles
// seen by the most query tiles start first.
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    key_sums_kernel(const ImportanceKernelParams p, int64_t key_tiles) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  using L = TileLayout<T>;
  const TileSmem<T> smem(smem_raw);
  const int64_t bkv = blockIdx.x % (p.batch * p.kv_heads);
  const int64_t kt = blockIdx.x / (p.batch * p.kv_heads);
  const int64_t b = bkv / p.kv_heads;
  const int64_t kv_head = bkv % p.kv_heads;
  const int64_t d = p.head_dim;
  const int64_t j0 = kt * kBN;
  const int k_rows = static_cast<int>(std::min<int64_t>(kBN, p.keys - j0));
  const T* key = static_cast<const T*>(p.key) + (bkv * p.keys + j0) * d;
  const int64_t window_start = p.keys - p.window;  // position of window row 0
  // Window rows at positions >= j0 see some key of the tile.
  const int64_t first_qt = std::max<int64_t>(0, j0 - window_start) / kBM;
  const int64_t query_tiles = ceil_div(p.window, kBM);

  const bool k_resident = d <= L::kChunk;
  if (k_resident) {
    load_tile<T>(smem.k, L::kStride, L::padded_cols(static_cast<int>(d)), key, d, k_rows, kBN,
                 static_cast<int>(d), p.vec16);
  }
  // Thread owns column `col` and rows [16 * part, 16 * part + 16) of a tile.
  const int col = threadIdx.x % kBN;
  const int part = threadIdx.x / kBN;
  const int64_t j = j0 + col;
  const bool key_ok = col < k_rows && key_valid(p, b, j);
  float reduced = 0.0f;
  for (int hg = 0; hg < p.group; ++hg) {
    const int64_t bh = b * p.heads + kv_head * p.group + hg;
    float sum = 0.0f;
    for (int64_t qt = first_qt; qt < query_tiles; ++qt) {
      const int64_t i0 = qt * kBM;
      const int q_rows = static_cast<int>(std::min<int64_t>(kBM, p.window - i0));
      if (threadIdx.x < kBM) {
        smem.lse[threadIdx.x] = threadIdx.x < q_rows ? p.lse[bh * p.window + i0 + threadIdx.x] : INFINITY;
      }
      // tile_scores synchronizes before anyone reads smem.lse.
      const T* query = static_cast<const T*>(p.query) + (bh * p.window + i0) * d;
      tile_scores<T>(smem, query, q_rows, false, key, k_rows, k_resident, d, p.vec16);
      if (key_ok) {
#pragma unroll 4
        for (int rr = 0; rr < 16; ++rr) {
          const int r = part * 16 + rr;
          // Rows past q_rows have lse = +inf and add exp(-inf) = 0; causally
          // hidden pairs are skipped.
          if (j <= window_start + i0 + r) {
            sum += expf(logit(p, smem.s[r * kSStride + col]) - smem.lse[r]);
          }
        }
      }
      __syncthreads();  // smem.s and smem.lse are rewritten by the next tile
    }
    smem.red[part * kBN + col] = sum;
    __syncthreads();
    if (part == 0 && col < k_rows) {
      const float raw = smem.red[col] + smem.red[kBN + col] + smem.red[2 * kBN + col] +
                        smem.red[3 * kBN + col];
      write_scores(p, b, kv_head, j, hg, raw, reduced);
    }
    __syncthreads();  // smem.red is rewritten by the next head
  }
}

template <typename T>
void launch_large_window(const ImportanceKernelParams& p, cudaStream_t stream) {
  constexpr size_t smem = TileLayout<T>::kSmemBytes;
  // Above the 48 KiB default, dynamic shared memory must be opted into (sm_80+
  // allows up to 163 KiB per block; this needs about 53 KiB).
  C10_CUDA_CHECK(cudaFuncSetAttribute(row_lse_kernel<T>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  C10_CUDA_CHECK(cudaFuncSetAttribute(key_sums_kernel<T>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  const int64_t query_tiles = ceil_div(p.window, kBM);
  row_lse_kernel<T><<<grid_size(query_tiles * p.batch * p.heads), kTileThreads, smem, stream>>>(p, query_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t key_tiles = ceil_div(p.keys, kBN);
  key_sums_kernel<T><<<grid_size(key_tiles * p.batch * p.kv_heads), kTileThreads, smem, stream>>>(p, key_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ===========================================================================
// Entry point
// ===========================================================================
// Large groups with a small window stay here too: a 64-row query tile would
// hold w <= 4 real rows, at least 16x the work.
bool use_small_window(const ImportanceParams& s) { return s.window <= kSmallWindowMax; }

at::Tensor attention_importance_cuda(const at::Tensor& query, const at::Tensor& key,
                                     double scale,
                                     const std::optional<at::Tensor>& kv_valid,
                                     bool normalize, c10::string_view group_reduce,
                                     double softcap, const std::optional<at::Tensor>& sinks) {
  const ImportanceParams s =
      check_importance_inputs(query, key, scale, kv_valid, group_reduce, softcap, sinks);
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = query.contiguous();
  const at::Tensor k = key.contiguous();
  at::Tensor valid;
  if (kv_valid.has_value()) valid = kv_valid->contiguous();
  at::Tensor sinks_f32;
  if (sinks.has_value()) {
    float_sinks_on_host(sinks->cpu());  // raises for a non-finite sink (see the top of the file)
    sinks_f32 = sinks->to(at::kFloat).contiguous();
  }
  const auto float_opts = query.options().dtype(at::kFloat);
  const int64_t out_heads = s.reduce == GroupReduce::kNone ? s.heads : s.kv_heads;
  at::Tensor out = at::empty({s.batch, out_heads, s.keys}, float_opts);
  if (out.numel() == 0) return out;

  ImportanceKernelParams p{};
  p.query = q.const_data_ptr();
  p.key = k.const_data_ptr();
  p.valid = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
  p.sinks = sinks_f32.defined() ? sinks_f32.const_data_ptr<float>() : nullptr;
  p.out = out.data_ptr<float>();
  p.batch = s.batch;
  p.heads = s.heads;
  p.kv_heads = s.kv_heads;
  p.group = s.group;
  p.window = s.window;
  p.keys = s.keys;
  p.head_dim = s.head_dim;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.reduce = static_cast<int>(s.reduce);
  p.normalize = normalize;
  const int64_t row_bytes = s.head_dim * q.element_size();
  p.vec16 = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(p.query) % 16 == 0 &&
            reinterpret_cast<uintptr_t>(p.key) % 16 == 0;

  at::Tensor lse = at::empty({s.batch * s.heads * s.window}, float_opts);
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (use_small_window(s)) {
    p.tiles = ceil_div(s.keys, kSmallKeys);
    p.row_chunks = ceil_div(s.group * s.window, kSmallRowsMax);
    at::Tensor partials = at::empty({s.batch * s.heads * s.window, p.tiles, 2}, float_opts);
    p.partials = reinterpret_cast<float2*>(partials.data_ptr<float>());
    at::Tensor logits;
    if (s.window == 1 && s.reduce == GroupReduce::kNone) {
      p.logits = p.out;  // [b, H, 1, n] is out's layout
    } else {
      logits = at::empty({s.batch, s.heads, s.window, s.keys}, float_opts);
      p.logits = logits.data_ptr<float>();
    }
    REFREEKV_DISPATCH_FLOATS(q.scalar_type(), "attention_importance_cuda", [&] {
      launch_small_window<typename DeviceType<scalar_t>::type>(p, stream);
    });
  } else {
    REFREEKV_DISPATCH_FLOATS(q.scalar_type(), "attention_importance_cuda", [&] {
      launch_large_window<typename DeviceType<scalar_t>::type>(p, stream);
    });
  }
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(refreekv, CUDA, m) {
  m.impl("attention_importance", &cuda::attention_importance_cuda);
}

}  // namespace refreekv
