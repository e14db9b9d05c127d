// CUDA implementation of refreekv::paged_write (SPEC 10): rows of a padded
// cache written into a paged one, in place, for a prefill pack (row_index
// the kept positions) or a decode append (row_index None).
//
// One warp per written row (grid-stride), as compact_kv's gather: the row's
// source position, target row, block-table slot and block are worked out
// once per warp, then the lanes copy consecutive Words of the key row and
// then of the value row, so every warp access is contiguous. Word is uint4
// when every row is 16-byte aligned, else the element size. Nothing but the
// written rows changes.
//
// Checks: an append runs every decode step and must not wait for the host,
// so the values are checked where the kernel reads them, by device-side
// assertions: per head, row_count in [0, r] and the written rows
// [start, start + count) inside the max_blocks * block_rows rows the table
// can address; per row, row_index in [0, n) and the block id in [0, blocks).
// (The CPU kernel raises for the same inputs.)
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "../checks.h"
#include "common.cuh"

namespace refreekv {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct PagedWriteKernelParams {
  char* key_pool;              // [blocks, block_rows, d] bytes
  char* value_pool;            // [blocks, block_rows, dv] bytes
  const char* key;             // [b, Hkv, n, d] bytes
  const char* value;           // [b, Hkv, n, dv] bytes
  const int64_t* block_table;  // [b, Hkv, max_blocks]
  const int64_t* start;        // [b, Hkv]
  const int64_t* row_index;    // [b, Hkv, r], or nullptr: positions 0 .. n - 1
  const int64_t* row_count;    // [b, Hkv], or nullptr: all r rows
  int64_t heads;               // b * Hkv
  int64_t rows;                // n
  int64_t written;             // r
  int64_t blocks, block_rows, max_blocks;
  int64_t key_words, value_words;  // row sizes in units of Word
};

template <typename Word>
__global__ void __launch_bounds__(kThreads) paged_write_kernel(const PagedWriteKernelParams p) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int lane = threadIdx.x % 32;
  const int64_t table_rows = p.max_blocks * p.block_rows;

  // Per-head checks, one thread per head (also when the head writes nothing).
  for (int64_t head = tid; head < p.heads; head += threads) {
    const int64_t count = p.row_count == nullptr ? p.written : p.row_count[head];
    CUDA_KERNEL_ASSERT_MSG(count >= 0 && count <= p.written,
                           "paged_write: expected row_count in [0, r] (the rows row_index lists, or key.size(2))");
    const int64_t first = p.start[head];
    // As `count <= table_rows - first`, which cannot overflow.
    CUDA_KERNEL_ASSERT_MSG(first >= 0 && count <= table_rows - first,
                           "paged_write: expected the written rows in [0, max_blocks * block_rows)");
  }

  const int64_t total = p.heads * p.written;
  for (int64_t row = tid / 32; row < total; row += threads / 32) {
    // row = head * r + j, head = s * Hkv + h
    const int64_t head = row / p.written;
    const int64_t j = row - head * p.written;
    const int64_t count = p.row_count == nullptr ? p.written : p.row_count[head];
    if (j >= count) continue;  // uniform over the warp
    const int64_t source = p.row_index == nullptr ? j : p.row_index[row];
    CUDA_KERNEL_ASSERT_MSG(source >= 0 && source < p.rows,
                           "paged_write: expected row_index in [0, n) (key.size(2))");
    // Checked again here, where the row is addressed: the head's check may
    // run in another block, after this one.
    const int64_t target = p.start[head] + j;
    CUDA_KERNEL_ASSERT_MSG(target >= 0 && target < table_rows,
                           "paged_write: expected the written rows in [0, max_blocks * block_rows)");
    const int64_t block = p.block_table[head * p.max_blocks + target / p.block_rows];
    CUDA_KERNEL_ASSERT_MSG(block >= 0 && block < p.blocks,
                           "paged_write: expected block_table entries in [0, blocks)");
    const int64_t pool_row = block * p.block_rows + target % p.block_rows;
    const int64_t source_row = head * p.rows + source;

    const Word* key = reinterpret_cast<const Word*>(p.key) + source_row * p.key_words;
    Word* key_pool = reinterpret_cast<Word*>(p.key_pool) + pool_row * p.key_words;
    for (int64_t w = lane; w < p.key_words; w += 32) key_pool[w] = key[w];
    const Word* value = reinterpret_cast<const Word*>(p.value) + source_row * p.value_words;
    Word* value_pool = reinterpret_cast<Word*>(p.value_pool) + pool_row * p.value_words;
    for (int64_t w = lane; w < p.value_words; w += 32) value_pool[w] = value[w];
  }
}

