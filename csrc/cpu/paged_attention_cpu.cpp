// CPU implementation of refreekv::paged_attention.
//
// A job is a span of one (sequence, KV head)'s rows, a split. The group's g
// query heads and q query rows, R = g q rows, all run against each tile of
// kTileRows keys, so a key row is read once per KV head whatever the group.
// A float32 pool is read in place; a float16 or bfloat16 tile is converted to
// float32 once, block run by block run. An online softmax (running max and
// sum per row, as in flash attention) folds each tile into float32 output
// rows; no logits beyond one tile for kRowChunk rows exist.
//
// Long heads are cut into splits of kSplitRows keys, each with its own
// (max, sum, output), combined at the end. Splitting by length balances
// heads of very different lengths over the threads and keeps a decode step
// (one sequence, few KV heads, one query row) parallel. The cut depends on
// the shapes alone, never on the batch or the thread count, so a sequence
// gets the same result alone and in a batch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../checks.h"

namespace refreekv {
namespace {

constexpr int64_t kTileRows = 64;    // keys per tile
constexpr int64_t kRowChunk = 32;    // query rows whose logits one tile pass forms
constexpr int64_t kSplitRows = 512;  // keys per split, a multiple of kTileRows
constexpr int64_t kLanes = 16;       // independent partial sums of a dot product
constexpr int64_t kValueRows = 4;    // value rows added per pass over an output row
// Float32 partial state a head's splits may hold (1 MiB): with many query
// rows (a long chunk of a prompt) a split's [R, dv] output costs as much as
// its work saves, so such heads are cut less.
constexpr int64_t kPartialFloatsPerHead = int64_t{1} << 18;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One job: keys [key_begin, key_end) of head (seq, kv_head).
struct Split {
  int64_t seq;
  int64_t kv_head;
  int64_t key_begin;
  int64_t key_end;
  int64_t state;  // first row of its state in the split buffers, or -1 when
                  // the split is the head's only one and works in the output
};

// The online softmax state of R rows: unnormalized output rows [R, dv],
// running max and running sum [R].
struct RowState {
  float* out;
  float* max;
  float* sum;
};

// The functions below are compiled for several instruction sets and picked at
// load time, so the extension stays portable while using the machine's widest
// vectors.

// logits[r, t] = query_rows[r] . key_rows[t] for `row_count` query rows and
// the `key_count` rows of a tile (logits is [row_count, kTileRows]). Each key
// row serves every query row while it is in the first-level cache. The
// lanes fix the summation order, so every variant gives the same value.
__attribute__((target_clones("avx512f", "avx2", "default"))) void
tile_logits(const float* __restrict query_rows, int64_t row_count,
            const float* const* key_rows, int64_t key_count, int64_t head_dim,
            float* __restrict logits) {
  for (int64_t t = 0; t < key_count; ++t) {
    const float* __restrict key = key_rows[t];
    for (int64_t r = 0; r < row_count; ++r) {
      const float* __restrict query = query_rows + r * head_dim;
      float lanes[kLanes] = {};
      int64_t k = 0;
      for (; k + kLanes <= head_dim; k += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) lanes[l] += query[k + l] * key[k + l];
      }
      float sum = 0.0f;
      for (; k < head_dim; ++k) sum += query[k] * key[k];
      // In order: a halving tree of the lanes was slower (GCC 12).
      for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
      logits[r * kTileRows + t] = sum;
    }
  }
}

// out_row = correction * out_row + sum_t weights[t] * value_rows[t]. Value
// rows are added kValueRows at a time, so the output row is loaded and
// stored once per group rather than once per row.
__attribute__((target_clones("avx512f", "avx2", "default"))) void
accumulate_values(const float* weights, int64_t visible,
                  const float* const* value_rows, int64_t value_dim,
                  float correction, float* __restrict out_row) {
  if (correction != 1.0f) {
    for (int64_t c = 0; c < value_dim; ++c) out_row[c] *= correction;
  }
  int64_t t = 0;
  for (; t + kValueRows <= visible; t += kValueRows) {
    const float w0 = weights[t], w1 = weights[t + 1], w2 = weights[t + 2],
                w3 = weights[t + 3];
    const float* __restrict v0 = value_rows[t];
    const float* __restrict v1 = value_rows[t + 1];
    const float* __restrict v2 = value_rows[t + 2];
    const float* __restrict v3 = value_rows[t + 3];
    for (int64_t c = 0; c < value_dim; ++c) {
      out_row[c] += w0 * v0[c] + w1 * v1[c] + w2 * v2[c] + w3 * v3[c];
    }
  }
  for (; t < visible; ++t) {
    const float w = weights[t];
    const float* __restrict value = value_rows[t];
    for (int64_t c = 0; c < value_dim; ++c) out_row[c] += w * value[c];
  }
}

// Exact, and written so that it vectorizes (c10::Half's own conversion did
// not, at a third of the bfloat16 speed): the exponent and mantissa bits
// moved into float32 position, then rescaled by 2^(127 - 15) in one multiply
// that also normalizes subnormals; infinity and NaN get the top exponent back.
__attribute__((target_clones("avx512f", "avx2", "default"))) void
to_float(const at::Half* x, int64_t len, float* y) {
  constexpr float kRebias = 0x1p112f;
  constexpr float kInfOrNan = 0x1p16f;  // 65536 = the smallest value past float16's range
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t bits = x[i].x;
    uint32_t magnitude =
        std::bit_cast<uint32_t>(std::bit_cast<float>((bits & 0x7fffu) << 13) * kRebias);
    if (std::bit_cast<float>(magnitude) >= kInfOrNan) magnitude |= 0x7f800000u;
    y[i] = std::bit_cast<float>(magnitude | (bits & 0x8000u) << 16);
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void
to_float(const at::BFloat16* x, int64_t len, float* y) {
  for (int64_t i = 0; i < len; ++i) y[i] = static_cast<float>(x[i]);
}

// exp(x) for x <= 0, within 0.7 ulp of the exact value (Cephes' expf: a
// Cody-Waite reduction by ln 2, then a degree-7 polynomial), and written so
// that it vectorizes: std::exp is a library call, and a float clamp does not
// if-convert under GCC's default -ftrapping-math, so x is clamped to -87 on
// its bits (for x <= 0 a larger magnitude has larger bits). Below -87 it
// gives exp(-87) ~ 1.6e-38 for 0: a weight next to the row's largest, 1.
inline float exp_nonpositive(float x) {
  x = std::bit_cast<float>(std::min(std::bit_cast<uint32_t>(x), std::bit_cast<uint32_t>(-87.0f)));
  constexpr float kRoundToInteger = 0x1.8p23f;  // adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + kRoundToInteger) - kRoundToInteger;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float two_to_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return (p * r * r + r + 1.0f) * two_to_n;
}

// Turns the raw dot products of one row's first `visible` keys into weights
// exp(logit - new_max), new_max being the larger of row_max and the tile's
// largest logit. Returns new_max and the sum of the weights.
__attribute__((target_clones("avx512f", "avx2", "default"))) std::pair<float, float>
tile_weights(float* __restrict logits, int64_t visible, float scale, float softcap,
             float row_max) {
  for (int64_t t = 0; t < visible; ++t) logits[t] *= scale;
  if (softcap > 0.0f) {
    // Gemma 2's order: scaled, then capped.
    for (int64_t t = 0; t < visible; ++t) logits[t] = softcap * std::tanh(logits[t] / softcap);
  }
  float max_lanes[kLanes];
  std::fill(max_lanes, max_lanes + kLanes, row_max);
  int64_t t = 0;
  for (; t + kLanes <= visible; t += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) max_lanes[l] = std::max(max_lanes[l], logits[t + l]);
  }
  float new_max = row_max;
  for (; t < visible; ++t) new_max = std::max(new_max, logits[t]);
  for (int64_t l = 0; l < kLanes; ++l) new_max = std::max(new_max, max_lanes[l]);

  for (t = 0; t < visible; ++t) logits[t] = exp_nonpositive(logits[t] - new_max);
  float sum_lanes[kLanes] = {};
  for (t = 0; t + kLanes <= visible; t += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) sum_lanes[l] += logits[t + l];
  }
  float sum = 0.0f;
  for (; t < visible; ++t) sum += logits[t];
  for (int64_t l = 0; l < kLanes; ++l) sum += sum_lanes[l];
  return {new_max, sum};
}

