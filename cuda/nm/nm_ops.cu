// CUDA handlers of the N:M targets (docs/ffi_abi.md): shape checks, dtype
// dispatch, and simple CUDA-core kernels whose per-output math lives in
// nm_math.cuh. Tensor-core (mma.sp) kernels replace these kernels later.
//
// All three kernels use a 32 x 4 block. threadIdx.x runs along the output's
// contiguous dim, so each warp's stores coalesce; threadIdx.y takes 4 rows of
// the next dim, whose warps read the same operand rows at the same time
// (weight rows for spmm and spmm_t, an x window for sddmm), so those rows are
// fetched once into L1 for the whole block. 128 threads per block is the
// smallest size that still shares those rows: residency is then limited by
// the register file (the 64-bit index math takes about 40 registers; a cap of
// 32 for full occupancy makes ptxas spill), not by the block size, and the
// last wave stays short.

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "cpu/common/ffi.h"
#include "cpu/common/validate.h"
#include "cpu/nm/nm_checks.h"
#include "cuda/ffi_target.h"
#include "cuda/launch.cuh"
#include "cuda/nm/nm_math.cuh"
#include "cuda/nm/nm_sp24.cuh"
#include "cuda/nm/nm_tc_backward.cuh"
#include "cuda/simt.cuh"

namespace ffi = xla::ffi;

namespace jaxsparse {
namespace {

using namespace launch;  // NOLINT: the shared launch helpers of cuda/launch.cuh.

constexpr char kSpmm[] = "jaxsparse_nm_spmm";
constexpr char kSpmmT[] = "jaxsparse_nm_spmm_t";
constexpr char kSddmm[] = "jaxsparse_nm_sddmm";
constexpr char kSpmmSp24[] = "jaxsparse_nm_spmm_sp24";

// ------------------------------------------------------------------ kernels

// One thread per y[b, t, j], j across lanes: at each step all lanes read the
// same group of one x row (a broadcast of one or two sectors), and each lane
// streams its own weight row through L1, shared with the block's 3 other
// warps (same j, other t). A thread's f32 sum is the reference's order.
template <typename T>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kBlockThreads)
    NmSpmmKernel(const JAXSPARSE_GRID_CONSTANT nm::SpmmArgs<T> a) {
  ForEachPoint(
      a.d.batch, a.d.tokens, a.d.out,
      [&](int64_t b, int64_t t, int64_t j) { nm::SpmmElement(a, b, t, j); });
}

// One thread per group (b, t, g), g across lanes: for each weight row j a warp
// reads 32 consecutive groups (32 * n contiguous values and indices) and one
// broadcast dy[b, t, j]. Gathering per group needs no atomics.
template <int kSlots, typename T>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kBlockThreads)
    NmSpmmTKernel(const JAXSPARSE_GRID_CONSTANT nm::SpmmTArgs<T> a) {
  ForEachPoint(a.d.batch, a.d.tokens, a.d.groups,
               [&](int64_t b, int64_t t, int64_t g) {
                 nm::SpmmTGroup<kSlots>(a, b, t, g);
               });
}

// One thread per dv[b, j, c], c across lanes: index loads and dv stores
// coalesce, dy[b, t, j] is a broadcast, and a warp's x loads fall in one
// 32 * m / n wide window of an x row, shared with the block's other warps
// (same c, other j).
template <typename T>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kBlockThreads)
    NmSddmmKernel(const JAXSPARSE_GRID_CONSTANT nm::SddmmArgs<T> a) {
  ForEachPoint(
      a.d.batch, a.d.out, a.d.kept,
      [&](int64_t b, int64_t j, int64_t c) { nm::SddmmElement(a, b, j, c); });
}

// ------------------------------------------------------------------ launches

template <typename T>
ffi::Error Launch(simt::Stream stream, const nm::SpmmArgs<T>& a) {
  simt::Launch(kSpmm, &NmSpmmKernel<T>, GridFor(a.d.batch, a.d.tokens, a.d.out),
               Block(), 0, stream, a);
  return LaunchStatus(kSpmm);
}

