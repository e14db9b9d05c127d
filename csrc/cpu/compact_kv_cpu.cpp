// CPU implementation of refreekv::compact_kv: gathers the kept rows of keys
// and values into a [b, Hkv, r_max, d] cache whose rows past a sequence's own
// count are zero padding, flagged by the returned [b, r_max] validity mask.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>

#include "../checks.h"

namespace refreekv {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> compact_kv_cpu(
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& keep_index,
    const at::Tensor& keep_len) {
  const CompactParams p = check_compact_inputs(key, value, keep_index, keep_len);
  const at::Tensor k = key.contiguous();
  const at::Tensor v = value.contiguous();
  const at::Tensor index = keep_index.contiguous();
  const at::Tensor lens = keep_len.contiguous();
  const int64_t* len_data = lens.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < p.batch; ++b) {
    TORCH_CHECK(len_data[b] >= 0 && len_data[b] <= p.kept_rows,
                "compact_kv: expected keep_len[", b, "] in [0, ", p.kept_rows,
                "] (keep_index.size(2)), got ", len_data[b]);
  }

  at::Tensor key_out = at::empty({p.batch, p.kv_heads, p.kept_rows, p.key_dim},
                                 k.options());
  at::Tensor value_out = at::empty(
      {p.batch, p.kv_heads, p.kept_rows, p.value_dim}, v.options());
  at::Tensor valid = at::arange(p.kept_rows, lens.options()).unsqueeze(0) <
                     lens.unsqueeze(1);

  // Rows are moved as raw bytes: compaction never changes a value.
  const int64_t key_row_bytes = p.key_dim * k.element_size();
  const int64_t value_row_bytes = p.value_dim * v.element_size();
  const auto* key_src = static_cast<const char*>(k.const_data_ptr());
  const auto* value_src = static_cast<const char*>(v.const_data_ptr());
  auto* key_dst = static_cast<char*>(key_out.data_ptr());
  auto* value_dst = static_cast<char*>(value_out.data_ptr());
  const int64_t* index_data = index.const_data_ptr<int64_t>();

  at::parallel_for(0, p.batch * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / p.kv_heads;
      const int64_t* rows = index_data + job * p.kept_rows;
      const int64_t kept = len_data[b];
      for (int64_t r = 0; r < kept; ++r) {
        const int64_t src = rows[r];
        TORCH_CHECK(src >= 0 && src < p.keys, "compact_kv: expected keep_index[",
                    b, ", ", job % p.kv_heads, ", ", r, "] in [0, ", p.keys,
                    ") (the number of cached positions), got ", src);
        const int64_t src_row = job * p.keys + src;
        const int64_t dst_row = job * p.kept_rows + r;
        std::memcpy(key_dst + dst_row * key_row_bytes,
                    key_src + src_row * key_row_bytes, key_row_bytes);
        std::memcpy(value_dst + dst_row * value_row_bytes,
                    value_src + src_row * value_row_bytes, value_row_bytes);
      }
      // Padding rows are zeroed so they are harmless even if unmasked.
      const int64_t pad_rows = p.kept_rows - kept;
      const int64_t first_pad = job * p.kept_rows + kept;
      std::memset(key_dst + first_pad * key_row_bytes, 0, pad_rows * key_row_bytes);
      std::memset(value_dst + first_pad * value_row_bytes, 0,
                  pad_rows * value_row_bytes);
    }
  });
  return {key_out, value_out, valid};
}

}  // namespace

TORCH_LIBRARY_IMPL(refreekv, CPU, m) {
  m.impl("compact_kv", &compact_kv_cpu);
}

}  // namespace refreekv
