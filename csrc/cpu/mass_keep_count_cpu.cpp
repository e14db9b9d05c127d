// CPU implementation of refreekv::mass_keep_count.
//
// For each (sequence, head) row with a[0:V] its V valid ranked scores,
// M = sum a[0:V] and P(r) = sum a[0:r], the answer is the smallest r in
// [1, V] whose dropped mass M - P(r) is at most delta M.
//
// Rows are independent and spread over threads. Per row, the scores are
// validated and summed into M (two vectorized passes: the compiler does not
// vectorize the check and the widening sum as one loop); then the prefix is
// walked block by block with the same vectorized sum, and only the block where
// the rule is first met is resolved candidate by candidate. A running sum over
// every candidate would be bound by the latency of one dependent add each.
// Sums are in double: the cut is an integer decision, and float32 running
// sums stop growing on long tails.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../checks.h"

namespace refreekv {
namespace {

constexpr int64_t kBlock = 256;  // candidates per block of the prefix walk
constexpr int64_t kLanes = 16;   // independent partial sums
// Marks a row holding an invalid score; reported after the parallel loop.
constexpr int64_t kInvalidRow = -1;

// NaN fails both comparisons, so one test covers negative, inf and NaN. `&`,
// not `&&`: a branch-free test lets the loop below vectorize.
inline bool is_valid_score(float x) {
  return (x >= 0.0f) & (x <= std::numeric_limits<float>::max());
}

// The functions below are compiled for several instruction sets and picked at
// load time, so the extension stays portable while using the machine's widest
// vectors.

// An int reduction without early exit, which the compiler vectorizes (GCC 12
// left the same loop over a bool `&=` scalar).
__attribute__((target_clones("avx512f", "avx2", "default"))) bool
all_valid_scores(const float* x, int64_t len) {
  int invalid = 0;
  for (int64_t j = 0; j < len; ++j) invalid |= !is_valid_score(x[j]);
  return invalid == 0;
}

// Sum of x[0:len] in double. The lanes fix the summation order, so every
// variant gives the same value.
__attribute__((target_clones("avx512f", "avx2", "default"))) double
sum_as_double(const float* x, int64_t len) {
  double lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[j + l];
  }
  double sum = 0.0;
  for (; j < len; ++j) sum += x[j];
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// The count for one row a[0:valid], or kInvalidRow.
int64_t mass_keep_count_row(const float* a, int64_t valid, double tolerance) {
  if (valid == 0) return 0;  // nothing to rank, nothing to keep
  if (!all_valid_scores(a, valid)) return kInvalidRow;
  const double mass = sum_as_double(a, valid);
  // Found from the end, so it costs only the trailing zeros.
  int64_t extent = valid;  // one past the last non-zero score
  while (extent > 0 && a[extent - 1] == 0.0f) --extent;
  if (extent == 0) return valid;  // M == 0: nothing to tell apart, keep all
  // Exactly lossless, which a sum cannot decide: 1 + 1e-30 rounds to 1.
  if (tolerance == 0.0) return extent;

  const double limit = tolerance * mass;
  double prefix = 0.0;
  for (int64_t begin = 0; begin < extent; begin += kBlock) {
    const int64_t end = std::min(extent, begin + kBlock);
    const double block = sum_as_double(a + begin, end - begin);
    if (mass - (prefix + block) > limit) {
      prefix += block;
      continue;
    }
    for (int64_t j = begin; j < end - 1; ++j) {
      prefix += a[j];
      if (mass - prefix <= limit) return j + 1;
    }
    return end;  // the block's end is known to meet the rule
  }
  // Unreachable up to rounding: P(extent) == M meets the rule for delta > 0.
  return extent;
}

at::Tensor mass_keep_count_cpu(const at::Tensor& ranked_scores, double tolerance,
                               const std::optional<at::Tensor>& valid_len) {
  const KeepCountParams p =
      check_mass_keep_count_inputs(ranked_scores, tolerance, valid_len);
  const std::vector<int64_t> valid = valid_lengths("mass_keep_count", valid_len, p);
  const at::Tensor scores = ranked_scores.to(at::kFloat).contiguous();
  at::Tensor result =
      at::empty({p.batch, p.heads}, scores.options().dtype(at::kLong));

  const int64_t rows = p.batch * p.heads;
  const float* data = scores.const_data_ptr<float>();
  int64_t* out = result.data_ptr<int64_t>();
  const int64_t grain =
      std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, p.candidates));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      out[row] = mass_keep_count_row(data + row * p.candidates,
                                     valid[row / p.heads], tolerance);
    }
  });

  // The first invalid score in row-major order is named, whichever thread
  // met one first.
  for (int64_t row = 0; row < rows; ++row) {
    if (out[row] != kInvalidRow) continue;
    const float* a = data + row * p.candidates;
    const int64_t j =
        std::find_if_not(a, a + valid[row / p.heads], is_valid_score) - a;
    TORCH_CHECK(false,
                "mass_keep_count: expected finite, non-negative "
                "ranked_scores, got ranked_scores[",
                row / p.heads, ", ", row % p.heads, ", ", j, "] = ", a[j]);
  }
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(refreekv, CPU, m) {
  m.impl("mass_keep_count", &mass_keep_count_cpu);
}

}  // namespace refreekv
