#include "checks.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace refreekv {
namespace {

bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_float_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": expected ", name,
              " to be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_rank(const char* op, const char* name, const at::Tensor& t,
                int64_t rank, const char* layout) {
  TORCH_CHECK(t.dim() == rank, op, ": expected ", name, " of shape ", layout,
              " (", rank, "-D), got a ", t.dim(), "-D tensor of shape ",
              t.sizes());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name,
              " on the same device as ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

void check_dim(const char* op, const char* name, const at::Tensor& t,
               int64_t dim, int64_t expected, const char* meaning) {
  TORCH_CHECK(t.size(dim) == expected, op, ": expected ", name, ".size(", dim,
              ") == ", expected, " (", meaning, "), got ", t.size(dim),
              " (shape ", t.sizes(), ")");
}

// The scale must be finite. The kernels cap in float32, so a positive
// softcap must stay positive and finite there (one that rounds to 0 or inf
// would turn logits into NaN).
void check_scale_and_softcap(const char* op, double scale, double softcap) {
  TORCH_CHECK(std::isfinite(scale), op, ": expected a finite scale, got ", scale);
  const float softcap_f32 = static_cast<float>(softcap);
  TORCH_CHECK(softcap == 0.0 || (softcap_f32 > 0.0f && std::isfinite(softcap_f32)),
              op,
              ": expected softcap to be 0 (no capping) or positive and finite "
              "in float32, got ",
              softcap);
}

// The query heads of a grouped-query attention call: at least one, and a
// multiple of the key heads. Returns the group size H / Hkv.
int64_t check_query_groups(const char* op, const at::Tensor& query, int64_t heads,
                           int64_t kv_heads) {
  // 0 would pass the multiple check below and leave a group of 0 heads.
  TORCH_CHECK(heads >= 1, op, ": expected at least one query head, got query of shape ",
              query.sizes());
  TORCH_CHECK(kv_heads >= 1 && heads % kv_heads == 0, op,
              ": expected the query heads to be a multiple of the key heads "
              "(grouped-query attention), got ",
              heads, " query heads and ", kv_heads, " key heads");
  return heads / kv_heads;
}

// Optional sink logits: [heads] of a floating dtype on the query's device.
void check_sinks(const char* op, const std::optional<at::Tensor>& sinks,
                 const at::Tensor& query, int64_t heads) {
  if (!sinks.has_value()) return;
  const at::Tensor& sink_logits = *sinks;
  check_rank(op, "sinks", sink_logits, 1, "[heads]");
  TORCH_CHECK(c10::isFloatingType(sink_logits.scalar_type()), op,
              ": expected sinks of a floating dtype, got ", sink_logits.scalar_type());
  check_same_device(op, "sinks", sink_logits, "query", query);
  check_dim(op, "sinks", sink_logits, 0, heads, "query heads");
}

void check_int64(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": expected ", name,
              " of dtype int64, got ", t.scalar_type());
}

// A per-head int64 tensor of paged_attention or paged_write (lengths, start,
// row_count): [batch, kv_heads] on the pools' device.
void check_per_head(const char* op, const char* name, const at::Tensor& t,
                    const at::Tensor& key_pool, int64_t batch, int64_t kv_heads) {
  check_rank(op, name, t, 2, "[batch, kv_heads]");
  check_int64(op, name, t);
  check_same_device(op, name, t, "key_pool", key_pool);
  check_dim(op, name, t, 0, batch, "batch size of block_table");
  check_dim(op, name, t, 1, kv_heads, "kv_heads of block_table");
}

// Sizes of a paged cache, common to paged_attention and paged_write.
struct PagedCacheSizes {
  int64_t batch;
  int64_t kv_heads;
  int64_t key_dim;
  int64_t value_dim;
  int64_t blocks;
  int64_t block_rows;
  int64_t max_blocks;
};

