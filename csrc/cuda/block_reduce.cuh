// Block-wide reductions for the one-block-per-row kernels (adaptive_keep_count,
// mass_keep_count). Sums run in a fixed order (warp trees, then warp 0 over
// the warps), and min/max are exact whatever the order, so results do not
// depend on scheduling. Every thread of the block must call them, with
// blockDim.x == kThreads, and each returns the block's result to every thread.
#pragma once

#include <cuda_runtime.h>

namespace refreekv {
namespace cuda {

template <int kThreads>
struct BlockScratch {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024,
                "whole warps, and few enough for warp 0 to combine them");
  static constexpr int kWarps = kThreads / 32;
  double warp_values[kWarps];
  double total;
  unsigned long long index;
};

template <int kThreads>
__device__ double block_sum(double v, BlockScratch<kThreads>& s) {
  constexpr int kWarps = BlockScratch<kThreads>::kWarps;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) s.warp_values[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double t = lane < kWarps ? s.warp_values[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (lane == 0) s.total = t;
  }
  __syncthreads();
  const double total = s.total;
  __syncthreads();  // s is reused by the next call
  return total;
}

// Exclusive prefix sum over the block in thread order; `total` gets the sum
// of all values.
template <int kThreads>
__device__ double block_exclusive_scan(double v, double& total, BlockScratch<kThreads>& s) {
  constexpr int kWarps = BlockScratch<kThreads>::kWarps;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double inclusive = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double up = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  if (lane == 31) s.warp_values[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    double w = lane < kWarps ? s.warp_values[lane] : 0.0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double up = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += up;
    }
    if (lane < kWarps) s.warp_values[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const double before_warp = warp == 0 ? 0.0 : s.warp_values[warp - 1];
  total = s.warp_values[kWarps - 1];
  __syncthreads();  // s is reused by the next call
  return before_warp + inclusive - v;
}

// Smallest and largest value over the block, through one shared-memory
// atomic each (exact, hence deterministic). `none` is the identity: threads
// holding it need no atomic.
template <int kThreads>
__device__ unsigned long long block_min(unsigned long long v, BlockScratch<kThreads>& s) {
  constexpr unsigned long long none = ~0ull;
  if (threadIdx.x == 0) s.index = none;
  __syncthreads();
  if (v != none) atomicMin(&s.index, v);
  __syncthreads();
  const unsigned long long result = s.index;
  __syncthreads();  // s is reused by the next call
  return result;
}

template <int kThreads>
__device__ unsigned long long block_max(unsigned long long v, BlockScratch<kThreads>& s) {
  constexpr unsigned long long none = 0;
  if (threadIdx.x == 0) s.index = none;
  __syncthreads();
  if (v != none) atomicMax(&s.index, v);
  __syncthreads();
  const unsigned long long result = s.index;
  __syncthreads();  // s is reused by the next call
  return result;
}

}  // namespace cuda
}  // namespace refreekv