// Folds the first `visible` keys of a tile into one row's state. `logits`
// holds the raw dot products and is overwritten with the weights.
void online_softmax_step(float* logits, int64_t visible, float scale, float softcap,
                         const float* const* value_rows, int64_t value_dim,
                         float* out_row, float& row_max, float& row_sum) {
  const auto [new_max, tile_sum] = tile_weights(logits, visible, scale, softcap, row_max);
  // exp(-inf) = 0 drops the empty state of a row's first tile.
  const float correction = std::exp(row_max - new_max);
  row_sum = row_sum * correction + tile_sum;
  row_max = new_max;
  accumulate_values(logits, visible, value_rows, value_dim, correction, out_row);
}

struct Problem {
  PagedAttentionParams p;
  const float* query;        // [b, H, q, d] float32
  const int64_t* table;      // [b, Hkv, max_blocks]
  const int64_t* lengths;    // [b, Hkv]
  float scale;
  float softcap;
};

// The float32 rows of one tile of keys and values.
struct Tile {
  const float* keys[kTileRows];
  const float* values[kTileRows];
};

// Points `tile` at keys [tile_begin, tile_begin + rows) of a head and their
// values: in the pools themselves when they are float32, else in this
// thread's buffers [kTileRows, head_dim] and [kTileRows, value_dim], which
// receive the rows converted.
template <typename scalar_t>
void load_tile(const Problem& pr, const Split& split, const scalar_t* key_pool,
               const scalar_t* value_pool, int64_t tile_begin, int64_t rows,
               float* key_buffer, float* value_buffer, Tile& tile) {
  const PagedAttentionParams& p = pr.p;
  const int64_t* table_row = pr.table + (split.seq * p.kv_heads + split.kv_head) * p.max_blocks;
  int64_t t = 0;
  while (t < rows) {
    // The run of the tile's rows that lies in one block, contiguous in the pool.
    const int64_t row = tile_begin + t;
    const int64_t slot = row / p.block_rows;
    const int64_t first = row % p.block_rows;
    const int64_t run = std::min(rows - t, p.block_rows - first);
    const int64_t block = table_row[slot];
    TORCH_CHECK(block >= 0 && block < p.blocks, "paged_attention: expected block_table[",
                split.seq, ", ", split.kv_head, ", ", slot, "] in [0, ", p.blocks,
                ") (the blocks in the pool), got ", block);
    const scalar_t* keys = key_pool + (block * p.block_rows + first) * p.head_dim;
    const scalar_t* values = value_pool + (block * p.block_rows + first) * p.value_dim;
    const float* key_rows = nullptr;
    const float* value_rows = nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      key_rows = keys;
      value_rows = values;
    } else {
      to_float(keys, run * p.head_dim, key_buffer + t * p.head_dim);
      to_float(values, run * p.value_dim, value_buffer + t * p.value_dim);
      key_rows = key_buffer + t * p.head_dim;
      value_rows = value_buffer + t * p.value_dim;
    }
    for (int64_t r = 0; r < run; ++r, ++t) {
      tile.keys[t] = key_rows + r * p.head_dim;
      tile.values[t] = value_rows + r * p.value_dim;
    }
  }
}

