// CPU implementation of refreekv::paged_write: copies rows of a padded cache
// into the blocks of a paged one, in place. Every index is checked before any
// row is written, so a rejected call leaves the pools as they were.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../checks.h"

namespace refreekv {
namespace {

void paged_write_cpu(at::Tensor& key_pool, at::Tensor& value_pool,
                     const at::Tensor& block_table, const at::Tensor& start,
                     const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& row_index,
                     const std::optional<at::Tensor>& row_count) {
  const PagedWriteParams p = check_paged_write_inputs(
      key_pool, value_pool, block_table, start, key, value, row_index, row_count);
  const at::Tensor k = key.contiguous();
  const at::Tensor v = value.contiguous();
  const at::Tensor table = block_table.contiguous();
  const at::Tensor starts = start.contiguous();
  const at::Tensor index = row_index.has_value() ? row_index->contiguous() : at::Tensor();
  const at::Tensor counts = row_count.has_value() ? row_count->contiguous() : at::Tensor();
  const int64_t* table_data = table.const_data_ptr<int64_t>();
  const int64_t* start_data = starts.const_data_ptr<int64_t>();
  const int64_t* index_data = index.defined() ? index.const_data_ptr<int64_t>() : nullptr;
  const int64_t* count_data = counts.defined() ? counts.const_data_ptr<int64_t>() : nullptr;
  const int64_t capacity = p.max_blocks * p.block_rows;
  const int64_t heads = p.batch * p.kv_heads;

  // Head `job` = s Hkv + h writes rows [start, start + count) from source
  // positions source(job, j).
  auto count_of = [&](int64_t job) { return count_data ? count_data[job] : p.written; };
  auto source_of = [&](int64_t job, int64_t j) {
    return index_data ? index_data[job * p.written + j] : j;
  };

  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t s = job / p.kv_heads;
      const int64_t h = job % p.kv_heads;
      const int64_t first = start_data[job];
      const int64_t count = count_of(job);
      TORCH_CHECK(first >= 0, "paged_write: expected start[", s, ", ", h,
                  "] >= 0, got ", first);
      TORCH_CHECK(count >= 0 && count <= p.written, "paged_write: expected row_count[",
                  s, ", ", h, "] in [0, ", p.written,
                  "] (the rows row_index lists, or key.size(2)), got ", count);
      // Compared as `count > capacity - first`, which cannot overflow.
      TORCH_CHECK(count <= capacity - first, "paged_write: expected the written rows [",
                  first, ", ", first, " + ", count, ") of head [", s, ", ", h,
                  "] within the block table's max_blocks * block_rows = ", capacity,
                  " rows, got start[", s, ", ", h, "] = ", first, " and ", count,
                  " rows");
      for (int64_t j = 0; j < count; ++j) {
        const int64_t source = source_of(job, j);
        TORCH_CHECK(source >= 0 && source < p.rows, "paged_write: expected row_index[",
                    s, ", ", h, ", ", j, "] in [0, ", p.rows,
                    ") (the rows of key), got ", source);
      }
      if (count == 0) continue;  // no block is read
      const int64_t* table_row = table_data + job * p.max_blocks;
      const int64_t last_slot = (first + count - 1) / p.block_rows;
      for (int64_t slot = first / p.block_rows; slot <= last_slot; ++slot) {
        const int64_t block = table_row[slot];
        TORCH_CHECK(block >= 0 && block < p.blocks, "paged_write: expected block_table[",
                    s, ", ", h, ", ", slot, "] in [0, ", p.blocks,
                    ") (the blocks in the pool), got ", block);
      }
    }
  });

  // Rows are moved as raw bytes: a write never changes a value.
  const int64_t key_row_bytes = p.key_dim * k.element_size();
  const int64_t value_row_bytes = p.value_dim * v.element_size();
  const auto* key_src = static_cast<const char*>(k.const_data_ptr());
  const auto* value_src = static_cast<const char*>(v.const_data_ptr());
  auto* key_dst = static_cast<char*>(key_pool.data_ptr());
  auto* value_dst = static_cast<char*>(value_pool.data_ptr());
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t* table_row = table_data + job * p.max_blocks;
      const int64_t first = start_data[job];
      const int64_t count = count_of(job);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t target = first + j;
        const int64_t pool_row =
            table_row[target / p.block_rows] * p.block_rows + target % p.block_rows;
        const int64_t source_row = job * p.rows + source_of(job, j);
        std::memcpy(key_dst + pool_row * key_row_bytes,
                    key_src + source_row * key_row_bytes, key_row_bytes);
        std::memcpy(value_dst + pool_row * value_row_bytes,
                    value_src + source_row * value_row_bytes, value_row_bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(refreekv, CPU, m) {
  m.impl("paged_write", &paged_write_cpu);
}

}  // namespace refreekv
