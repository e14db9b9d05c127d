// CUDA implementation of refreekv::compact_kv: one gather kernel moves the
// kept rows of keys and values together into a [b, Hkv, r_max, d] cache,
// zero-fills rows past each sequence's keep_len, and writes the [b, r_max]
// validity mask.
//
// Validation: like the CPU kernel this raises a RuntimeError for a keep_len
// outside [0, r_max] or a used keep_index outside [0, n), with the same
// words. The kernel never reads out of bounds: it clamps a bad keep_len,
// writes zeros for a bad index, and records the first bad entry (smallest
// flat position, so the report is deterministic) in a small device buffer.
// The host then reads that buffer once, which is one synchronization per
// call. compact_kv runs once per layer at prefill, so this is cheap, and it is
// the price of reporting bad input instead of silently gathering garbage.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "common.cuh"

namespace refreekv {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct CompactKernelParams {
  const char* key;          // [b, Hkv, n, dk] bytes
  const char* value;        // [b, Hkv, n, dv] bytes
  const int64_t* index;     // [b, Hkv, r_max]
  const int64_t* keep_len;  // [b]
  char* key_out;            // [b, Hkv, r_max, dk]
  char* value_out;          // [b, Hkv, r_max, dv]
  bool* valid;              // [b, r_max]
  unsigned long long* error;  // [2]: first bad keep_len batch, first bad index (flat)
  int64_t batch, kv_heads, keys, kept_rows;
  int64_t key_words, value_words;  // row sizes in units of Word
};

// One warp per output row (grid-stride): the row's index arithmetic is done
// once per warp and the lanes copy consecutive Words of the key row and then
// of the value row, so every warp access is contiguous. Word is uint4 when
// every row is 16-byte aligned, else the element size.
template <typename Word>
__global__ void __launch_bounds__(kThreads) compact_kernel(const CompactKernelParams p) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int lane = threadIdx.x % 32;

  // keep_len checks, one thread per sequence (also when r_max == 0).
  for (int64_t b = tid; b < p.batch; b += threads) {
    const int64_t len = p.keep_len[b];
    if (len < 0 || len > p.kept_rows) atomicMin(&p.error[0], static_cast<unsigned long long>(b));
  }

  const int64_t rows = p.batch * p.kv_heads * p.kept_rows;
  for (int64_t row = tid / 32; row < rows; row += threads / 32) {
    // row = (b * Hkv + h) * r_max + r
    const int64_t r = row % p.kept_rows;
    const int64_t bh = row / p.kept_rows;
    const int64_t b = bh / p.kv_heads;
    const int64_t len = p.keep_len[b];
    const int64_t kept = len < 0 ? 0 : (len > p.kept_rows ? p.kept_rows : len);
    int64_t src = -1;  // -1: padding row (or bad index): zeros
    if (r < kept) {
      const int64_t candidate = p.index[row];
      if (candidate >= 0 && candidate < p.keys) {
        src = candidate;
      } else if (lane == 0) {
        atomicMin(&p.error[1], static_cast<unsigned long long>(row));
      }
    }
    if (lane == 0 && bh % p.kv_heads == 0) p.valid[b * p.kept_rows + r] = r < kept;
    // Padding rows read nothing; index row 0 so no pointer is formed before
    // the start of the allocation (src = -1 in the first head would).
    const int64_t src_row = bh * p.keys + (src >= 0 ? src : 0);
    const Word* key = reinterpret_cast<const Word*>(p.key) + src_row * p.key_words;
    Word* key_out = reinterpret_cast<Word*>(p.key_out) + row * p.key_words;
    for (int64_t w = lane; w < p.key_words; w += 32) key_out[w] = src >= 0 ? key[w] : Word{};
    const Word* value = reinterpret_cast<const Word*>(p.value) + src_row * p.value_words;
    Word* value_out = reinterpret_cast<Word*>(p.value_out) + row * p.value_words;
    for (int64_t w = lane; w < p.value_words; w += 32) value_out[w] = src >= 0 ? value[w] : Word{};
  }
}