// Runs the R = g q rows of a head's group over keys [key_begin, key_end).
// Rows are ordered (query head, query row), as in the output.
template <typename scalar_t>
void attend_split(const Problem& pr, const Split& split, const scalar_t* key_pool,
                  const scalar_t* value_pool, const RowState& state, float* key_buffer,
                  float* value_buffer) {
  const PagedAttentionParams& p = pr.p;
  const int64_t q = p.queries;
  const int64_t length = pr.lengths[split.seq * p.kv_heads + split.kv_head];
  // Row i sees keys j <= length - q + i.
  const int64_t first_seen_offset = length - q;
  const float* group_query =
      pr.query + (split.seq * p.heads + split.kv_head * p.group) * q * p.head_dim;
  Tile tile;
  float logits[kRowChunk * kTileRows];
  for (int64_t tile_begin = split.key_begin; tile_begin < split.key_end;
       tile_begin += kTileRows) {
    const int64_t rows = std::min(kTileRows, split.key_end - tile_begin);
    load_tile(pr, split, key_pool, value_pool, tile_begin, rows, key_buffer,
              value_buffer, tile);
    // Folds the tile into rows [row_begin, row_end), which all see part of it.
    auto fold_rows = [&](int64_t row_begin, int64_t row_end) {
      for (int64_t chunk = row_begin; chunk < row_end; chunk += kRowChunk) {
        const int64_t chunk_rows = std::min(kRowChunk, row_end - chunk);
        tile_logits(group_query + chunk * p.head_dim, chunk_rows, tile.keys, rows,
                    p.head_dim, logits);
        for (int64_t r = chunk; r < chunk + chunk_rows; ++r) {
          const int64_t visible = std::min(rows, first_seen_offset + r % q - tile_begin + 1);
          online_softmax_step(logits + (r - chunk) * kTileRows, visible, pr.scale,
                              pr.softcap, tile.values, p.value_dim,
                              state.out + r * p.value_dim, state.max[r], state.sum[r]);
        }
      }
    };
    // Query rows before first_row see none of the tile's keys. Away from the
    // newest keys that is none, and the rows of all heads go together.
    const int64_t first_row = std::max<int64_t>(0, tile_begin - first_seen_offset);
    if (first_row == 0) {
      fold_rows(0, p.group * q);
    } else {
      for (int64_t head = 0; head < p.group; ++head) {
        fold_rows(head * q + first_row, (head + 1) * q);
      }
    }
  }
}

