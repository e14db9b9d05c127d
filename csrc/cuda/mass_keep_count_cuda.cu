// CUDA implementation of refreekv::mass_keep_count: one kernel launch per
// call, one block per (sequence, head) row, no host synchronization.
//
// With a[0:V] the row's V valid ranked scores, M = sum a[0:V] and
// P(r) = sum a[0:r], the answer is the smallest r in [1, V] with
// M - P(r) <= delta M. Phase 1 reduces M and the extent of the last non-zero
// score over the block. Phase 2 walks the candidates in chunks of
// kThreads * kItems: a block scan (in double, as on the CPU: the cut is an
// integer decision and float32 running sums stop growing on long tails) gives
// every candidate of the chunk its prefix, and the block stops at the first
// chunk holding a candidate that meets the rule. Every sum has a fixed order,
// so the result is deterministic.
//
// Errors: like the CPU kernel this raises a RuntimeError, with the same
// words, for a valid_len outside [0, c] and for negative or non-finite
// scores. The kernel clamps a bad valid_len, records the first bad sequence
// and the first bad score (smallest flat position: the one the CPU names) in
// a small device buffer with atomicMin, and the host reads that buffer once:
// one synchronization per call, which callers pay anyway when they read the
// counts. A device-side assertion instead would leave a sticky error that
// ends CUDA for the whole process.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>

#include "../checks.h"
#include "block_reduce.cuh"
#include "common.cuh"

