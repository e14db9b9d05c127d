// CPU implementation of refreekv::adaptive_keep_count (SPEC 2.3).
//
// For each sequence, with a_h the ranked scores of head h over its V valid
// candidates:
//   B    = mean_h ||a_h[0:V]||_2
//   K(r) = mean_h ||a_h[0:r]||_2
// and the answer is the smallest r >= 1 with (B - K(r)) / B <= T.
//
// K is non-decreasing in r, so the search needs K only where it looks. The
// candidates are cut into fixed blocks; one streaming pass sums the squares
// of every block (the only O(H c) work, and it vectorizes), K is evaluated at
// block ends to find the block where the rule is first met, and only that
// block is resolved candidate by candidate. That is O(H c / L + H L) square
// roots instead of O(H c).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"

namespace refreekv {
namespace {

constexpr int64_t kBlock = 64;  // candidates per block
constexpr int64_t kLanes = 16;  // independent partial sums, one SIMD register

// block_sums[k] = sum of x^2 over candidates [k L, min((k + 1) L, valid)).
// Compiled for several instruction sets and picked at load time, so the
// extension stays portable while using the machine's widest vectors.
__attribute__((target_clones("avx512f", "avx2", "default"))) void
sum_squares_per_block(const float* row, int64_t valid, double* block_sums) {
  const int64_t blocks = (valid + kBlock - 1) / kBlock;
  for (int64_t k = 0; k < blocks; ++k) {
    const float* x = row + k * kBlock;
    const int64_t len = std::min(kBlock, valid - k * kBlock);
    float lanes[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= len; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[j + l] * x[j + l];
    }
    double sum = 0.0;
    for (; j < len; ++j) sum += static_cast<double>(x[j]) * x[j];
    for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
    block_sums[k] = sum;
  }
}

// Number of leading candidates, over all heads, up to the last non-zero score.
int64_t nonzero_extent(const float* scores, int64_t heads, int64_t candidates,
                       int64_t valid) {
  int64_t extent = 0;
  for (int64_t h = 0; h < heads; ++h) {
    const float* row = scores + h * candidates;
    for (int64_t j = valid; j > extent; --j) {
      if (row[j - 1] != 0.0f) {
        extent = j;
        break;
      }
    }
  }
  return extent;
}

// The cut for one sequence. scores: [heads, candidates] float32;
// block_sums: [heads, blocks] from sum_squares_per_block.
int64_t keep_count_one(const float* scores, const double* block_sums,
                       int64_t heads, int64_t candidates, int64_t blocks,
                       int64_t valid, double threshold) {
  if (valid == 0) return 0;  // nothing to rank, nothing to keep
  const int64_t used_blocks = (valid + kBlock - 1) / kBlock;

  // norm_at_block_end[k] = sum_h ||a_h[0 : end of block k]||_2 = H K(end).
  // Running sums of squares are kept in double: the cut is an integer
  // decision, and float32 running sums stop growing on long tails.
  std::vector<double> norm_at_block_end(used_blocks, 0.0);
  std::vector<double> running(heads, 0.0);
  for (int64_t k = 0; k < used_blocks; ++k) {
    double norm = 0.0;
    for (int64_t h = 0; h < heads; ++h) {
      running[h] += block_sums[h * blocks + k];
      norm += std::sqrt(running[h]);
    }
    norm_at_block_end[k] = norm;
  }
  const double total = norm_at_block_end[used_blocks - 1];  // H B
  TORCH_CHECK(std::isfinite(total),
              "adaptive_keep_count: expected finite ranked_scores, got NaN or "
              "inf");
  if (total == 0.0) return valid;  // degenerate signal: keep everything
  if (threshold == 0.0) {
    // Exactly lossless: stop only where every remaining score is zero.
    return nonzero_extent(scores, heads, candidates, valid);
  }
  const auto meets_rule = [&](double norm) {
    return (total - norm) / total <= threshold;
  };

  // The first block whose end meets the rule holds the cut.
  const int64_t block =
      std::partition_point(norm_at_block_end.begin(), norm_at_block_end.end(),
                           [&](double norm) { return !meets_rule(norm); }) -
      norm_at_block_end.begin();
  const int64_t begin = block * kBlock;
  const int64_t end = std::min(valid, begin + kBlock);
  for (int64_t h = 0; h < heads; ++h) {
    double before = 0.0;
    for (int64_t k = 0; k < block; ++k) before += block_sums[h * blocks + k];
    running[h] = before;
  }
  for (int64_t j = begin; j < end - 1; ++j) {
    double norm = 0.0;
    for (int64_t h = 0; h < heads; ++h) {
      const double x = scores[h * candidates + j];
      running[h] += x * x;
      norm += std::sqrt(running[h]);
    }
    if (meets_rule(norm)) return j + 1;
  }
  return end;  // the block's end is known to meet the rule
}

at::Tensor adaptive_keep_count_cpu(const at::Tensor& ranked_scores,
                                   double threshold,
                                   const std::optional<at::Tensor>& valid_len) {
  const KeepCountParams p =
      check_keep_count_inputs(ranked_scores, threshold, valid_len);
  const at::Tensor scores = ranked_scores.to(at::kFloat).contiguous();
  at::Tensor result = at::empty({p.batch}, scores.options().dtype(at::kLong));

  const std::vector<int64_t> valid =
      valid_lengths("adaptive_keep_count", valid_len, p);

  const int64_t blocks = (p.candidates + kBlock - 1) / kBlock;
  std::vector<double> block_sums(p.batch * p.heads * blocks);
  const float* data = scores.const_data_ptr<float>();
  at::parallel_for(0, p.batch * p.heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      sum_squares_per_block(data + row * p.candidates, valid[row / p.heads],
                            block_sums.data() + row * blocks);
    }
  });
  int64_t* out = result.data_ptr<int64_t>();
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      out[b] = keep_count_one(data + b * p.heads * p.candidates,
                              block_sums.data() + b * p.heads * blocks, p.heads,
                              p.candidates, blocks, valid[b], threshold);
    }
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(refreekv, CPU, m) {
  m.impl("adaptive_keep_count", &adaptive_keep_count_cpu);
}

}  // namespace refreekv
