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
    TORCH_CHECK(len.scalar_type() == at::kLong, op,
                ": expected valid_len of dtype int64, got ", len.scalar_type());
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
  TORCH_CHECK(std::isfinite(scale), op, ": expected a finite scale, got ", scale);
  // The kernels cap in float32, so a positive softcap must stay positive and
  // finite there (one that rounds to 0 or inf would turn logits into NaN).
  const float softcap_f32 = static_cast<float>(softcap);
  TORCH_CHECK(softcap == 0.0 || (softcap_f32 > 0.0f && std::isfinite(softcap_f32)),
              op,
              ": expected softcap to be 0 (no capping) or positive and finite "
              "in float32, got ",
              softcap);

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
  // 0 would pass the multiple check below and leave a group of 0 heads.
  TORCH_CHECK(p.heads >= 1, op, ": expected at least one query head, got query of shape ",
              query.sizes());
  TORCH_CHECK(p.kv_heads >= 1 && p.heads % p.kv_heads == 0, op,
              ": expected the query heads to be a multiple of the key heads "
              "(grouped-query attention), got ",
              p.heads, " query heads and ", p.kv_heads, " key heads");
  p.group = p.heads / p.kv_heads;
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
  if (sinks.has_value()) {
    const at::Tensor& sink_logits = *sinks;
    check_rank(op, "sinks", sink_logits, 1, "[heads]");
    TORCH_CHECK(c10::isFloatingType(sink_logits.scalar_type()), op,
                ": expected sinks of a floating dtype, got ",
                sink_logits.scalar_type());
    check_same_device(op, "sinks", sink_logits, "query", query);
    check_dim(op, "sinks", sink_logits, 0, p.heads, "query heads");
  }
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
  TORCH_CHECK(keep_index.scalar_type() == at::kLong, op,
              ": expected keep_index of dtype int64, got ",
              keep_index.scalar_type());
  TORCH_CHECK(keep_len.scalar_type() == at::kLong, op,
              ": expected keep_len of dtype int64, got ", keep_len.scalar_type());
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

}  // namespace refreekv