namespace refreekv {
namespace cuda {
namespace {

// A block holds one head (adaptive_keep_count's hold whole sequences), and
// b * H blocks already fill the GPU, so a smaller block.
constexpr int kThreads = 256;
constexpr int kItems = 4;  // consecutive candidates per thread in phase 2
constexpr int kChunk = kThreads * kItems;

struct MassKeepCountKernelParams {
  const void* scores;        // [b, H, c], contiguous
  const int64_t* valid_len;  // [b] or nullptr
  int64_t* out;              // [b, H]
  unsigned long long* error;  // [2]: first bad valid_len, first bad score (flat index)
  int64_t heads, candidates;
  double tolerance;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    mass_keep_count_kernel(const MassKeepCountKernelParams p) {
  __shared__ BlockScratch<kThreads> scratch;
  const int64_t row = blockIdx.x;
  const int64_t c = p.candidates;
  int64_t valid = c;
  if (p.valid_len != nullptr) {
    valid = p.valid_len[row / p.heads];
    if (valid < 0 || valid > c) {
      if (threadIdx.x == 0) atomicMin(&p.error[0], static_cast<unsigned long long>(row / p.heads));
      valid = valid < 0 ? 0 : c;  // reported; the kernel still reads in bounds
    }
  }
  if (valid == 0) {  // nothing to rank, nothing to keep
    if (threadIdx.x == 0) p.out[row] = 0;
    return;
  }
  const T* a = static_cast<const T*>(p.scores) + row * c;

  // Phase 1: M, and one past the last non-zero score.
  double mass = 0.0;
  unsigned long long extent = 0;
  unsigned long long first_invalid = kNoError;
  for (int64_t j = threadIdx.x; j < valid; j += kThreads) {
    const float x = to_float(a[j]);
    const bool usable = x >= 0.0f && x <= FLT_MAX;  // NaN fails both
    if (!usable && first_invalid == kNoError) first_invalid = static_cast<unsigned long long>(row * c + j);
    mass += x;
    if (x != 0.0f) extent = j + 1;  // j only grows within a thread (one row per block)
  }
  if (first_invalid != kNoError) atomicMin(&p.error[1], first_invalid);
  const double total = block_sum(mass, scratch);
  const int64_t nonzero_end = static_cast<int64_t>(block_max(extent, scratch));
  if (block_min(first_invalid, scratch) != kNoError) {  // reported on the host
    if (threadIdx.x == 0) p.out[row] = valid;
    return;
  }
  if (nonzero_end == 0) {  // M == 0: nothing to tell apart, keep all
    if (threadIdx.x == 0) p.out[row] = valid;
    return;
  }
  if (p.tolerance == 0.0) {  // exactly lossless, which a sum cannot decide
    if (threadIdx.x == 0) p.out[row] = nonzero_end;
    return;
  }

  // Phase 2: prefixes chunk by chunk until the rule is met.
  const double limit = p.tolerance * total;
  double before_chunk = 0.0;  // the same in every thread
  for (int64_t c0 = 0; c0 < nonzero_end; c0 += kChunk) {
    const int64_t j_first = c0 + static_cast<int64_t>(threadIdx.x) * kItems;
    double prefix[kItems];
    double run = 0.0;
#pragma unroll
    for (int e = 0; e < kItems; ++e) {
      const int64_t j = j_first + e;
      run += j < nonzero_end ? static_cast<double>(to_float(a[j])) : 0.0;
      prefix[e] = run;
    }
    double chunk_total;
    const double before_thread = block_exclusive_scan(run, chunk_total, scratch);
    unsigned long long first = ~0ull;
#pragma unroll
    for (int e = 0; e < kItems; ++e) {
      const int64_t j = j_first + e;
      if (j < nonzero_end && first == ~0ull &&
          total - (before_chunk + (before_thread + prefix[e])) <= limit) {
        first = static_cast<unsigned long long>(j + 1);
      }
    }
    const unsigned long long found = block_min(first, scratch);
    if (found != ~0ull) {
      if (threadIdx.x == 0) p.out[row] = static_cast<int64_t>(found);
      return;
    }
    before_chunk += chunk_total;
  }
  // Unreachable up to rounding: P(extent) == M meets the rule for delta > 0.
  if (threadIdx.x == 0) p.out[row] = nonzero_end;
}

at::Tensor mass_keep_count_cuda(const at::Tensor& ranked_scores, double tolerance,
                                const std::optional<at::Tensor>& valid_len) {
  const KeepCountParams s = check_mass_keep_count_inputs(ranked_scores, tolerance, valid_len);
  const c10::cuda::CUDAGuard guard(ranked_scores.device());
  const at::Tensor scores = ranked_scores.contiguous();
  at::Tensor lens;
  if (valid_len.has_value()) lens = valid_len->contiguous();
  at::Tensor result = at::empty({s.batch, s.heads}, scores.options().dtype(at::kLong));
  const int64_t rows = s.batch * s.heads;
  if (rows == 0) return result;
  ErrorReport<2> errors(scores.options());

  MassKeepCountKernelParams p{};
  p.scores = scores.const_data_ptr();
  p.valid_len = lens.defined() ? lens.const_data_ptr<int64_t>() : nullptr;
  p.out = result.data_ptr<int64_t>();
  p.error = errors.device_slots();
  p.heads = s.heads;
  p.candidates = s.candidates;
  p.tolerance = tolerance;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  REFREEKV_DISPATCH_FLOATS(scores.scalar_type(), "mass_keep_count_cuda", [&] {
    mass_keep_count_kernel<typename DeviceType<scalar_t>::type>
        <<<grid_size(rows), kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const auto first_bad = errors.read();  // the one synchronization (see the top of the file)
  if (first_bad[0] != kNoError) {
    const int64_t b = static_cast<int64_t>(first_bad[0]);
    TORCH_CHECK(false, "mass_keep_count: expected valid_len[", b, "] in [0, ", s.candidates,
                "] (the number of candidates), got ", lens[b].item<int64_t>());
  }
  if (first_bad[1] != kNoError) {
    const int64_t flat = static_cast<int64_t>(first_bad[1]);
    const int64_t j = flat % s.candidates;
    const int64_t h = (flat / s.candidates) % s.heads;
    const int64_t b = flat / (s.candidates * s.heads);
    TORCH_CHECK(false, "mass_keep_count: expected finite, non-negative ranked_scores, got ranked_scores[", b,
                ", ", h, ", ", j, "] = ", scores[b][h][j].item<float>());
  }
  return result;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(refreekv, CUDA, m) {
  m.impl("mass_keep_count", &cuda::mass_keep_count_cuda);
}

}  // namespace refreekv
