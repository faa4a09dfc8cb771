// CUDA handlers of the V:N:M targets (the ABI: cpu/vnm/vnm_checks.h): the
// shared operand checks, dtype dispatch, the sparse-tensor-core forward for
// bf16/f16 (vnm_sp.cuh) and CUDA-core kernels for the rest (vnm_math.cuh).
//
// The CUDA-core kernels use a 32 x 4 block like the N:M ones (cuda/nm/nm_ops.cu):
// threadIdx.x runs along the output's contiguous dim, so each warp's stores
// coalesce; threadIdx.y takes 4 rows of the next dim, whose warps read the
// same operand rows at the same time (weight rows for spmm and spmm_t, an x
// window for sddmm), fetched once into L1 for the whole block.

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cpu/common/ffi.h"
#include "cpu/common/validate.h"
#include "cpu/vnm/vnm_checks.h"
#include "cuda/ffi_target.h"
#include "cuda/launch.cuh"
#include "cuda/simt.cuh"
#include "cuda/vnm/vnm_math.cuh"
#include "cuda/vnm/vnm_sp.cuh"

namespace ffi = xla::ffi;

namespace jaxsparse {
namespace {

using namespace launch;  // NOLINT: the shared launch helpers of cuda/launch.cuh.

constexpr char kSpmm[] = "jaxsparse_vnm_spmm";
constexpr char kSpmmT[] = "jaxsparse_vnm_spmm_t";
constexpr char kSddmm[] = "jaxsparse_vnm_sddmm";

// ------------------------------------------------------------------ CUDA-core kernels

// One thread per y[b, t, r], r across lanes: a warp's 32 outputs share at most
// two panels' column rows (broadcasts), each lane streams its own value and
// index rows through L1, shared with the block's 3 other warps (same r, other
// t), and the x reads of a step fall in one group of one x row.
template <typename T>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kBlockThreads)
    VnmSpmmKernel(const JAXSPARSE_GRID_CONSTANT vnm::SpmmArgs<T> a) {
  ForEachPoint(a.d.batch, a.d.tokens, a.d.out,
               [&](int64_t b, int64_t t, int64_t r) { vnm::SpmmElement(a, b, t, r); });
}

// One thread per dx[b, t, k], k across lanes: dx stores coalesce, the lanes of
// a group read the same column, index and value bytes (broadcasts), and
// dy[b, t, r] is a broadcast.
template <typename T>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kBlockThreads)
    VnmSpmmTKernel(const JAXSPARSE_GRID_CONSTANT vnm::SpmmTArgs<T> a) {
  ForEachPoint(a.d.batch, a.d.tokens, a.d.in,
               [&](int64_t b, int64_t t, int64_t k) { vnm::SpmmTElement(a, b, t, k); });
}

// One thread per dv[b, r, c], c across lanes: index loads and dv stores
// coalesce, dy[b, t, r] is a broadcast, and a warp's x loads fall in one
// 32 m / n wide window of an x row, shared with the block's other warps
// (same c, other r).
template <typename T>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kBlockThreads)
    VnmSddmmKernel(const JAXSPARSE_GRID_CONSTANT vnm::SddmmArgs<T> a) {
  ForEachPoint(a.d.batch, a.d.out, a.d.kept,
               [&](int64_t b, int64_t r, int64_t c) { vnm::SddmmElement(a, b, r, c); });
}

// ------------------------------------------------------------------ launches

template <typename T>
ffi::Error Launch(simt::Stream stream, const vnm::SpmmArgs<T>& a) {
  simt::Launch(kSpmm, &VnmSpmmKernel<T>, GridFor(a.d.batch, a.d.tokens, a.d.out), Block(), 0,
               stream, a);
  return LaunchStatus(kSpmm);
}

template <typename T>
ffi::Error Launch(simt::Stream stream, const vnm::SpmmTArgs<T>& a) {
  simt::Launch(kSpmmT, &VnmSpmmTKernel<T>, GridFor(a.d.batch, a.d.tokens, a.d.in), Block(), 0,
               stream, a);
  return LaunchStatus(kSpmmT);
}

template <typename T>
ffi::Error Launch(simt::Stream stream, const vnm::SddmmArgs<T>& a) {
  simt::Launch(kSddmm, &VnmSddmmKernel<T>, GridFor(a.d.batch, a.d.out, a.d.kept), Block(), 0,
               stream, a);
  return LaunchStatus(kSddmm);
}

// ------------------------------------------------------------------ sparse tensor cores

// The largest of 16, 8, 4 bytes dividing `row_bytes`, `tile_bytes` and the
// base address: every staged piece is then aligned for cp.async. 0 when none
// does (plain loads).
int PieceFor(int64_t row_bytes, int64_t tile_bytes, const void* base) {
  const auto address = reinterpret_cast<uintptr_t>(base);
  for (int piece : {16, 8, 4}) {
    if (row_bytes % piece == 0 && tile_bytes % piece == 0 && address % piece == 0) return piece;
  }
  return 0;
}