// What paged_attention and paged_write share: key and value pools
// [blocks, block_rows, d] and [blocks, block_rows, dv] of one float dtype on
// one device, and an int64 block table [b, Hkv, max_blocks] on that device.
PagedCacheSizes check_paged_cache(const char* op, const at::Tensor& key_pool,
                                  const at::Tensor& value_pool,
                                  const at::Tensor& block_table) {
  check_rank(op, "key_pool", key_pool, 3, "[blocks, block_rows, head_dim]");
  check_rank(op, "value_pool", value_pool, 3, "[blocks, block_rows, value_dim]");
  check_rank(op, "block_table", block_table, 3, "[batch, kv_heads, max_blocks]");
  check_float_input(op, "key_pool", key_pool);
  TORCH_CHECK(value_pool.scalar_type() == key_pool.scalar_type(), op,
              ": expected key_pool and value_pool of the same dtype, got key_pool ",
              key_pool.scalar_type(), " and value_pool ", value_pool.scalar_type());
  check_int64(op, "block_table", block_table);
  check_same_device(op, "value_pool", value_pool, "key_pool", key_pool);
  check_same_device(op, "block_table", block_table, "key_pool", key_pool);

  PagedCacheSizes sizes{};
  sizes.batch = block_table.size(0);
  sizes.kv_heads = block_table.size(1);
  sizes.max_blocks = block_table.size(2);
  sizes.blocks = key_pool.size(0);
  sizes.block_rows = key_pool.size(1);
  sizes.key_dim = key_pool.size(2);
  sizes.value_dim = value_pool.size(2);
  check_dim(op, "value_pool", value_pool, 0, sizes.blocks, "blocks of key_pool");
  check_dim(op, "value_pool", value_pool, 1, sizes.block_rows, "block_rows of key_pool");
  TORCH_CHECK(sizes.block_rows >= 1, op,
              ": expected at least one row per block (block_rows >= 1), got key_pool of shape ",
              key_pool.sizes());
  return sizes;
}

GroupReduce parse_group_reduce(std::string_view s) {
  if (s == "none") return GroupReduce::kNone;
  if (s == "mean") return GroupReduce::kMean;
  if (s == "max") return GroupReduce::kMax;
  TORCH_CHECK(false,
              "attention_importance: expected group_reduce to be 'none', "
              "'mean' or 'max', got '",
              std::string(s), "'");
}

// What adaptive_keep_count and mass_keep_count share: ranked scores
// [b, H, c], a fraction in [0, 1) named `fraction_name`, optional lengths [b].
KeepCountParams check_ranked_inputs(const char* op, const at::Tensor& ranked_scores,
                                    const char* fraction_name, double fraction,
                                    const std::optional<at::Tensor>& valid_len) {
  check_rank(op, "ranked_scores", ranked_scores, 3, "[batch, heads, candidates]");
  check_float_input(op, "ranked_scores", ranked_scores);
  TORCH_CHECK(fraction >= 0.0 && fraction < 1.0, op, ": expected ",
              fraction_name, " in [0, 1), got ", fraction);
  const KeepCountParams p{ranked_scores.size(0), ranked_scores.size(1),
                          ranked_scores.size(2)};
  if (valid_len.has_value()) {
    const at::Tensor& len = *valid_len;
    check_rank(op, "valid_len", len, 1, "[batch]");
    check_int64(op, "valid_len", len);
    check_same_device(op, "valid_len", len, "ranked_scores", ranked_scores);
    check_dim(op, "valid_len", len, 0, p.batch, "batch size of ranked_scores");
  }
  return p;
}

}  // namespace

ImportanceParams check_importance_inputs(const at::Tensor& query,
                                         const at::Tensor& key, double scale,
                                         const std::optional<at::Tensor>& kv_valid,
                                         std::string_view group_reduce,
                                         double softcap,
                                         const std::optional<at::Tensor>& sinks) {
  constexpr const char* op = "attention_importance";
  check_rank(op, "query", query, 4, "[batch, heads, window, head_dim]");
  check_rank(op, "key", key, 4, "[batch, kv_heads, keys, head_dim]");
  check_float_input(op, "query", query);
  check_float_input(op, "key", key);
  TORCH_CHECK(query.scalar_type() == key.scalar_type(), op,
              ": expected query and key of the same dtype, got query ",
              query.scalar_type(), " and key ", key.scalar_type());
  check_same_device(op, "key", key, "query", query);
  check_scale_and_softcap(op, scale, softcap);

  ImportanceParams p{};
  p.batch = query.size(0);
  p.heads = query.size(1);
  p.window = query.size(2);
  p.head_dim = query.size(3);
  p.kv_heads = key.size(1);
  p.keys = key.size(2);
  check_dim(op, "key", key, 0, p.batch, "batch size of query");
  check_dim(op, "key", key, 3, p.head_dim, "head_dim of query");
  TORCH_CHECK(p.head_dim >= 1, op, ": expected head_dim >= 1, got ", p.head_dim);
  p.group = check_query_groups(op, query, p.heads, p.kv_heads);
  TORCH_CHECK(p.keys >= 1, op, ": expected at least one key (n >= 1), got n = ",
              p.keys);
  TORCH_CHECK(p.window >= 1, op,
              ": expected at least one query row (window >= 1), got window = ",
              p.window);
  TORCH_CHECK(p.window <= p.keys, op,
              ": expected window <= keys, since the query rows are the last "
              "window positions of the keys; got window = ",
              p.window, " and keys = ", p.keys);
  if (kv_valid.has_value()) {
    const at::Tensor& valid = *kv_valid;
    check_rank(op, "kv_valid", valid, 2, "[batch, keys]");
    TORCH_CHECK(valid.scalar_type() == at::kBool, op,
                ": expected kv_valid of dtype bool, got ", valid.scalar_type());
    check_same_device(op, "kv_valid", valid, "query", query);
    check_dim(op, "kv_valid", valid, 0, p.batch, "batch size of query");
    check_dim(op, "kv_valid", valid, 1, p.keys, "number of keys");
  }
  check_sinks(op, sinks, query, p.heads);
  p.reduce = parse_group_reduce(group_reduce);
  return p;
}