// kSlots is the smallest of 4, 8, 16 holding m: 2:4 and 4:8 keep 4 or 8
// accumulators, not 16, and unroll to a quarter or half of the compares.
template <typename T>
ffi::Error Launch(simt::Stream stream, const nm::SpmmTArgs<T>& a) {
  const dim3 grid = GridFor(a.d.batch, a.d.tokens, a.d.groups);
  if (a.d.m <= 4) {
    simt::Launch(kSpmmT, &NmSpmmTKernel<4, T>, grid, Block(), 0, stream, a);
  } else if (a.d.m <= 8) {
    simt::Launch(kSpmmT, &NmSpmmTKernel<8, T>, grid, Block(), 0, stream, a);
  } else {
    simt::Launch(kSpmmT, &NmSpmmTKernel<nm::kMaxM, T>, grid, Block(), 0, stream, a);
  }
  return LaunchStatus(kSpmmT);
}

template <typename T>
ffi::Error Launch(simt::Stream stream, const nm::SddmmArgs<T>& a) {
  simt::Launch(kSddmm, &NmSddmmKernel<T>, GridFor(a.d.batch, a.d.out, a.d.kept),
               Block(), 0, stream, a);
  return LaunchStatus(kSddmm);
}

// ------------------------------------------------------------------ checks
// Shapes, dtypes and attributes go through the validator the CPU handlers use
// (cpu/common/validate.h, cpu/nm/nm_checks.h).

using Array3 = Operand3;
using nm_check::Operands;

ffi::Error Invalid(const char* target, const std::string& what) {
  return Validator(target).Fail(what);
}

nm::Dims MakeDims(int64_t batch, int64_t tokens, int64_t in, int64_t out,
                  int32_t n, int32_t m) {
  const int64_t groups = (in + m - 1) / m;
  return nm::Dims{batch, tokens, in, out, groups, groups * n, n, m};
}

// ------------------------------------------------------------------ handlers

bool IsHalfPrecision(ffi::DataType dtype) {
  return dtype == ffi::DataType::BF16 || dtype == ffi::DataType::F16;
}

// The tensor-core kernels keep tile origins in 32 bits (it saves the
// registers that would otherwise spill).
bool FitsTensorCoreTiles(const nm::Dims& d) {
  constexpr int64_t kLimit = 0x7fffffff - 2 * tc::kTile;
  return d.in < kLimit && d.out < kLimit && d.tokens < kLimit;
}

template <typename T>
tc::Args<T> TcArgs(const uint16_t* dense_a, const uint16_t* dy, const T* values,
                   const Array3& indices, T* out, int64_t a_stride, int64_t dy_stride,
                   int64_t values_batch, const nm::Dims& d) {
  return tc::Args<T>{dense_a,
                     dy,
                     values,
                     Data<uint8_t>(indices),
                     out,
                     a_stride,
                     dy_stride,
                     values_batch == 1 ? 0 : d.out * d.kept,
                     indices.batch == 1 ? 0 : d.out * d.kept,
                     d.batch,
                     d.tokens,
                     d.in,
                     d.out,
                     d.groups,
                     d.kept,
                     d.n,
                     d.m};
}

// Launches the tensor-core backward kernel of `target`: spmm_t over (K, T)
// tiles of dx, sddmm over (N, K) tiles of the Gram matrix.
template <typename T, simt::MmaType kType>
ffi::Error LaunchTensorCore(const char* target, simt::Stream stream, const tc::Args<T>& a) {
  const bool spmm_t = target == kSpmmT;
  const int64_t rows = spmm_t ? a.in : a.out_features, cols = spmm_t ? a.tokens : a.in;
  const int64_t grid_y = (cols + tc::kTile - 1) / tc::kTile;
  if (grid_y > kMaxGridYZ) {
    return Invalid(target, "a dimension of " + std::to_string(cols) + " exceeds one launch");
  }
  const dim3 grid(static_cast<unsigned>((rows + tc::kTile - 1) / tc::kTile),
                  static_cast<unsigned>(grid_y),
                  static_cast<unsigned>(std::min<int64_t>(a.batch, kMaxGridYZ)));
  if (spmm_t) {
    simt::Launch(target, &tc::SpmmTTcKernel<T, kType>, grid, dim3(tc::kThreads), tc::kSpmmTSmem,
                 stream, a);
  } else {
    simt::Launch(target, &tc::SddmmTcKernel<T, kType>, grid, dim3(tc::kThreads), tc::kSddmmSmem,
                 stream, a);
  }
  return LaunchStatus(target);
}