template <typename T, simt::MmaType kType, int kRows, int kN>
ffi::Error LaunchSp(simt::Stream stream, vnm_sp::Args<T> a) {
  using Shape = vnm_sp::Tile<kRows>;
  a.sub_tiles = a.v / kRows;
  const int64_t panels = (a.out + a.v - 1) / a.v;
  const int64_t token_blocks = (a.tokens + vnm_sp::kBlockTokens - 1) / vnm_sp::kBlockTokens;
  if (token_blocks > kMaxGridYZ || panels * a.sub_tiles > kMaxGridX) {
    return Validator(kSpmm).Fail(
        "T = " + std::to_string(a.tokens) + " with N = " + std::to_string(a.out) +
        " exceeds one launch's grid (" + std::to_string(kMaxGridYZ * vnm_sp::kBlockTokens) +
        " tokens)");
  }
  const dim3 grid(static_cast<unsigned>(panels * a.sub_tiles), static_cast<unsigned>(token_blocks),
                  static_cast<unsigned>(std::min<int64_t>(a.batch, kMaxGridYZ)));
  simt::Launch(kSpmm, &vnm_sp::VnmSpmmSpKernel<T, kType, kRows, kN>, grid, dim3(Shape::kThreads),
               Shape::kSmemBytes, stream, a);
  return LaunchStatus(kSpmm);
}

// The block's rows: the largest tile of 128, 64, 32, 16 outputs dividing V, so
// a block never straddles two panels (V is a multiple of 16).
template <typename T, simt::MmaType kType, int kN>
ffi::Error LaunchSpForV(simt::Stream stream, const vnm_sp::Args<T>& a) {
  if (a.v % 128 == 0) return LaunchSp<T, kType, 128, kN>(stream, a);
  if (a.v % 64 == 0) return LaunchSp<T, kType, 64, kN>(stream, a);
  if (a.v % 32 == 0) return LaunchSp<T, kType, 32, kN>(stream, a);
  return LaunchSp<T, kType, 16, kN>(stream, a);
}

template <typename T, simt::MmaType kType>
ffi::Error LaunchSpFor(simt::Stream stream, const vnm_sp::Args<T>& a) {
  if (a.n == 1) return LaunchSpForV<T, kType, 1>(stream, a);
  return LaunchSpForV<T, kType, 2>(stream, a);
}

// ------------------------------------------------------------------ handlers

using vnm_check::Operands;

vnm::Dims MakeDims(int64_t batch, int64_t tokens, int64_t in, int64_t out, int32_t v, int32_t n,
                   int32_t m) {
  const int64_t groups = vnm_check::Groups(in, m);
  return vnm::Dims{batch, tokens, in, out, groups, groups * n, v, n, m};
}

// The tensor-core kernel keeps tile origins and in-tile offsets in 32 bits
// where it can; these bounds keep every such value in range.
bool FitsTensorCoreTiles(const vnm::Dims& d) {
  constexpr int64_t kLimit = 0x7fffffff - 256;
  return d.in < kLimit && d.out < kLimit && d.tokens < kLimit;
}

ffi::Error VnmSpmm(simt::Stream stream, ffi::AnyBuffer x_buffer, ffi::AnyBuffer values_buffer,
                   ffi::AnyBuffer indices_buffer, ffi::AnyBuffer columns_buffer, int32_t v,
                   int32_t n, int32_t m, ffi::Result<ffi::AnyBuffer> y_buffer) {
  Operands o;
  JAXSPARSE_RETURN_IF_ERROR(vnm_check::CheckSpmm(Validator(kSpmm), v, n, m, x_buffer,
                                                 values_buffer, indices_buffer, columns_buffer,
                                                 *y_buffer, &o));
  const Operand3 &x = o.a, &values = o.b, &indices = o.indices, &columns = o.columns, &y = o.result;
  if (y.buffer->element_count() == 0) return ffi::Error::Success();
  const vnm::Dims d = MakeDims(y.batch, y.rows, x.cols, y.cols, v, n, m);
  if (d.kept == 0) return FillZeros(kSpmm, stream, *y.buffer);  // K == 0
  const ffi::DataType dtype = x.dtype();
  if ((dtype == ffi::DataType::BF16 || dtype == ffi::DataType::F16) && FitsTensorCoreTiles(d)) {
    auto args = [&](auto* out) {
      using T = std::remove_pointer_t<decltype(out)>;
      return vnm_sp::Args<T>{Data<uint16_t>(x),
                             Data<uint8_t>(values),
                             Data<uint8_t>(indices),
                             Data<uint8_t>(columns),
                             out,
                             x.BatchStride(),
                             values.BatchStride(),
                             indices.BatchStride(),
                             columns.BatchStride(),
                             d.batch,
                             d.tokens,
                             d.in,
                             d.out,
                             d.groups,
                             (d.groups + vnm_sp::kGroupsPerTile - 1) / vnm_sp::kGroupsPerTile,
                             v,
                             n,
                             m,
                             1,
                             PieceFor(2 * d.kept, 2 * vnm_sp::kGroupsPerTile * n, values.data()),
                             PieceFor(d.kept, vnm_sp::kGroupsPerTile * n, indices.data())};
    };
    if (dtype == ffi::DataType::BF16) {
      return LaunchSpFor<simt::Bf16, simt::MmaType::kBf16>(stream,
                                                            args(MutableData<simt::Bf16>(y)));
    }
    return LaunchSpFor<simt::Half, simt::MmaType::kF16>(stream, args(MutableData<simt::Half>(y)));
  }
  return DispatchFloat(kSpmm, dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return Launch(stream, vnm::SpmmArgs<T>{Data<T>(x), Data<T>(values), Data<uint8_t>(indices),
                                           Data<uint8_t>(columns), MutableData<T>(y),
                                           vnm::Strides{x.BatchStride(), values.BatchStride(),
                                                        indices.BatchStride(),
                                                        columns.BatchStride()},
                                           d});
  });
}