at::Tensor float_sinks_on_host(const at::Tensor& sinks) {
  at::Tensor sinks_f32 = sinks.to(at::kFloat).contiguous();
  const float* values = sinks_f32.const_data_ptr<float>();
  for (int64_t h = 0; h < sinks_f32.numel(); ++h) {
    // Checked after the conversion: a float64 sink beyond float32's range
    // would reach the kernel as inf.
    TORCH_CHECK(std::isfinite(values[h]),
                "attention_importance: expected finite sinks (in float32), got "
                "sinks[",
                h, "] = ", values[h]);
  }
  return sinks_f32;
}

KeepCountParams check_keep_count_inputs(const at::Tensor& ranked_scores,
                                        double threshold,
                                        const std::optional<at::Tensor>& valid_len) {
  constexpr const char* op = "adaptive_keep_count";
  const KeepCountParams p =
      check_ranked_inputs(op, ranked_scores, "threshold", threshold, valid_len);
  // B is a mean over heads.
  TORCH_CHECK(p.heads >= 1, op, ": expected at least one head, got shape ",
              ranked_scores.sizes());
  return p;
}

KeepCountParams check_mass_keep_count_inputs(const at::Tensor& ranked_scores,
                                             double tolerance,
                                             const std::optional<at::Tensor>& valid_len) {
  return check_ranked_inputs("mass_keep_count", ranked_scores, "tolerance",
                             tolerance, valid_len);
}

std::vector<int64_t> valid_lengths(const char* op,
                                   const std::optional<at::Tensor>& valid_len,
                                   const KeepCountParams& p) {
  std::vector<int64_t> valid(p.batch, p.candidates);
  if (!valid_len.has_value()) return valid;
  const at::Tensor lens = valid_len->contiguous();
  const int64_t* len_data = lens.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < p.batch; ++b) {
    TORCH_CHECK(len_data[b] >= 0 && len_data[b] <= p.candidates, op,
                ": expected valid_len[", b, "] in [0, ", p.candidates,
                "] (the number of candidates), got ", len_data[b]);
    valid[b] = len_data[b];
  }
  return valid;
}

CompactParams check_compact_inputs(const at::Tensor& key, const at::Tensor& value,
                                   const at::Tensor& keep_index,
                                   const at::Tensor& keep_len) {
  constexpr const char* op = "compact_kv";
  check_rank(op, "key", key, 4, "[batch, kv_heads, keys, head_dim]");
  check_rank(op, "value", value, 4, "[batch, kv_heads, keys, head_dim]");
  check_rank(op, "keep_index", keep_index, 3, "[batch, kv_heads, kept_rows]");
  check_rank(op, "keep_len", keep_len, 1, "[batch]");
  check_float_input(op, "key", key);
  TORCH_CHECK(value.scalar_type() == key.scalar_type(), op,
              ": expected key and value of the same dtype, got key ",
              key.scalar_type(), " and value ", value.scalar_type());
  check_int64(op, "keep_index", keep_index);
  check_int64(op, "keep_len", keep_len);
  check_same_device(op, "value", value, "key", key);
  check_same_device(op, "keep_index", keep_index, "key", key);
  check_same_device(op, "keep_len", keep_len, "key", key);

  CompactParams p{};
  p.batch = key.size(0);
  p.kv_heads = key.size(1);
  p.keys = key.size(2);
  p.key_dim = key.size(3);
  p.value_dim = value.size(3);
  p.kept_rows = keep_index.size(2);
  check_dim(op, "value", value, 0, p.batch, "batch size of key");
  check_dim(op, "value", value, 1, p.kv_heads, "kv_heads of key");
  check_dim(op, "value", value, 2, p.keys, "positions of key");
  check_dim(op, "keep_index", keep_index, 0, p.batch, "batch size of key");
  check_dim(op, "keep_index", keep_index, 1, p.kv_heads, "kv_heads of key");
  check_dim(op, "keep_len", keep_len, 0, p.batch, "batch size of key");
  return p;
}