// Calls launch(out) with the result as simt::Bf16* or simt::Half*, and the
// matching MMA type as a template argument of LaunchTensorCore.
template <typename Fn>
ffi::Error DispatchHalf(const Array3& result, Fn&& launch) {
  if (result.buffer->element_type() == ffi::DataType::BF16) {
    return launch(MutableData<simt::Bf16>(result),
                  std::integral_constant<simt::MmaType, simt::MmaType::kBf16>{});
  }
  return launch(MutableData<simt::Half>(result),
                std::integral_constant<simt::MmaType, simt::MmaType::kF16>{});
}

ffi::Error NmSpmm(simt::Stream stream, ffi::AnyBuffer x_buffer,
                  ffi::AnyBuffer values_buffer, ffi::AnyBuffer indices_buffer,
                  int32_t n, int32_t m, ffi::Result<ffi::AnyBuffer> y_buffer) {
  Operands o;
  JAXSPARSE_RETURN_IF_ERROR(nm_check::CheckSpmm(Validator(kSpmm), n, m, x_buffer, values_buffer,
                                                indices_buffer, *y_buffer, &o));
  const Array3 &x = o.a, &values = o.b, &indices = o.indices, &y = o.result;

  if (y.buffer->element_count() == 0) return ffi::Error::Success();
  const nm::Dims d = MakeDims(y.batch, y.rows, x.cols, y.cols, n, m);
  if (d.kept == 0) return FillZeros(kSpmm, stream, *y.buffer);  // K == 0
  return DispatchFloat(kSpmm, x.buffer->element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    return Launch(stream,
                  nm::SpmmArgs<T>{Data<T>(x), Data<T>(values),
                                  Data<uint8_t>(indices), MutableData<T>(y),
                                  x.batch, values.batch, indices.batch, d});
  });
}

ffi::Error NmSpmmT(simt::Stream stream, ffi::AnyBuffer dy_buffer,
                   ffi::AnyBuffer values_buffer, ffi::AnyBuffer indices_buffer,
                   int32_t n, int32_t m,
                   ffi::Result<ffi::AnyBuffer> dx_buffer) {
  Operands o;
  JAXSPARSE_RETURN_IF_ERROR(nm_check::CheckSpmmT(Validator(kSpmmT), n, m, dy_buffer,
                                                 values_buffer, indices_buffer, *dx_buffer, &o));
  const Array3 &dy = o.a, &values = o.b, &indices = o.indices, &dx = o.result;

  if (dx.buffer->element_count() == 0) return ffi::Error::Success();
  const nm::Dims d = MakeDims(dx.batch, dx.rows, dx.cols, dy.cols, n, m);
  if (d.out == 0) return FillZeros(kSpmmT, stream, *dx.buffer);  // N == 0
  // 16-bit operands whose dy rows are whole 16-byte pieces run on the tensor
  // cores; the rest on the CUDA-core kernel.
  if (IsHalfPrecision(dy.buffer->element_type()) && d.out % 8 == 0 && FitsTensorCoreTiles(d)) {
    return DispatchHalf(dx, [&](auto* out, auto type) {
      using T = std::remove_pointer_t<decltype(out)>;
      return LaunchTensorCore<T, decltype(type)::value>(
          kSpmmT, stream,
          TcArgs(Data<uint16_t>(dy), nullptr, Data<T>(values), indices, out,
                 dy.batch == 1 ? 0 : d.tokens * d.out, 0, values.batch, d));
    });
  }
  return DispatchFloat(kSpmmT, dy.buffer->element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    return Launch(stream,
                  nm::SpmmTArgs<T>{Data<T>(dy), Data<T>(values),
                                   Data<uint8_t>(indices), MutableData<T>(dx),
                                   dy.batch, values.batch, indices.batch, d});
  });
}