ffi::Error VnmSpmmT(simt::Stream stream, ffi::AnyBuffer dy_buffer, ffi::AnyBuffer values_buffer,
                    ffi::AnyBuffer indices_buffer, ffi::AnyBuffer columns_buffer, int32_t v,
                    int32_t n, int32_t m, ffi::Result<ffi::AnyBuffer> dx_buffer) {
  Operands o;
  JAXSPARSE_RETURN_IF_ERROR(vnm_check::CheckSpmmT(Validator(kSpmmT), v, n, m, dy_buffer,
                                                  values_buffer, indices_buffer, columns_buffer,
                                                  *dx_buffer, &o));
  const Operand3 &dy = o.a, &values = o.b, &indices = o.indices, &columns = o.columns,
                 &dx = o.result;
  if (dx.buffer->element_count() == 0) return ffi::Error::Success();
  const vnm::Dims d = MakeDims(dx.batch, dx.rows, dx.cols, dy.cols, v, n, m);
  if (d.out == 0) return FillZeros(kSpmmT, stream, *dx.buffer);  // N == 0
  return DispatchFloat(kSpmmT, dy.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    return Launch(stream, vnm::SpmmTArgs<T>{Data<T>(dy), Data<T>(values), Data<uint8_t>(indices),
                                            Data<uint8_t>(columns), MutableData<T>(dx),
                                            vnm::Strides{dy.BatchStride(), values.BatchStride(),
                                                         indices.BatchStride(),
                                                         columns.BatchStride()},
                                            d});
  });
}

ffi::Error VnmSddmm(simt::Stream stream, ffi::AnyBuffer x_buffer, ffi::AnyBuffer dy_buffer,
                    ffi::AnyBuffer indices_buffer, ffi::AnyBuffer columns_buffer, int32_t v,
                    int32_t n, int32_t m, ffi::Result<ffi::AnyBuffer> dv_buffer) {
  Operands o;
  JAXSPARSE_RETURN_IF_ERROR(vnm_check::CheckSddmm(Validator(kSddmm), v, n, m, x_buffer, dy_buffer,
                                                  indices_buffer, columns_buffer, *dv_buffer,
                                                  &o));
  const Operand3 &x = o.a, &dy = o.b, &indices = o.indices, &columns = o.columns, &dv = o.result;
  if (dv.buffer->element_count() == 0) return ffi::Error::Success();
  const vnm::Dims d = MakeDims(dv.batch, x.rows, x.cols, dv.rows, v, n, m);
  if (d.tokens == 0) return FillZeros(kSddmm, stream, *dv.buffer);  // T == 0
  return DispatchFloat(kSddmm, x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    return Launch(stream, vnm::SddmmArgs<T>{Data<T>(x), Data<T>(dy), Data<uint8_t>(indices),
                                            Data<uint8_t>(columns), MutableData<T>(dv),
                                            vnm::Strides{x.BatchStride(), dy.BatchStride(),
                                                         indices.BatchStride(),
                                                         columns.BatchStride()},
                                            d});
  });
}

}  // namespace
}  // namespace jaxsparse

// Operands (four arrays), attributes v, n and m, one result (cpu/vnm/vnm_checks.h).
#define JAXSPARSE_VNM_BINDING                                                           \
  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>() \
      .Attr<int32_t>("v").Attr<int32_t>("n").Attr<int32_t>("m").Ret<ffi::AnyBuffer>()

JAXSPARSE_CUDA_TARGET(VnmSpmm, "vnm_spmm", jaxsparse::VnmSpmm, JAXSPARSE_VNM_BINDING);
JAXSPARSE_CUDA_TARGET(VnmSpmmT, "vnm_spmm_t", jaxsparse::VnmSpmmT, JAXSPARSE_VNM_BINDING);
JAXSPARSE_CUDA_TARGET(VnmSddmm, "vnm_sddmm", jaxsparse::VnmSddmm, JAXSPARSE_VNM_BINDING);