template <typename Word>
void launch_paged_write(PagedWriteKernelParams p, int64_t key_bytes, int64_t value_bytes,
                        cudaStream_t stream) {
  p.key_words = key_bytes / static_cast<int64_t>(sizeof(Word));
  p.value_words = value_bytes / static_cast<int64_t>(sizeof(Word));
  constexpr int64_t kWarps = kThreads / 32;
  const int64_t blocks = std::max(ceil_div(p.heads * p.written, kWarps), ceil_div(p.heads, kThreads));
  // Grid-stride loops: a capped grid still fills the GPU many times over.
  paged_write_kernel<Word>
      <<<grid_size(std::min<int64_t>(blocks, int64_t{1} << 16)), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void paged_write_cuda(at::Tensor& key_pool, at::Tensor& value_pool, const at::Tensor& block_table,
                      const at::Tensor& start, const at::Tensor& key, const at::Tensor& value,
                      const std::optional<at::Tensor>& row_index,
                      const std::optional<at::Tensor>& row_count) {
  const PagedWriteParams s = check_paged_write_inputs(key_pool, value_pool, block_table, start, key,
                                                      value, row_index, row_count);
  if (s.batch * s.kv_heads == 0) return;
  const c10::cuda::CUDAGuard guard(key_pool.device());
  const at::Tensor k = key.contiguous();
  const at::Tensor v = value.contiguous();
  const at::Tensor table = block_table.contiguous();
  const at::Tensor first = start.contiguous();
  at::Tensor index, count;
  if (row_index.has_value()) index = row_index->contiguous();
  if (row_count.has_value()) count = row_count->contiguous();

  PagedWriteKernelParams p{};
  p.key_pool = static_cast<char*>(key_pool.data_ptr());
  p.value_pool = static_cast<char*>(value_pool.data_ptr());
  p.key = static_cast<const char*>(k.const_data_ptr());
  p.value = static_cast<const char*>(v.const_data_ptr());
  p.block_table = table.const_data_ptr<int64_t>();
  p.start = first.const_data_ptr<int64_t>();
  p.row_index = index.defined() ? index.const_data_ptr<int64_t>() : nullptr;
  p.row_count = count.defined() ? count.const_data_ptr<int64_t>() : nullptr;
  p.heads = s.batch * s.kv_heads;
  p.rows = s.rows;
  p.written = s.written;
  p.blocks = s.blocks;
  p.block_rows = s.block_rows;
  p.max_blocks = s.max_blocks;

  const int64_t key_bytes = s.key_dim * k.element_size();
  const int64_t value_bytes = s.value_dim * v.element_size();
  const auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool vec16 = key_bytes % 16 == 0 && value_bytes % 16 == 0 && aligned16(p.key) &&
                     aligned16(p.value) && aligned16(p.key_pool) && aligned16(p.value_pool);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (vec16) {
    launch_paged_write<uint4>(p, key_bytes, value_bytes, stream);
  } else if (k.element_size() == 4) {
    launch_paged_write<uint32_t>(p, key_bytes, value_bytes, stream);
  } else {
    launch_paged_write<uint16_t>(p, key_bytes, value_bytes, stream);
  }
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(refreekv, CUDA, m) {
  m.impl("paged_write", &cuda::paged_write_cuda);
}

}  // namespace refreekv