ffi::Error NmSddmm(simt::Stream stream, ffi::AnyBuffer x_buffer,
                   ffi::AnyBuffer dy_buffer, ffi::AnyBuffer indices_buffer,
                   int32_t n, int32_t m,
                   ffi::Result<ffi::AnyBuffer> dv_buffer) {
  Operands o;
  JAXSPARSE_RETURN_IF_ERROR(nm_check::CheckSddmm(Validator(kSddmm), n, m, x_buffer, dy_buffer,
                                                 indices_buffer, *dv_buffer, &o));
  const Array3 &x = o.a, &dy = o.b, &indices = o.indices, &dv = o.result;

  if (dv.buffer->element_count() == 0) return ffi::Error::Success();
  const nm::Dims d = MakeDims(dv.batch, x.rows, x.cols, dv.rows, n, m);
  if (d.tokens == 0) return FillZeros(kSddmm, stream, *dv.buffer);  // T == 0
  if (IsHalfPrecision(x.buffer->element_type()) && d.out % 8 == 0 && d.in % 8 == 0 &&
      FitsTensorCoreTiles(d)) {
    // Entries outside every tile (positions >= K or >= m) are never written.
    JAXSPARSE_RETURN_IF_ERROR(FillZeros(kSddmm, stream, *dv.buffer));
    return DispatchHalf(dv, [&](auto* out, auto type) {
      using T = std::remove_pointer_t<decltype(out)>;
      return LaunchTensorCore<T, decltype(type)::value>(
          kSddmm, stream,
          TcArgs(Data<uint16_t>(x), Data<uint16_t>(dy), static_cast<const T*>(nullptr), indices, out,
                 x.batch == 1 ? 0 : d.tokens * d.in, dy.batch == 1 ? 0 : d.tokens * d.out, 1,
                 d));
    });
  }
  return DispatchFloat(kSddmm, x.buffer->element_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    return Launch(stream,
                  nm::SddmmArgs<T>{Data<T>(x), Data<T>(dy),
                                   Data<uint8_t>(indices), MutableData<T>(dv),
                                   x.batch, dy.batch, indices.batch, d});
  });
}


// ------------------------------------------------------------------ 2:4 on sparse tensor cores

template <typename T, simt::MmaType kType>
ffi::Error LaunchSp24(simt::Stream stream, const sp24::Args<T>& a) {
  const int64_t token_blocks = (a.tokens + sp24::kBlockTokens - 1) / sp24::kBlockTokens;
  if (token_blocks > kMaxGridYZ) {
    return Invalid(kSpmmSp24, "T = " + std::to_string(a.tokens) + " exceeds one launch's " +
                                  std::to_string(kMaxGridYZ * sp24::kBlockTokens) + " tokens");
  }
  const dim3 grid(static_cast<unsigned>((a.out + sp24::kBlockRows - 1) / sp24::kBlockRows),
                  static_cast<unsigned>(token_blocks),
                  static_cast<unsigned>(std::min<int64_t>(a.batch, kMaxGridYZ)));
  simt::Launch(kSpmmSp24, &sp24::SpmmSp24Kernel<T, kType>, grid, dim3(sp24::kThreads),
               sp24::kSmemBytes, stream, a);
  return LaunchStatus(kSpmmSp24);
}