PagedAttentionParams check_paged_attention_inputs(
    const at::Tensor& query, const at::Tensor& key_pool,
    const at::Tensor& value_pool, const at::Tensor& block_table,
    const at::Tensor& lengths, double scale, double softcap,
    const std::optional<at::Tensor>& sinks) {
  constexpr const char* op = "paged_attention";
  check_rank(op, "query", query, 4, "[batch, heads, queries, head_dim]");
  check_float_input(op, "query", query);
  const PagedCacheSizes cache = check_paged_cache(op, key_pool, value_pool, block_table);
  TORCH_CHECK(key_pool.scalar_type() == query.scalar_type(), op,
              ": expected query and key_pool of the same dtype, got query ",
              query.scalar_type(), " and key_pool ", key_pool.scalar_type());
  check_same_device(op, "key_pool", key_pool, "query", query);
  check_scale_and_softcap(op, scale, softcap);

  PagedAttentionParams p{};
  p.batch = query.size(0);
  p.heads = query.size(1);
  p.queries = query.size(2);
  p.head_dim = query.size(3);
  p.kv_heads = cache.kv_heads;
  p.value_dim = cache.value_dim;
  p.blocks = cache.blocks;
  p.block_rows = cache.block_rows;
  p.max_blocks = cache.max_blocks;
  TORCH_CHECK(p.head_dim >= 1, op, ": expected head_dim >= 1, got ", p.head_dim);
  TORCH_CHECK(p.queries >= 1, op,
              ": expected at least one query row (queries >= 1), got queries = ",
              p.queries);
  check_dim(op, "key_pool", key_pool, 2, p.head_dim, "head_dim of query");
  check_dim(op, "block_table", block_table, 0, p.batch, "batch size of query");
  p.group = check_query_groups(op, query, p.heads, p.kv_heads);
  check_per_head(op, "lengths", lengths, key_pool, p.batch, p.kv_heads);
  check_sinks(op, sinks, query, p.heads);
  return p;
}

PagedWriteParams check_paged_write_inputs(
    const at::Tensor& key_pool, const at::Tensor& value_pool,
    const at::Tensor& block_table, const at::Tensor& start,
    const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& row_index,
    const std::optional<at::Tensor>& row_count) {
  constexpr const char* op = "paged_write";
  const PagedCacheSizes cache = check_paged_cache(op, key_pool, value_pool, block_table);
  // Kernels write the pools in place through raw pointers, so they must be
  // the caller's own contiguous storage, not a copy made here.
  TORCH_CHECK(key_pool.is_contiguous() && value_pool.is_contiguous(), op,
              ": expected contiguous key_pool and value_pool (they are written in place), got strides ",
              key_pool.strides(), " and ", value_pool.strides());
  check_rank(op, "key", key, 4, "[batch, kv_heads, rows, head_dim]");
  check_rank(op, "value", value, 4, "[batch, kv_heads, rows, value_dim]");
  TORCH_CHECK(key.scalar_type() == key_pool.scalar_type() &&
                  value.scalar_type() == key_pool.scalar_type(),
              op, ": expected key and value of the pools' dtype (",
              key_pool.scalar_type(), "), got key ", key.scalar_type(),
              " and value ", value.scalar_type());
  check_same_device(op, "key", key, "key_pool", key_pool);
  check_same_device(op, "value", value, "key_pool", key_pool);

  PagedWriteParams p{};
  p.batch = cache.batch;
  p.kv_heads = cache.kv_heads;
  p.rows = key.size(2);
  p.written = p.rows;
  p.key_dim = cache.key_dim;
  p.value_dim = cache.value_dim;
  p.blocks = cache.blocks;
  p.block_rows = cache.block_rows;
  p.max_blocks = cache.max_blocks;
  check_dim(op, "key", key, 0, p.batch, "batch size of block_table");
  check_dim(op, "key", key, 1, p.kv_heads, "kv_heads of block_table");
  check_dim(op, "key", key, 3, p.key_dim, "head_dim of key_pool");
  check_dim(op, "value", value, 0, p.batch, "batch size of block_table");
  check_dim(op, "value", value, 1, p.kv_heads, "kv_heads of block_table");
  check_dim(op, "value", value, 2, p.rows, "rows of key");
  check_dim(op, "value", value, 3, p.value_dim, "value_dim of value_pool");
  check_per_head(op, "start", start, key_pool, p.batch, p.kv_heads);
  if (row_index.has_value()) {
    const at::Tensor& index = *row_index;
    check_rank(op, "row_index", index, 3, "[batch, kv_heads, written]");
    check_int64(op, "row_index", index);
    check_same_device(op, "row_index", index, "key_pool", key_pool);
    check_dim(op, "row_index", index, 0, p.batch, "batch size of block_table");
    check_dim(op, "row_index", index, 1, p.kv_heads, "kv_heads of block_table");
    p.written = index.size(2);
  }
  if (row_count.has_value()) {
    check_per_head(op, "row_count", *row_count, key_pool, p.batch, p.kv_heads);
  }
  return p;
}

}  // namespace refreekv