template <typename Word>
void launch_compact(CompactKernelParams p, int64_t key_bytes, int64_t value_bytes,
                    cudaStream_t stream) {
  p.key_words = key_bytes / static_cast<int64_t>(sizeof(Word));
  p.value_words = value_bytes / static_cast<int64_t>(sizeof(Word));
  constexpr int64_t kWarps = kThreads / 32;
  const int64_t rows = p.batch * p.kv_heads * p.kept_rows;
  const int64_t blocks = std::max(ceil_div(rows, kWarps), ceil_div(p.batch, kThreads));
  // Grid-stride loops: a capped grid still fills the GPU many times over.
  compact_kernel<Word>
      <<<grid_size(std::min<int64_t>(blocks, int64_t{1} << 16)), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compact_kv_cuda(
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& keep_index,
    const at::Tensor& keep_len) {
  const CompactParams s = check_compact_inputs(key, value, keep_index, keep_len);
  const c10::cuda::CUDAGuard guard(key.device());
  const at::Tensor k = key.contiguous();
  const at::Tensor v = value.contiguous();
  const at::Tensor index = keep_index.contiguous();
  const at::Tensor lens = keep_len.contiguous();
  at::Tensor key_out = at::empty({s.batch, s.kv_heads, s.kept_rows, s.key_dim}, k.options());
  at::Tensor value_out = at::empty({s.batch, s.kv_heads, s.kept_rows, s.value_dim}, v.options());
  at::Tensor valid = at::empty({s.batch, s.kept_rows}, lens.options().dtype(at::kBool));
  if (s.batch == 0) return {key_out, value_out, valid};
  ErrorReport<2> errors(lens.options());

  CompactKernelParams p{};
  p.key = static_cast<const char*>(k.const_data_ptr());
  p.value = static_cast<const char*>(v.const_data_ptr());
  p.index = index.const_data_ptr<int64_t>();
  p.keep_len = lens.const_data_ptr<int64_t>();
  p.key_out = static_cast<char*>(key_out.data_ptr());
  p.value_out = static_cast<char*>(value_out.data_ptr());
  p.valid = valid.data_ptr<bool>();
  p.error = errors.device_slots();
  p.batch = s.batch;
  p.kv_heads = s.kv_heads;
  p.keys = s.keys;
  p.kept_rows = s.kept_rows;
  if (s.kv_heads == 0) {  // no row carries the mask; form it directly
    valid.copy_(at::arange(s.kept_rows, lens.options()).unsqueeze(0) < lens.unsqueeze(1));
  }
  const int64_t key_bytes = s.key_dim * k.element_size();
  const int64_t value_bytes = s.value_dim * v.element_size();
  const auto aligned16 = [](const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  };
  const bool vec16 = key_bytes % 16 == 0 && value_bytes % 16 == 0 && aligned16(p.key) &&
                     aligned16(p.value) && aligned16(p.key_out) && aligned16(p.value_out);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (vec16) {
    launch_compact<uint4>(p, key_bytes, value_bytes, stream);
  } else if (k.element_size() == 4) {
    launch_compact<uint32_t>(p, key_bytes, value_bytes, stream);
  } else {
    launch_compact<uint16_t>(p, key_bytes, value_bytes, stream);
  }

  const auto first_bad = errors.read();  // the one synchronization (see the top of the file)
  if (first_bad[0] != kNoError) {
    const int64_t b = static_cast<int64_t>(first_bad[0]);
    TORCH_CHECK(false, "compact_kv: expected keep_len[", b, "] in [0, ", s.kept_rows,
                "] (keep_index.size(2)), got ", lens[b].item<int64_t>());
  }
  if (first_bad[1] != kNoError) {
    const int64_t row = static_cast<int64_t>(first_bad[1]);
    const int64_t r = row % s.kept_rows;
    const int64_t h = (row / s.kept_rows) % s.kv_heads;
    const int64_t b = row / (s.kept_rows * s.kv_heads);
    TORCH_CHECK(false, "compact_kv: expected keep_index[", b, ", ", h, ", ", r, "] in [0, ",
                s.keys, ") (the number of cached positions), got ",
                index[b][h][r].item<int64_t>());
  }
  return {key_out, value_out, valid};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(refreekv, CUDA, m) {
  m.impl("compact_kv", &cuda::compact_kv_cuda);
}

}  // namespace refreekv
