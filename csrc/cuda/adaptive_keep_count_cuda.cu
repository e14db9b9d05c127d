// CUDA implementation of refreekv::adaptive_keep_count (SPEC 2.3): one kernel
// launch per call, one block per sequence, no host synchronization.
//
// With a_h the ranked scores of head h over its V valid candidates,
//   H B    = sum_h ||a_h[0:V]||_2          (phase 1: one reduction per head)
//   H K(r) = sum_h ||a_h[0:r]||_2          (phase 2: block scans)
// and the answer is the smallest r >= 1 with (B - K(r)) / B <= T. Phase 2
// walks the candidates in chunks of kThreads * kItems: for every head a block
// scan of the squares (in double, as on the CPU: the cut is an integer
// decision and float32 running sums stop growing on long tails) gives every
// candidate of the chunk its prefix norm, the heads' norms are summed per
// candidate, and the block stops at the first chunk holding a candidate that
// meets the rule. Every sum has a fixed order, so the result is deterministic.
//
// Errors: like the CPU kernel this raises a RuntimeError, with the same
// words, for a valid_len outside [0, c] and for non-finite scores. The kernel
// clamps a bad valid_len, records the first bad sequence of each kind in a
// small device buffer (atomicMin: the smallest index, deterministic), and the
// host reads that buffer once: one synchronization per call, which callers
// pay anyway when they read the counts. A device-side assertion instead would
// leave a sticky error that ends CUDA for the whole process.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "block_reduce.cuh"
#include "common.cuh"