// Writes the normalized output rows of one head from the states of its
// splits (out may be the output rows of the only split). Its sink, exp(s),
// joins each row's denominator; a row that saw no key is 0.
void finish_head(const PagedAttentionParams& p, const std::vector<RowState>& splits,
                 const float* group_sinks, float* out) {
  const int64_t q = p.queries;
  std::vector<float> weights(splits.size());
  for (int64_t r = 0; r < p.group * q; ++r) {
    float row_max = group_sinks ? group_sinks[r / q] : kNegInf;
    for (const RowState& s : splits) row_max = std::max(row_max, s.max[r]);
    float* out_row = out + r * p.value_dim;
    // No key seen and no sink, or a sink of +inf that takes all the weight
    // and carries no value.
    if (std::isinf(row_max)) {
      std::fill(out_row, out_row + p.value_dim, 0.0f);
      continue;
    }
    float denominator = group_sinks ? std::exp(group_sinks[r / q] - row_max) : 0.0f;
    for (size_t k = 0; k < splits.size(); ++k) {
      weights[k] = std::exp(splits[k].max[r] - row_max);
      denominator += splits[k].sum[r] * weights[k];
    }
    const float inverse = 1.0f / denominator;
    for (int64_t c = 0; c < p.value_dim; ++c) {
      float value = 0.0f;
      for (size_t k = 0; k < splits.size(); ++k) {
        value += splits[k].out[r * p.value_dim + c] * weights[k];
      }
      out_row[c] = value * inverse;
    }
  }
}

