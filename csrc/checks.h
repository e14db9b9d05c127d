// Input validation shared by every device implementation of the refreekv
// operators, so that CPU and CUDA reject the same inputs with the same words.
// Each check returns the problem sizes the kernels need (a small params struct
// in the style of flash-attention), so shape logic lives in one place.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <vector>

namespace refreekv {

enum class GroupReduce { kNone, kMean, kMax };

// Sizes of one attention_importance call.
struct ImportanceParams {
  int64_t batch;     // b
  int64_t heads;     // H, query heads
  int64_t kv_heads;  // Hkv, cached heads
  int64_t group;     // g = H / Hkv
  int64_t window;    // w, query rows, the last w of the n positions
  int64_t keys;      // n
  int64_t head_dim;  // d
  GroupReduce reduce;
};

// Checks shapes, dtypes and devices, the scale and softcap (0 disables
// capping, else positive and finite in float32). Every dimension must be at
// least 1 except the batch. The values of sinks are checked by
// float_sinks_on_host, on a host copy for CUDA inputs.
ImportanceParams check_importance_inputs(const at::Tensor& query,
                                         const at::Tensor& key, double scale,
                                         const std::optional<at::Tensor>& kv_valid,
                                         std::string_view group_reduce,
                                         double softcap,
                                         const std::optional<at::Tensor>& sinks);

// Reads the tensor on the host (CUDA callers pass a host copy): the attention
// sinks [H] as a contiguous float32 tensor, each value checked to be finite
// in float32.
at::Tensor float_sinks_on_host(const at::Tensor& sinks);

// Sizes of one adaptive_keep_count or mass_keep_count call.
struct KeepCountParams {
  int64_t batch;       // b
  int64_t heads;       // H
  int64_t candidates;  // c
};

// Checks shapes, dtypes, devices and the threshold (tolerance) range. The
// values of valid_len are range-checked by the kernels, which read them
// anyway (the CUDA kernels report through an error buffer, with the same
// words). adaptive_keep_count needs at least one head (B is a mean over the
// heads); mass_keep_count counts per head, so 0 heads give a [b, 0] result.
KeepCountParams check_keep_count_inputs(const at::Tensor& ranked_scores,
                                        double threshold,
                                        const std::optional<at::Tensor>& valid_len);
KeepCountParams check_mass_keep_count_inputs(const at::Tensor& ranked_scores,
                                             double tolerance,
                                             const std::optional<at::Tensor>& valid_len);

// CPU kernels only (it reads the tensor on the host): each sequence's number
// of valid candidates, c where valid_len is absent, each checked to lie in
// [0, c]. `op` names the operator in the message.
std::vector<int64_t> valid_lengths(const char* op,
                                   const std::optional<at::Tensor>& valid_len,
                                   const KeepCountParams& p);

// Sizes of one compact_kv call.
struct CompactParams {
  int64_t batch;      // b
  int64_t kv_heads;   // Hkv
  int64_t keys;       // n, positions before compaction
  int64_t kept_rows;  // r_max
  int64_t key_dim;    // d of keys
  int64_t value_dim;  // d of values (may differ from the keys')
};

// Checks shapes, dtypes and devices. Index values and keep_len values are
// range-checked by the kernels, which read them anyway.
CompactParams check_compact_inputs(const at::Tensor& key, const at::Tensor& value,
                                   const at::Tensor& keep_index,
                                   const at::Tensor& keep_len);

// Sizes of one paged_attention call.
struct PagedAttentionParams {
  int64_t batch;       // b
  int64_t heads;       // H, query heads
  int64_t kv_heads;    // Hkv
  int64_t group;       // g = H / Hkv
  int64_t queries;     // q, the newest rows of every head
  int64_t head_dim;    // d of queries and keys
  int64_t value_dim;   // dv
  int64_t blocks;      // blocks in the pool
  int64_t block_rows;  // rows per block
  int64_t max_blocks;  // block_table.size(2)
};

// Checks shapes, dtypes and devices, the scale and softcap (as
// check_importance_inputs). Length and block-table values are range-checked
// by the kernels, which read them anyway (CUDA by device-side assertions).
PagedAttentionParams check_paged_attention_inputs(
    const at::Tensor& query, const at::Tensor& key_pool,
    const at::Tensor& value_pool, const at::Tensor& block_table,
    const at::Tensor& lengths, double scale, double softcap,
    const std::optional<at::Tensor>& sinks);

// Sizes of one paged_write call.
struct PagedWriteParams {
  int64_t batch;       // b
  int64_t kv_heads;    // Hkv
  int64_t rows;        // n, rows of the source key and value
  int64_t written;     // r, row_index.size(2), or n without row_index
  int64_t key_dim;     // d
  int64_t value_dim;   // dv
  int64_t blocks;      // blocks in the pool
  int64_t block_rows;  // rows per block
  int64_t max_blocks;  // block_table.size(2)
};

// Checks shapes, dtypes and devices. Start, index, count and block-table
// values are range-checked by the kernels.
PagedWriteParams check_paged_write_inputs(
    const at::Tensor& key_pool, const at::Tensor& value_pool,
    const at::Tensor& block_table, const at::Tensor& start,
    const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& row_index,
    const std::optional<at::Tensor>& row_count);

}  // namespace refreekv