namespace refreekv {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kItems = 4;  // consecutive candidates per thread in phase 2
constexpr int kChunk = kThreads * kItems;

struct KeepCountKernelParams {
  const void* scores;        // [b, H, c], contiguous
  const int64_t* valid_len;  // [b] or nullptr
  double* carry;             // [b, H] scratch: running sums of squares
  int64_t* out;              // [b]
  unsigned long long* error;  // [2]: first bad valid_len, first non-finite sequence
  int64_t heads, candidates;
  double threshold;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    keep_count_kernel(const KeepCountKernelParams p) {
  __shared__ BlockScratch<kThreads> scratch;
  const int64_t b = blockIdx.x;
  const int64_t c = p.candidates;
  int64_t valid = c;
  if (p.valid_len != nullptr) {
    valid = p.valid_len[b];
    if (valid < 0 || valid > c) {
      if (threadIdx.x == 0) atomicMin(&p.error[0], static_cast<unsigned long long>(b));
      valid = valid < 0 ? 0 : c;  // reported; the kernel still reads in bounds
    }
  }
  if (valid == 0) {  // nothing to rank, nothing to keep
    if (threadIdx.x == 0) p.out[b] = 0;
    return;
  }
  const T* scores = static_cast<const T*>(p.scores) + b * p.heads * c;
  double* carry = p.carry + b * p.heads;

  // Phase 1: H B, and the extent of the last non-zero score (for T = 0).
  double total = 0.0;
  int64_t extent = 0;
  for (int64_t h = 0; h < p.heads; ++h) {
    const T* row = scores + h * c;
    double squares = 0.0;
    for (int64_t j = threadIdx.x; j < valid; j += kThreads) {
      const double x = to_float(row[j]);
      squares += x * x;
      // j restarts with every head: keep the largest extent over the heads.
      if (x != 0.0 && j + 1 > extent) extent = j + 1;
    }
    total += sqrt(block_sum(squares, scratch));  // same value in every thread
    if (threadIdx.x == 0) carry[h] = 0.0;
  }
  __syncthreads();  // carry's zeros are visible before phase 2 reads them
  if (!isfinite(total)) {  // the same value in every thread: the block leaves together
    if (threadIdx.x == 0) {
      atomicMin(&p.error[1], static_cast<unsigned long long>(b));
      p.out[b] = valid;
    }
    return;
  }
  if (total == 0.0) {  // degenerate signal: keep everything
    if (threadIdx.x == 0) p.out[b] = valid;
    return;
  }
  if (p.threshold == 0.0) {
    // Exactly lossless: stop only where every remaining score is zero.
    const unsigned long long last = block_max(static_cast<unsigned long long>(extent), scratch);
    if (threadIdx.x == 0) p.out[b] = static_cast<int64_t>(last);
    return;
  }

  // Phase 2: prefix norms chunk by chunk until the rule is met.
  for (int64_t c0 = 0; c0 < valid; c0 += kChunk) {
    const int64_t j_first = c0 + static_cast<int64_t>(threadIdx.x) * kItems;
    double norm[kItems];
#pragma unroll
    for (int e = 0; e < kItems; ++e) norm[e] = 0.0;
    for (int64_t h = 0; h < p.heads; ++h) {
      const T* row = scores + h * c;
      double prefix[kItems];
      double run = 0.0;
#pragma unroll
      for (int e = 0; e < kItems; ++e) {
        const int64_t j = j_first + e;
        const double x = j < valid ? static_cast<double>(to_float(row[j])) : 0.0;
        run += x * x;
        prefix[e] = run;
      }
      const double before_chunk = carry[h];  // read before thread 0 updates it
      double chunk_total;
      const double before_thread = block_exclusive_scan(run, chunk_total, scratch);
#pragma unroll
      for (int e = 0; e < kItems; ++e) norm[e] += sqrt(before_chunk + (before_thread + prefix[e]));
      if (threadIdx.x == 0) carry[h] = before_chunk + chunk_total;
      // The scan's barriers order this write before the next chunk's reads.
    }
    unsigned long long first = ~0ull;
#pragma unroll
    for (int e = 0; e < kItems; ++e) {
      const int64_t j = j_first + e;
      if (j < valid && first == ~0ull && (total - norm[e]) / total <= p.threshold) {
        first = static_cast<unsigned long long>(j + 1);
      }
    }
    const unsigned long long found = block_min(first, scratch);
    if (found != ~0ull) {
      if (threadIdx.x == 0) p.out[b] = static_cast<int64_t>(found);
      return;
    }
  }
  // Unreachable up to rounding: K(V) == B meets the rule for any T > 0.
  if (threadIdx.x == 0) p.out[b] = valid;
}

at::Tensor adaptive_keep_count_cuda(const at::Tensor& ranked_scores, double threshold,
                                    const std::optional<at::Tensor>& valid_len) {
  const KeepCountParams s = check_keep_count_inputs(ranked_scores, threshold, valid_len);
  const c10::cuda::CUDAGuard guard(ranked_scores.device());
  const at::Tensor scores = ranked_scores.contiguous();
  at::Tensor lens;
  if (valid_len.has_value()) lens = valid_len->contiguous();
  at::Tensor result = at::empty({s.batch}, scores.options().dtype(at::kLong));
  if (s.batch == 0) return result;
  // Scratch for the per-head running sums; written by the kernel before it is
  // read, so no fill (and no second launch) is needed.
  at::Tensor carry = at::empty({s.batch, s.heads}, scores.options().dtype(at::kDouble));
  ErrorReport<2> errors(scores.options());

  KeepCountKernelParams p{};
  p.scores = scores.const_data_ptr();
  p.valid_len = lens.defined() ? lens.const_data_ptr<int64_t>() : nullptr;
  p.carry = carry.data_ptr<double>();
  p.out = result.data_ptr<int64_t>();
  p.error = errors.device_slots();
  p.heads = s.heads;
  p.candidates = s.candidates;
  p.threshold = threshold;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  REFREEKV_DISPATCH_FLOATS(scores.scalar_type(), "adaptive_keep_count_cuda", [&] {
    keep_count_kernel<typename DeviceType<scalar_t>::type>
        <<<grid_size(s.batch), kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const auto first_bad = errors.read();  // the one synchronization (see the top of the file)
  if (first_bad[0] != kNoError) {
    const int64_t b = static_cast<int64_t>(first_bad[0]);
    TORCH_CHECK(false, "adaptive_keep_count: expected valid_len[", b, "] in [0, ", s.candidates,
                "] (the number of candidates), got ", lens[b].item<int64_t>());
  }
  TORCH_CHECK(first_bad[1] == kNoError,
              "adaptive_keep_count: expected finite ranked_scores, got NaN or inf");
  return result;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(refreekv, CUDA, m) {
  m.impl("adaptive_keep_count", &cuda::adaptive_keep_count_cuda);
}

}  // namespace refreekv