// y = x @ W for 2:4 weights whose values and metadata pack_mma_sp_24 prepared.
ffi::Error NmSpmmSp24(simt::Stream stream, ffi::AnyBuffer x_buffer,
                      ffi::AnyBuffer values_buffer, ffi::AnyBuffer metadata_buffer,
                      ffi::Result<ffi::AnyBuffer> y_buffer) {
  const char* target = kSpmmSp24;
  const Validator v(target);
  Array3 x, values, y;
  JAXSPARSE_RETURN_IF_ERROR(v.Shape3("x", x_buffer, &x));
  JAXSPARSE_RETURN_IF_ERROR(v.Shape3("values", values_buffer, &values));
  JAXSPARSE_RETURN_IF_ERROR(v.Shape3("y", *y_buffer, &y));
  JAXSPARSE_RETURN_IF_ERROR(v.SameFloatDtype({&x, &values, &y}));
  const ffi::DataType dtype = x.buffer->element_type();
  if (dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F16) {
    return Invalid(target, "x dtype must be bfloat16 or float16, got " + DtypeName(dtype));
  }
  const auto meta_dims = metadata_buffer.dimensions();
  if (metadata_buffer.element_type() != ffi::DataType::U32 || meta_dims.size() != 4) {
    return Invalid(target, "metadata must be a rank-4 uint32 array");
  }
  if (x.cols % 16 != 0) {
    return Invalid(target, "K = x.shape[2] must be a multiple of 16, got " +
                               std::to_string(x.cols));
  }
  JAXSPARSE_RETURN_IF_ERROR(
      v.Dim("values.shape[2] (K/2)", values.cols, "x.shape[2] / 2", x.cols / 2));
  JAXSPARSE_RETURN_IF_ERROR(
      v.Dim("y.shape[1] (T)", y.rows, "x.shape[1]", x.rows));
  JAXSPARSE_RETURN_IF_ERROR(
      v.Dim("values.shape[1] (N)", values.rows, "y.shape[2]", y.cols));
  const int64_t m_tiles = (y.cols + 15) / 16, k_tiles = (x.cols + 63) / 64;
  JAXSPARSE_RETURN_IF_ERROR(
      v.Dim("metadata.shape[0]", meta_dims[0], "values.shape[0]", values.batch));
  JAXSPARSE_RETURN_IF_ERROR(
      v.Dim("metadata.shape[1]", meta_dims[1], "ceil(N/16)", m_tiles));
  JAXSPARSE_RETURN_IF_ERROR(
      v.Dim("metadata.shape[2]", meta_dims[2], "ceil(K/64)", k_tiles));
  JAXSPARSE_RETURN_IF_ERROR(v.Dim("metadata.shape[3]", meta_dims[3], "32", 32));
  JAXSPARSE_RETURN_IF_ERROR(v.Batch({&x, &values}, y));

  if (y.buffer->element_count() == 0) return ffi::Error::Success();
  if (x.cols == 0) return FillZeros(target, stream, *y.buffer);
  auto args = [&](auto* out) {
    using T = std::remove_pointer_t<decltype(out)>;
    return sp24::Args<T>{Data<uint16_t>(x),
                         Data<uint16_t>(values),
                         static_cast<const uint32_t*>(metadata_buffer.untyped_data()),
                         out,
                         x.batch == 1 ? 0 : x.rows * x.cols,
                         values.batch == 1 ? 0 : values.rows * values.cols,
                         values.batch == 1 ? 0 : m_tiles * k_tiles * 32,
                         y.batch,
                         y.rows,
                         x.cols,
                         y.cols,
                         m_tiles,
                         k_tiles};
  };
  if (dtype == ffi::DataType::BF16) {
    return LaunchSp24<simt::Bf16, simt::MmaType::kBf16>(stream,
                                                        args(MutableData<simt::Bf16>(y)));
  }
  return LaunchSp24<simt::Half, simt::MmaType::kF16>(stream, args(MutableData<simt::Half>(y)));
}

}  // namespace
}  // namespace jaxsparse

// Operands (three arrays), attributes n and m, one result (docs/ffi_abi.md).
#define JAXSPARSE_NM_BINDING                                                    \
  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()          \
      .Attr<int32_t>("n").Attr<int32_t>("m").Ret<ffi::AnyBuffer>()

JAXSPARSE_CUDA_TARGET(NmSpmm, "nm_spmm", jaxsparse::NmSpmm, JAXSPARSE_NM_BINDING);
JAXSPARSE_CUDA_TARGET(NmSpmmT, "nm_spmm_t", jaxsparse::NmSpmmT, JAXSPARSE_NM_BINDING);
JAXSPARSE_CUDA_TARGET(NmSddmm, "nm_sddmm", jaxsparse::NmSddmm, JAXSPARSE_NM_BINDING);
// x, the 2:4 values and their packed mma.sp metadata (pack_mma_sp_24), y.
JAXSPARSE_CUDA_TARGET(NmSpmmSp24, "nm_spmm_sp24", jaxsparse::NmSpmmSp24,
                      .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                          .Ret<ffi::AnyBuffer>());
