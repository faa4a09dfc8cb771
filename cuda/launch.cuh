// What every format's CUDA handlers share (cuda/<format>/<format>_ops.cu): the
// CUDA-core launch shape, launch and memset error reports, and the dispatch of
// a checked float dtype to its element type. Header-only: each .cu is its own
// translation unit in the _cuda module and again in the emulator module.
#ifndef JAXSPARSE_CUDA_LAUNCH_CUH_
#define JAXSPARSE_CUDA_LAUNCH_CUH_

#include <algorithm>
#include <cstdint>
#include <string>

#include "cpu/common/ffi.h"
#include "cpu/common/validate.h"
#include "cuda/simt.cuh"

namespace jaxsparse {
namespace launch {

// The CUDA-core kernels' block: 32 lanes along the output's contiguous dim (so
// each warp's stores coalesce) x 4 warps along the next dim, whose warps read
// the same operand rows at the same time, fetched once into L1 for the block.
constexpr int kWarpLanes = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kBlockThreads = kWarpLanes * kWarpsPerBlock;
constexpr int64_t kMaxGridX = 2147483647;  // hardware limit of gridDim.x
constexpr int64_t kMaxGridYZ = 65535;      // hardware limit of gridDim.y, z

// Calls f(b, o, i) for every point of [batch, outer, inner]: i across the
// lanes of a warp, o across the warps of a block, b along grid z. The
// grid-stride loops cover sizes beyond the grid limits.
template <typename F>
__device__ __forceinline__ void ForEachPoint(int64_t batch, int64_t outer, int64_t inner,
                                             const F& f) {
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kWarpsPerBlock + threadIdx.y;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kWarpLanes + threadIdx.x;
  const int64_t o_stride = static_cast<int64_t>(gridDim.y) * kWarpsPerBlock;
  const int64_t i_stride = static_cast<int64_t>(gridDim.x) * kWarpLanes;
  for (int64_t b = blockIdx.z; b < batch; b += gridDim.z) {
    for (int64_t o = o0; o < outer; o += o_stride) {
      for (int64_t i = i0; i < inner; i += i_stride) f(b, o, i);
    }
  }
}

// The grid of ForEachPoint for [batch, outer, inner], capped at the limits.
inline dim3 GridFor(int64_t batch, int64_t outer, int64_t inner) {
  const auto blocks = [](int64_t size, int64_t per_block, int64_t limit) {
    return static_cast<unsigned>(std::min((size + per_block - 1) / per_block, limit));
  };
  return dim3(blocks(inner, kWarpLanes, kMaxGridX), blocks(outer, kWarpsPerBlock, kMaxGridYZ),
              blocks(batch, 1, kMaxGridYZ));
}

inline dim3 Block() { return dim3(kWarpLanes, kWarpsPerBlock); }

// Reports a failed launch. cudaGetLastError may also return an error left by
// an earlier asynchronous launch on this device.
inline xla::ffi::Error LaunchStatus(const char* target) {
  const std::string err = simt::LastLaunchError();
  if (err.empty()) return xla::ffi::Error::Success();
  return xla::ffi::Error::Internal(std::string(target) + ": CUDA error: " + err);
}

inline xla::ffi::Error FillZeros(const char* target, simt::Stream stream,
                                 xla::ffi::AnyBuffer out) {
  // All-zero bytes are +0 in f32, bf16 and f16.
  const std::string err = simt::MemsetAsync(out.untyped_data(), out.size_bytes(), stream);
  if (err.empty()) return xla::ffi::Error::Success();
  return xla::ffi::Error::Internal(std::string(target) + ": cudaMemsetAsync: " + err);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with the element type of a checked float dtype.
template <typename Fn>
xla::ffi::Error DispatchFloat(const char* target, xla::ffi::DataType dtype, Fn&& fn) {
  switch (dtype) {
    case xla::ffi::DataType::F32:
      return fn(TypeTag<float>{});
    case xla::ffi::DataType::BF16:
      return fn(TypeTag<simt::Bf16>{});
    case xla::ffi::DataType::F16:
      return fn(TypeTag<simt::Half>{});
    default:
      return Validator(target).Fail("unsupported dtype " + DtypeName(dtype));
  }
}

template <typename T>
const T* Data(const Operand3& array) {
  return static_cast<const T*>(array.data());
}

template <typename T>
T* MutableData(const Operand3& array) {
  return static_cast<T*>(array.mutable_data());
}

}  // namespace launch
}  // namespace jaxsparse

#endif  // JAXSPARSE_CUDA_LAUNCH_CUH_
