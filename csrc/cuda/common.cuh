// Small helpers shared by the refreekv CUDA kernels: element conversion,
// 16-byte copies into shared memory, warp reductions and the dtype switch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <cstring>

namespace refreekv {
namespace cuda {

// Element types the kernels are instantiated for (device-side spellings of
// float, at::Half and at::BFloat16; the layouts are identical).
template <typename T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Zero of each element type, spelled without the half/bfloat16 conversion
// operators that torch's build disables (-D__CUDA_NO_HALF_CONVERSIONS__).
template <typename T>
__device__ __forceinline__ T zero_value();
template <>
__device__ __forceinline__ float zero_value<float>() { return 0.0f; }
template <>
__device__ __forceinline__ __half zero_value<__half>() { return __float2half(0.0f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_value<__nv_bfloat16>() {
  return __float2bfloat16(0.0f);
}

// A float32 result rounded to nearest in each element type (written out
// without the conversion operators, for the same reason as zero_value).
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Converts the elements held in one 16-byte word (4 floats or 8 halves).
template <typename T>
struct Vec16 {
  static constexpr int kElems = 16 / sizeof(T);
  __device__ __forceinline__ static void to_floats(const uint4& v, float* out) {
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < kElems; ++i) out[i] = to_float(e[i]);
  }
};

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Every kernel uses a 1-D grid (x allows 2^31 - 1 blocks; y and z only
// 65535, too few for b * H or for n / tile at long contexts).
inline unsigned grid_size(int64_t blocks) {
  TORCH_CHECK(blocks > 0 && blocks <= int64_t{0x7fffffff},
              "refreekv CUDA kernels: grid of ", blocks, " blocks is out of range");
  return static_cast<unsigned>(blocks);
}

// 16-byte global -> shared copy. On sm_80+ it is an asynchronous copy
// (cp.async.cg: bypasses L1 and registers, so a block can keep many loads in
// flight); callers must call cp_async_wait_all() and __syncthreads() before
// reading the destination.
__device__ __forceinline__ void copy16_async(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src));
#else
  *reinterpret_cast<uint4*>(smem_dst) = *reinterpret_cast<const uint4*>(gmem_src);
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 0;\n" ::);
#endif
}

// Pipelined form of the two above: cp_async_commit() closes the copies issued
// so far into a group, and cp_async_wait<N>() waits until at most N groups
// are still in flight, so a block can compute on one stage while the next is
// loading. (Before sm_80 the copies completed when issued; both are no-ops.)
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kPendingGroups>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPendingGroups));
#endif
}

// Copies rows [0, rows) x elements [0, cols) of a row-major global matrix
// (row stride src_stride elements) into shared memory (row stride dst_stride
// elements), writing zeros to rows [rows, rows_total) and to elements
// [cols, dst_cols). Zero padding lets the dot-product loops run over whole
// 16-byte words and whole tiles without bounds checks.
// vec16: the caller has checked that src, src_stride and cols allow 16-byte
// copies (every row start and cols * sizeof(T) 16-byte aligned), and
// dst_stride * sizeof(T) and dst_cols * sizeof(T) are multiples of 16.
template <typename T>
__device__ __forceinline__ void load_tile(T* dst, int dst_stride, int dst_cols,
                                          const T* src, int64_t src_stride,
                                          int rows, int rows_total, int cols,
                                          bool vec16) {
  constexpr int kE = 16 / sizeof(T);
  const int words_per_row = dst_cols / kE;
  const int words = rows_total * words_per_row;
  for (int w = threadIdx.x; w < words; w += blockDim.x) {
    const int r = w / words_per_row;
    const int c = (w - r * words_per_row) * kE;
    T* d = dst + r * dst_stride + c;
    if (r < rows && vec16 && c + kE <= cols) {
      copy16_async(d, src + r * src_stride + c);
    } else {
      // Partial word, padding, or unaligned input: element by element.
      alignas(16) T vals[kE];
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        vals[e] = (r < rows && c + e < cols) ? src[r * src_stride + c + e] : zero_value<T>();
      }
      *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(vals);
    }
  }
}

// Where kernels report bad input values instead of asserting on the device
// (a device-side assertion leaves a sticky error that ends CUDA for the whole
// process): kSlots counters that kernels lower with atomicMin to the first
// bad index of each kind, so the report is deterministic. The host reads them
// once after the launch, one synchronization, and raises with the CPU's words.
constexpr unsigned long long kNoError = ~0ull;

template <int kSlots>
class ErrorReport {
 public:
  explicit ErrorReport(const at::TensorOptions& options)
      : buffer_(at::full({kSlots}, -1, options.dtype(at::kLong))) {}  // all bits set: kNoError

  unsigned long long* device_slots() {
    return reinterpret_cast<unsigned long long*>(buffer_.data_ptr<int64_t>());
  }

  // Waits for the kernels: per slot, the first bad index or kNoError.
  std::array<unsigned long long, kSlots> read() const {
    const at::Tensor host = buffer_.cpu();
    std::array<unsigned long long, kSlots> slots;
    std::memcpy(slots.data(), host.const_data_ptr<int64_t>(), sizeof(slots));
    return slots;
  }

 private:
  at::Tensor buffer_;
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Merges two (max, sum of exp(x - max)) softmax partials. A partial with
// max == -inf is empty (sum 0) and leaves the other unchanged, so rows that
// see only masked keys never produce inf - inf.
__device__ __forceinline__ void merge_softmax(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    return;
  }
  const float mx = fmaxf(m, m2);
  s = s * expf(m - mx) + s2 * expf(m2 - mx);
  m = mx;
}

}  // namespace cuda
}  // namespace refreekv

// float32, float16 and bfloat16 (the dtypes checks.h admits; no double), with
// scalar_t the at:: type.
#define REFREEKV_DISPATCH_FLOATS(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