at::Tensor paged_attention_cpu(const at::Tensor& query, const at::Tensor& key_pool,
                               const at::Tensor& value_pool,
                               const at::Tensor& block_table, const at::Tensor& lengths,
                               double scale, double softcap,
                               const std::optional<at::Tensor>& sinks) {
  const PagedAttentionParams p = check_paged_attention_inputs(
      query, key_pool, value_pool, block_table, lengths, scale, softcap, sinks);
  const at::Tensor query_f32 = query.to(at::kFloat).contiguous();
  const at::Tensor keys = key_pool.contiguous();
  const at::Tensor values = value_pool.contiguous();
  const at::Tensor table = block_table.contiguous();
  const at::Tensor head_lengths = lengths.contiguous();
  // Sink values are not checked (the checks read no values, so that CUDA
  // need not synchronize): -inf is no sink, +inf takes all of a row's weight.
  const at::Tensor sinks_f32 = sinks.has_value() ? sinks->to(at::kFloat).contiguous() : at::Tensor();
  const Problem pr{p,
                   query_f32.const_data_ptr<float>(),
                   table.const_data_ptr<int64_t>(),
                   head_lengths.const_data_ptr<int64_t>(),
                   static_cast<float>(scale),
                   static_cast<float>(softcap)};

  // The rows of head (s, h) are rows [(s Hkv + h) R, (s Hkv + h + 1) R) of
  // the output, read as [b Hkv R, dv]: query heads of a group are adjacent.
  const int64_t rows_per_head = p.group * p.queries;
  at::Tensor out = at::zeros({p.batch, p.heads, p.queries, p.value_dim},
                             query.options().dtype(at::kFloat));
  float* out_data = out.data_ptr<float>();

  // The jobs, and the state rows of heads cut into several splits.
  const int64_t capacity = p.max_blocks * p.block_rows;
  const int64_t max_splits = std::max<int64_t>(
      1, kPartialFloatsPerHead / (rows_per_head * (p.value_dim + 2)));
  std::vector<Split> jobs;
  std::vector<std::pair<int64_t, int64_t>> split_heads;  // (head index, first job)
  int64_t state_rows = 0;
  for (int64_t s = 0; s < p.batch; ++s) {
    for (int64_t h = 0; h < p.kv_heads; ++h) {
      const int64_t length = pr.lengths[s * p.kv_heads + h];
      TORCH_CHECK(length >= 0 && length <= capacity, "paged_attention: expected lengths[",
                  s, ", ", h, "] in [0, ", capacity,
                  "] (max_blocks * block_rows), got ", length);
      const int64_t splits =
          std::min((length + kSplitRows - 1) / kSplitRows, max_splits);
      if (splits == 0) continue;  // no keys: zero rows, whatever the sinks
      // Equal splits of whole tiles.
      const int64_t tiles = (length + kTileRows - 1) / kTileRows;
      const int64_t split_keys = (tiles + splits - 1) / splits * kTileRows;
      if (splits > 1) split_heads.emplace_back(s * p.kv_heads + h, jobs.size());
      for (int64_t begin = 0; begin < length; begin += split_keys) {
        jobs.push_back({s, h, begin, std::min(length, begin + split_keys),
                        splits > 1 ? state_rows : -1});
        if (splits > 1) state_rows += rows_per_head;
      }
    }
  }
  // The running max and sum of the heads that have one split, whose output
  // rows serve as their accumulators.
  const int64_t heads_total = p.batch * p.kv_heads;
  std::vector<float> head_max(heads_total * rows_per_head, kNegInf);
  std::vector<float> head_sum(heads_total * rows_per_head, 0.0f);
  std::vector<float> split_out(state_rows * p.value_dim, 0.0f);
  std::vector<float> split_max(state_rows, kNegInf);
  std::vector<float> split_sum(state_rows, 0.0f);

  auto state_of = [&](const Split& split) -> RowState {
    if (split.state >= 0) {
      return {split_out.data() + split.state * p.value_dim,
              split_max.data() + split.state, split_sum.data() + split.state};
    }
    const int64_t head_row = (split.seq * p.kv_heads + split.kv_head) * rows_per_head;
    return {out_data + head_row * p.value_dim, head_max.data() + head_row,
            head_sum.data() + head_row};
  };
  auto group_sinks = [&](const Split& split) -> const float* {
    return sinks_f32.defined()
               ? sinks_f32.const_data_ptr<float>() + split.kv_head * p.group
               : nullptr;
  };

  auto attend_jobs = [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    const scalar_t* key_data = keys.const_data_ptr<scalar_t>();
    const scalar_t* value_data = values.const_data_ptr<scalar_t>();
    at::parallel_for(0, jobs.size(), 1, [&](int64_t begin, int64_t end) {
      // This thread's float32 copies of half-precision tiles.
      constexpr bool converts = !std::is_same_v<scalar_t, float>;
      std::vector<float> key_buffer(converts ? kTileRows * p.head_dim : 0);
      std::vector<float> value_buffer(converts ? kTileRows * p.value_dim : 0);
      for (int64_t j = begin; j < end; ++j) {
        const Split& split = jobs[j];
        const RowState state = state_of(split);
        attend_split(pr, split, key_data, value_data, state, key_buffer.data(),
                     value_buffer.data());
        if (split.state < 0) {
          finish_head(p, {state}, group_sinks(split), state.out);
        }
      }
    });
  };
  // The dtypes checks.h admits (no double).
  AT_DISPATCH_SWITCH(query.scalar_type(), "paged_attention_cpu",
                     AT_DISPATCH_CASE(at::kFloat, [&] { attend_jobs(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { attend_jobs(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { attend_jobs(scalar_t{}); }));

  at::parallel_for(0, split_heads.size(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const auto [head_index, first_job] = split_heads[k];
      std::vector<RowState> states;
      for (size_t j = first_job; j < jobs.size() &&
                                 jobs[j].seq * p.kv_heads + jobs[j].kv_head == head_index;
           ++j) {
        states.push_back(state_of(jobs[j]));
      }
      finish_head(p, states, group_sinks(jobs[first_job]),
                  out_data + head_index * rows_per_head * p.value_dim);
    }
  });
  return out.to(query.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(refreekv, CPU, m) {
  m.impl("paged_attention", &paged_attention_cpu);
}

}  // namespace refreekv
